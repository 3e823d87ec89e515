#include "tests/test_util/compare.h"

#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"

namespace anchorserve {
namespace {

// Upper bound of ulp(x) / |x| for normal x.
double RelativeUlp(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return 0x1.0p-7;
    case DType::kFp16:
      return 0x1.0p-10;
    case DType::kFp32:
      return 0x1.0p-23;
  }
  return 1.0;
}

void Accumulate(double got, double expected, double tolerance, int64_t index, ErrorStats* s) {
  ++s->count;
  const double error = std::fabs(got - expected);
  if (!std::isfinite(got)) ++s->nan_count;
  if (!(error <= tolerance)) ++s->over_tolerance;
  if (std::isfinite(error)) {
    s->max_abs = std::max(s->max_abs, error);
    s->mean_abs += error;
  }
  const double worst =
      s->worst_index < 0 ? -1.0 : std::fabs(s->worst_got - s->worst_expected) / s->worst_tolerance;
  const double ratio =
      std::isfinite(error) ? error / tolerance : std::numeric_limits<double>::infinity();
  if (s->worst_index < 0 || ratio > worst) {
    s->worst_index = index;
    s->worst_got = got;
    s->worst_expected = expected;
    s->worst_tolerance = tolerance;
  }
}

}  // namespace

std::string ErrorStats::ToString() const {
  return absl::StrCat("compared ", count, ", NaN/inf ", nan_count, ", over tolerance ",
                      over_tolerance, ", max |err| ", max_abs, ", mean |err| ", mean_abs,
                      "; worst at element ", worst_index, ": got ", worst_got, " expected ",
                      worst_expected, " tolerance ", worst_tolerance);
}

double OutputTolerance(DType dtype, double expected, double value_scale) {
  double tolerance = RelativeUlp(dtype) * std::fabs(expected) + 2e-5 * value_scale;
  if (dtype == DType::kFp16) tolerance += 0x1.0p-24;
  return tolerance;
}

double LseTolerance(double expected) { return 5e-5 + 1e-5 * std::fabs(expected); }

ErrorStats CompareToReference(const AttentionTask& task, const ReferenceResult& ref,
                              double value_scale) {
  ErrorStats stats;
  const AttentionShape& shape = task.shape;
  const int64_t n = shape.seq_len;
  const int d = shape.head_dim;
  const TensorStrides strides = StridesFor(task.layout, n, shape.num_q_heads, d);
  const auto* bytes = static_cast<const uint8_t*>(task.out);
  std::vector<float> row(d);
  for (int h = 0; h < shape.num_q_heads; ++h) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t offset = i * strides.token + int64_t{h} * strides.head;
      ConvertToFloat(bytes + offset * static_cast<int64_t>(ElementSize(task.dtype)), task.dtype, d,
                     row.data());
      for (int e = 0; e < d; ++e) {
        const int64_t index = (int64_t{h} * n + i) * d + e;
        const double expected = ref.out[index];
        Accumulate(row[e], expected, OutputTolerance(task.dtype, expected, value_scale), index,
                   &stats);
      }
    }
  }
  if (stats.count > 0) stats.mean_abs /= static_cast<double>(stats.count);
  return stats;
}

ErrorStats CompareLseToReference(const float* lse, const ReferenceResult& ref) {
  ErrorStats stats;
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    Accumulate(lse[i], ref.lse[i], LseTolerance(ref.lse[i]), static_cast<int64_t>(i), &stats);
  }
  if (stats.count > 0) stats.mean_abs /= static_cast<double>(stats.count);
  return stats;
}

void FillWithNaN(void* data, DType dtype, size_t count) {
  if (dtype == DType::kFp32) {
    float* values = static_cast<float*>(data);
    for (size_t i = 0; i < count; ++i) values[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const uint16_t nan = dtype == DType::kBf16 ? uint16_t{0x7fc0} : uint16_t{0x7e00};
  uint16_t* values = static_cast<uint16_t*>(data);
  for (size_t i = 0; i < count; ++i) values[i] = nan;
}

std::vector<uint8_t> RandomTensor(DType dtype, size_t count, uint64_t seed, double stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<float> values(count);
  for (float& value : values) value = static_cast<float>(normal(rng));
  std::vector<uint8_t> bytes(count * ElementSize(dtype));
  ConvertFromFloat(values.data(), count, dtype, bytes.data());
  return bytes;
}

std::vector<float> ToFloats(const void* data, DType dtype, size_t count) {
  std::vector<float> values(count);
  ConvertToFloat(data, dtype, count, values.data());
  return values;
}

}  // namespace anchorserve
