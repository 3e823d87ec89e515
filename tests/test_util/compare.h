// Comparison, tolerance and input helpers for numerical tests of attention backends.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/attention_types.h"
#include "tests/test_util/reference.h"

namespace anchorserve {

struct ErrorStats {
  int64_t count = 0;           // elements compared
  int64_t nan_count = 0;       // NaN (or inf) in the backend's values
  int64_t over_tolerance = 0;  // |got - expected| > tolerance (NaN counts here too)
  double max_abs = 0;
  double mean_abs = 0;
  int64_t worst_index = -1;  // element with the largest error relative to its tolerance
  double worst_got = 0, worst_expected = 0, worst_tolerance = 0;

  bool ok() const { return count > 0 && nan_count == 0 && over_tolerance == 0; }
  std::string ToString() const;
};

// Largest |error| allowed for one output element whose fp64 reference is `expected`, from the
// dtype: one unit in the last place of the output dtype at that magnitude (rounding the fp32
// result, which may itself sit next to a rounding boundary), plus fp32 accumulation and exp
// approximation error relative to the value scale (|V| ~ value_scale), plus for fp16 the
// subnormal spacing.
double OutputTolerance(DType dtype, double expected, double value_scale = 1.0);
// Allowed |error| of a natural-log LSE value (fp32 scores and sums).
double LseTolerance(double expected);

// task.out (task.dtype / task.layout) against ref.out ([Hq, N, d]).
ErrorStats CompareToReference(const AttentionTask& task, const ReferenceResult& ref,
                              double value_scale = 1.0);
// lse [Hq, N] against ref.lse.
ErrorStats CompareLseToReference(const float* lse, const ReferenceResult& ref);

// Fills `count` elements of `dtype` with quiet NaN, so unwritten outputs are caught.
void FillWithNaN(void* data, DType dtype, size_t count);

// `count` seeded N(0, stddev^2) values rounded to `dtype`, as raw bytes.
std::vector<uint8_t> RandomTensor(DType dtype, size_t count, uint64_t seed, double stddev = 1.0);

// `count` elements of `dtype` as floats.
std::vector<float> ToFloats(const void* data, DType dtype, size_t count);

}  // namespace anchorserve
