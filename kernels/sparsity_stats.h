// Sparsity statistics of a request: per-head counts turned into density, stripe statistics and
// recall against dense (not the Prometheus metrics, which live in server/metrics.h).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "kernels/attention_types.h"

namespace anchorserve {

struct StripeSummary {
  int64_t min = 0;
  double mean = 0;
  int64_t max = 0;
  int64_t groups = 0;  // groups with a non-empty candidate set
};

struct HeadSummary {
  double density = 0;
  double stripe_density = 0;
  StripeSummary stripes;
};

struct RequestSummary {
  double density = 0;              // over all heads: sum computed / (Hq * N(N+1)/2)
  double stripe_density = 0;       // likewise for stripe entries
  StripeSummary stripes;           // over every (head, group) with candidates
  std::vector<HeadSummary> heads;  // [Hq]
};

RequestSummary SummarizeHeads(int64_t seq_len, absl::Span<const HeadStats> heads);

struct RecallStats {
  double output_recall_tau_0_01 = 0;   // fraction of elements with |O - O_dense| < 0.01
  double output_recall_tau_0_005 = 0;  // same at 0.005
  double attention_mass_mean = 0;      // mean over rows of exp(lse_sparse - lse_dense)
  double attention_mass_min = 0;
};

// `sparse` ran with maybe_lse set; `dense_out` and `dense_lse` come from the same inputs in dense
// mode. The computed keys are a subset of all keys, so a row's dense softmax mass on them is
// exp(lse_sparse - lse_dense).
RecallStats ComputeRecall(const AttentionTask& sparse, const void* dense_out,
                          const float* dense_lse);

}  // namespace anchorserve
