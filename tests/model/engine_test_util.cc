#include "tests/model/engine_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace anchorserve::testing {

absl::Status RecordingSink::OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) {
  Layer copy;
  copy.layer = layer;
  copy.k.assign(k.begin(), k.end());
  copy.v.assign(v.begin(), v.end());
  layers.push_back(std::move(copy));
  if (layer == cancel_at && cancel_flag != nullptr) cancel_flag->store(true);
  if (layer == fail_at) return failure;
  return absl::OkStatus();
}

std::string Comparison::ToString() const {
  return absl::StrCat(count, " values, ", nan_count, " NaN, ", over_tolerance,
                      " over tolerance; max |error| ", max_abs_error, ", max error/tolerance ",
                      max_ratio, "; worst at ", worst_index, ": got ", worst_got, " expected ",
                      worst_expected, " tolerance ", worst_tolerance);
}

double StorageRoundoff(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return 0x1p-8;
    case DType::kFp16:
      return 0x1p-11;
    case DType::kFp32:
      return 0;
  }
  return 0;
}

double StoredTolerance(DType dtype, double expected, double sigma, double sigma_scale) {
  const double computed = kToleranceSigmas * sigma_scale * sigma;
  double tolerance = computed + StorageRoundoff(dtype) * (std::fabs(expected) + computed);
  if (dtype == DType::kFp16) tolerance += 0x1p-25;
  return tolerance;
}

namespace {

void Accumulate(double got, double expected, double tolerance, int64_t index, Comparison* c) {
  ++c->count;
  const double error = std::fabs(got - expected);
  const bool nan = !std::isfinite(got);
  if (nan) ++c->nan_count;
  if (nan || !(error <= tolerance)) ++c->over_tolerance;
  const double ratio = nan ? INFINITY : error / tolerance;
  if (!nan) c->max_abs_error = std::max(c->max_abs_error, error);
  if (c->worst_index < 0 || ratio > c->max_ratio) {
    c->max_ratio = ratio;
    c->worst_index = index;
    c->worst_got = got;
    c->worst_expected = expected;
    c->worst_tolerance = tolerance;
  }
}

}  // namespace

Comparison CompareKv(absl::Span<const char> bytes, DType dtype, Layout layout, int64_t n, int hkv,
                     int d, const std::vector<double>& expected, const std::vector<double>& sigma,
                     double sigma_scale) {
  Comparison c;
  const size_t count = static_cast<size_t>(n) * hkv * d;
  if (bytes.size() != count * ElementSize(dtype) || expected.size() != count) {
    c.over_tolerance = 1;  // wrong size: never ok
    return c;
  }
  std::vector<float> values(count);
  ConvertToFloat(bytes.data(), dtype, count, values.data());
  for (int g = 0; g < hkv; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      for (int e = 0; e < d; ++e) {
        const int64_t ref = (int64_t{g} * n + t) * d + e;
        const int64_t got = layout == Layout::kHeadMajor ? ref : (t * hkv + g) * d + e;
        Accumulate(values[got], expected[ref],
                   StoredTolerance(dtype, expected[ref], sigma[ref], sigma_scale), ref, &c);
      }
    }
  }
  return c;
}

Comparison CompareValues(absl::Span<const float> got, const std::vector<double>& expected,
                         const std::vector<double>& sigma, double sigma_scale) {
  Comparison c;
  if (got.size() != expected.size()) {
    c.over_tolerance = 1;
    return c;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    Accumulate(got[i], expected[i],
               StoredTolerance(DType::kFp32, expected[i], sigma[i], sigma_scale),
               static_cast<int64_t>(i), &c);
  }
  return c;
}

int64_t ArgMax(absl::Span<const float> values) {
  int64_t best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = static_cast<int64_t>(i);
  }
  return best;
}

int64_t ArgMax(const std::vector<double>& values) {
  int64_t best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = static_cast<int64_t>(i);
  }
  return best;
}

const Model& CachedModel(const std::string& dir) {
  static std::mutex mutex;
  static auto* models = new std::map<std::string, std::unique_ptr<Model>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = models->find(dir);
  if (it == models->end()) {
    absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(dir);
    if (!model.ok()) {
      fprintf(stderr, "LoadModel(%s): %s\n", dir.c_str(), model.status().ToString().c_str());
      std::abort();  // test setup failure
    }
    it = models->emplace(dir, *std::move(model)).first;
  }
  return *it->second;
}

const ReferenceForward& CachedReference(const std::string& dir, const std::vector<int32_t>& ids) {
  static std::mutex mutex;
  static auto* results = new std::map<std::string, std::unique_ptr<ReferenceForward>>();
  std::lock_guard<std::mutex> lock(mutex);
  const std::string key = absl::StrCat(dir, "|", absl::StrJoin(ids, ","));
  auto it = results->find(key);
  if (it == results->end()) {
    absl::StatusOr<ReferenceForward> ref = RunReferenceForward(dir, ids);
    if (!ref.ok()) {
      fprintf(stderr, "RunReferenceForward(%s): %s\n", dir.c_str(),
              ref.status().ToString().c_str());
      std::abort();
    }
    it = results->emplace(key, std::make_unique<ReferenceForward>(*std::move(ref))).first;
  }
  return *it->second;
}

double AnchorOnlyDensity(int64_t n, const AnchorConfig& config) {
  const int64_t group = config.GroupSize();
  const int64_t init_end = int64_t{config.init_groups} * group;
  int64_t computed = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = i / group;
    const int64_t initial = std::min(init_end, i + 1);
    const int64_t local_begin = std::max(init_end, (g - config.local_groups + 1) * group);
    computed += initial + std::max<int64_t>(0, i - local_begin + 1);
  }
  return static_cast<double>(computed) / static_cast<double>(CausalEntries(n));
}

}  // namespace anchorserve::testing
