// Recomputes a request locally with the CPU backend and compares outputs: what `anchorctl attend
// --verify` and the end-to-end tests check the server against.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "client/host_tensor.h"
#include "kernels/attention_types.h"
#include "kernels/backend.h"
#include "kernels/sparsity_stats.h"

namespace anchorserve {

struct LocalRun {
  HostTensor output;       // like q
  RequestSummary summary;  // density, stripes, per head
  StageTimes times;
};

// Runs q/k/v through `backend` with `config` (effective_config of the server, converted).
absl::StatusOr<LocalRun> RunLocally(AttentionBackend& backend, const TensorView& q,
                                    const TensorView& k, const TensorView& v,
                                    const AnchorConfig& config);

// Same, on a fresh CPU backend with `cpu_threads` threads (0 = all).
absl::StatusOr<LocalRun> RunOnCpu(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AnchorConfig& config, int cpu_threads = 0);

// |actual - expected| <= atol + rtol * |expected| passes. Set from the output dtype: two roundings
// to that dtype plus accumulation-order differences between backends.
struct Tolerance {
  double atol = 0;
  double rtol = 0;
};
Tolerance VerificationTolerance(DType dtype);

struct OutputComparison {
  int64_t elements = 0;
  int64_t over_tolerance = 0;  // elements outside the tolerance, NaN/inf mismatches included
  int64_t non_finite = 0;      // NaN or inf in `actual` where `expected` is finite
  double max_abs_error = 0;    // over finite pairs
  Tolerance tolerance;

  double FractionOverTolerance() const {
    return elements == 0 ? 0.0 : static_cast<double>(over_tolerance) / elements;
  }
  std::string Describe() const;
};

// Elementwise comparison of two tensors of one dtype, layout and shape.
absl::StatusOr<OutputComparison> CompareOutputs(const HostTensor& actual,
                                                const HostTensor& expected, Tolerance tolerance);

// A server's output checked against the CPU backend: the same inputs, the server's effective
// config (as its response reports it), the tolerance of q's dtype.
struct CpuVerification {
  LocalRun local;
  OutputComparison comparison;  // `output` against local.output
};
absl::StatusOr<CpuVerification> VerifyOnCpu(const TensorView& q, const TensorView& k,
                                            const TensorView& v,
                                            const v1::AnchorConfig& effective_config,
                                            const HostTensor& output, int cpu_threads = 0);

}  // namespace anchorserve
