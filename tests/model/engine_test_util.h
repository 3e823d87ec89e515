// Shared pieces of the prefill engine tests: a recording sink, comparisons against the fp64
// reference forward with tolerances derived from its fp32 error bounds and the output dtype,
// and cached models and reference results.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/attention_types.h"
#include "kernels/dtype.h"
#include "model/model.h"
#include "model/prefill_engine.h"
#include "tests/test_util/reference_model.h"

namespace anchorserve::testing {

// Keeps a copy of every layer it receives; can fail or raise a cancel flag at a chosen layer.
class RecordingSink : public KvSink {
 public:
  struct Layer {
    int layer = 0;
    std::vector<char> k, v;
  };

  absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) override;

  std::vector<Layer> layers;
  int fail_at = -1;  // layer whose call returns `failure`
  absl::Status failure = absl::DataLossError("sink failure injected by the test");
  int cancel_at = -1;  // layer whose call sets *cancel_flag
  std::atomic<bool>* cancel_flag = nullptr;
};

struct Comparison {
  int64_t count = 0;
  int64_t nan_count = 0;
  int64_t over_tolerance = 0;  // NaN counts here too
  double max_abs_error = 0;
  double max_ratio = 0;  // largest |error| / tolerance
  int64_t worst_index = -1;
  double worst_got = 0, worst_expected = 0, worst_tolerance = 0;

  bool ok() const { return count > 0 && nan_count == 0 && over_tolerance == 0; }
  std::string ToString() const;
};

// Unit roundoff of storing an fp32 value in `dtype` (0 for fp32: copied exactly).
double StorageRoundoff(DType dtype);

// Tolerance for one stored value whose exact value is `expected` and whose fp32 computation has
// error scale `sigma` (ReferenceForward): kToleranceSigmas * sigma_scale * sigma, plus rounding
// to `dtype`, plus for fp16 half its subnormal spacing. sigma_scale is sqrt(2) when the other
// side is itself an fp32 computation with independent errors.
double StoredTolerance(DType dtype, double expected, double sigma, double sigma_scale = 1.0);

// K or V bytes (dtype, layout, [Hkv, N, d] or [N, Hkv, d]) against the reference [Hkv, N, d].
Comparison CompareKv(absl::Span<const char> bytes, DType dtype, Layout layout, int64_t n, int hkv,
                     int d, const std::vector<double>& expected, const std::vector<double>& sigma,
                     double sigma_scale = 1.0);
Comparison CompareValues(absl::Span<const float> got, const std::vector<double>& expected,
                         const std::vector<double>& sigma, double sigma_scale = 1.0);

int64_t ArgMax(absl::Span<const float> values);
int64_t ArgMax(const std::vector<double>& values);

// The model in `dir`, loaded once per process.
const Model& CachedModel(const std::string& dir);
// The reference forward of `dir` over `ids`, computed once per (dir, ids).
const ReferenceForward& CachedReference(const std::string& dir, const std::vector<int32_t>& ids);

// Fraction of the causal score matrix in the anchor region alone (theta = -inf), from the spec.
double AnchorOnlyDensity(int64_t n, const AnchorConfig& config);

}  // namespace anchorserve::testing
