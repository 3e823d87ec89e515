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

// What a mass target chose for one head (all zero without one: HeadStats' mass fields are).
struct MassSummary {
  double theta_min = 0;  // chosen thresholds over the groups with a finite one
  double theta_mean = 0;
  double theta_max = 0;
  int64_t groups = 0;              // groups with a finite chosen theta
  int64_t full_groups = 0;         // groups that kept every candidate
  double estimated_kept_mass = 0;  // estimated_mass_sum / seq_len: mean over the head's rows
};

struct HeadSummary {
  double density = 0;
  double stripe_density = 0;
  StripeSummary stripes;
  MassSummary mass;
};

struct RequestSummary {
  double density = 0;              // over all heads: sum computed / (Hq * N(N+1)/2)
  double stripe_density = 0;       // likewise for stripe entries
  StripeSummary stripes;           // over every (head, group) with candidates
  double estimated_kept_mass = 0;  // mean over heads of heads[h].mass.estimated_kept_mass
  std::vector<HeadSummary> heads;  // [Hq]
};

RequestSummary SummarizeHeads(int64_t seq_len, absl::Span<const HeadStats> heads);

struct RecallStats {
  double output_recall_tau_0_01 = 0;   // fraction of elements with |O - O_dense| < 0.01
  double output_recall_tau_0_005 = 0;  // same at 0.005
  double attention_mass_mean = 0;      // mean over rows of exp(lse_sparse - lse_dense)
  double attention_mass_min = 0;
  // [Hq]: per query head, the mean over its rows of the same clamped mass (NaN without LSE).
  std::vector<double> head_attention_mass;
};

// `sparse` ran with maybe_lse set; `dense_out` and `dense_lse` come from the same inputs in dense
// mode. The computed keys are a subset of all keys, so a row's dense softmax mass on them is
// exp(lse_sparse - lse_dense). Both LSE arrays are [Hq, N]: row i of head h is h * N + i.
RecallStats ComputeRecall(const AttentionTask& sparse, const void* dense_out,
                          const float* dense_lse);

}  // namespace anchorserve
