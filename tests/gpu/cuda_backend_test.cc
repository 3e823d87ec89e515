// The CUDA backend end to end (stripe identification + attention kernels) against the fp64
// reference of the spec (tests/test_util/reference.h) and, at long N, against the CPU backend
// with fp64 margins for the disputed keys. Every test skips itself without a CUDA device.
//
// Stripe sets must equal the reference's except for keys whose fp64 margin
// max_r(scale*qbar_r.k_j - abar_r) + theta lies within fp32 rounding of 0; outputs are then
// checked against the reference evaluated with the GPU's own stripe sets.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention_types.h"
#include "kernels/cpu/cpu_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tile_kernels.h"
#include "kernels/cuda/attention_runner.h"
#include "kernels/cuda/identification_types.h"
#include "kernels/cuda/pinned_staging.h"
#include "kernels/structured_inputs.h"
#include "tests/test_util/compare.h"
#include "tests/test_util/mass_check.h"
#include "tests/test_util/reference.h"

namespace anchorserve {
namespace {

#define SKIP_WITHOUT_CUDA_DEVICE()                                        \
  do {                                                                    \
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (false)

constexpr double kInf = std::numeric_limits<double>::infinity();

enum class InputKind { kStructured, kRandom };

struct CaseSpec {
  std::string name;
  std::vector<int64_t> seq_lens;  // one Run over all of them
  int hq = 4;
  int hkv = 1;
  int d = 128;
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  InputKind kind = InputKind::kStructured;
  AnchorConfig config;
  uint64_t seed = 1;
  // Structured inputs for small groups: the generator's local window and needle rows scaled
  // down with G (0 = the generator's defaults).
  int local_window = 0;
  int needle_query_rows = 0;
};

// gtest prints parameters in test listings; the name says what the case is.
void PrintTo(const CaseSpec& spec, std::ostream* os) { *os << spec.name; }

// One task with its own inputs and poisoned outputs.
struct TaskData {
  HostQkv qkv;
  std::vector<uint8_t> out;
  std::vector<float> lse;
  AttentionTask task;
};

std::unique_ptr<TaskData> MakeTask(const CaseSpec& spec, int64_t n, uint64_t seed) {
  auto data = std::make_unique<TaskData>();
  const AttentionShape shape{n, spec.hq, spec.hkv, spec.d};
  absl::StatusOr<HostQkv> qkv;
  if (spec.kind == InputKind::kStructured) {
    StructuredInputOptions options;
    options.seed = seed;
    if (spec.local_window > 0) options.local_window = spec.local_window;
    if (spec.needle_query_rows > 0) options.needle_query_rows = spec.needle_query_rows;
    qkv = GenerateStructuredQkv(shape, spec.dtype, spec.layout, options);
  } else {
    qkv = GenerateRandomQkv(shape, spec.dtype, spec.layout, seed);
  }
  EXPECT_TRUE(qkv.ok()) << qkv.status();
  data->qkv = *std::move(qkv);
  BindInputs(data->qkv, &data->task);
  data->task.config = spec.config;
  const size_t elements = static_cast<size_t>(n) * spec.hq * spec.d;
  data->out.resize(elements * ElementSize(spec.dtype));
  FillWithNaN(data->out.data(), spec.dtype, elements);
  data->lse.assign(static_cast<size_t>(n) * spec.hq, std::numeric_limits<float>::quiet_NaN());
  data->task.out = data->out.data();
  data->task.maybe_lse = data->lse.data();
  return data;
}

// One task per length of `spec` (seed spec.seed + 1000 t for the t-th) and the batch of them.
std::vector<AttentionTask*> MakeBatch(const CaseSpec& spec,
                                      std::vector<std::unique_ptr<TaskData>>* tasks) {
  std::vector<AttentionTask*> batch;
  for (size_t t = 0; t < spec.seq_lens.size(); ++t) {
    tasks->push_back(MakeTask(spec, spec.seq_lens[t], spec.seed + 1000 * t));
    batch.push_back(&tasks->back()->task);
  }
  return batch;
}

// Rows of one head as doubles, [N, d].
std::vector<double> HeadRows(const void* data, DType dtype, Layout layout, int64_t n, int num_heads,
                             int d, int head) {
  const TensorStrides strides = StridesFor(layout, n, num_heads, d);
  std::vector<double> rows(static_cast<size_t>(n) * d);
  std::vector<float> row(d);
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (int64_t t = 0; t < n; ++t) {
    ConvertToFloat(bytes + (t * strides.token + int64_t{head} * strides.head) *
                               static_cast<int64_t>(ElementSize(dtype)),
                   dtype, d, row.data());
    for (int e = 0; e < d; ++e) rows[t * d + e] = row[e];
  }
  return rows;
}

double MaxRowNorm(const std::vector<double>& rows, int d) {
  double best = 0;
  for (size_t t = 0; t * d < rows.size(); ++t) {
    double sum = 0;
    for (int e = 0; e < d; ++e) sum += rows[t * d + e] * rows[t * d + e];
    best = std::max(best, std::sqrt(sum));
  }
  return best;
}

int64_t NumGroups(const AnchorConfig& config, int64_t n) {
  return (n + config.GroupSize() - 1) / config.GroupSize();
}

// Per-head tolerance of a stripe margin: fp32 rounding of length-d dot products of operands up
// to these norms (qbar, the anchors and the scores) plus theta itself.
double MarginTolerance(const AttentionTask& task, int h) {
  const AttentionShape& s = task.shape;
  const std::vector<double> q =
      HeadRows(task.q, task.dtype, task.layout, s.seq_len, s.num_q_heads, s.head_dim, h);
  const std::vector<double> k = HeadRows(task.k, task.dtype, task.layout, s.seq_len, s.num_kv_heads,
                                         s.head_dim, h / s.GqaRatio());
  const double scale = task.config.ScaleFor(s.head_dim);
  const double magnitude = 2 * scale * MaxRowNorm(q, s.head_dim) * MaxRowNorm(k, s.head_dim) +
                           (std::isfinite(task.config.theta) ? std::fabs(task.config.theta) : 0);
  return 2e-5 * magnitude + 1e-6;
}

// fp64 margins of chosen keys, computed on demand per (head, group) (for long N where the full
// reference is too slow).
class LazyMargins {
 public:
  explicit LazyMargins(const AttentionTask& task) : task_(task) {}

  double Margin(int h, int64_t g, int64_t key) {
    auto [it, inserted] = groups_.try_emplace({h, g});
    if (inserted) Prepare(h, g, &it->second);
    const Pooled& pooled = it->second;
    const AttentionShape& s = task_.shape;
    const std::vector<double>& k = KvHead(h / s.GqaRatio());
    const double scale = task_.config.ScaleFor(s.head_dim);
    double best = -kInf;
    for (size_t r = 0; r < pooled.anchor.size(); ++r) {
      double dot = 0;
      for (int e = 0; e < s.head_dim; ++e) dot += pooled.q[r][e] * k[key * s.head_dim + e];
      best = std::max(best, scale * dot - pooled.anchor[r]);
    }
    return best + task_.config.theta;
  }

 private:
  struct Pooled {
    std::vector<std::vector<double>> q;
    std::vector<double> anchor;
  };

  const std::vector<double>& KvHead(int kv) {
    auto [it, inserted] = kv_.try_emplace(kv);
    if (inserted) {
      const AttentionShape& s = task_.shape;
      it->second =
          HeadRows(task_.k, task_.dtype, task_.layout, s.seq_len, s.num_kv_heads, s.head_dim, kv);
    }
    return it->second;
  }

  void Prepare(int h, int64_t g, Pooled* pooled) {
    const AttentionShape& s = task_.shape;
    const int d = s.head_dim;
    const std::vector<double> q =
        HeadRows(task_.q, task_.dtype, task_.layout, s.seq_len, s.num_q_heads, d, h);
    const std::vector<double>& k = KvHead(h / s.GqaRatio());
    const double scale = task_.config.ScaleFor(d);
    const GroupRanges geo = GroupRangesOf(task_.config, s.seq_len, g);
    const int block = task_.config.block_size;
    for (int64_t b0 = geo.row_begin;
         b0 < geo.row_end && pooled->anchor.size() < static_cast<size_t>(task_.config.step);
         b0 += block) {
      const int64_t b1 = std::min(geo.row_end, b0 + block);
      std::vector<double> mean(d, 0.0);
      double anchor_sum = 0;
      for (int64_t i = b0; i < b1; ++i) {
        for (int e = 0; e < d; ++e) mean[e] += q[i * d + e];
        double x = -kInf;
        auto visit = [&](int64_t j) {
          double dot = 0;
          for (int e = 0; e < d; ++e) dot += q[i * d + e] * k[j * d + e];
          x = std::max(x, scale * dot);
        };
        for (int64_t j = 0; j < std::min(geo.init_end, i + 1); ++j) visit(j);
        for (int64_t j = geo.local_begin; j <= i; ++j) visit(j);
        anchor_sum += x;
      }
      for (double& value : mean) value /= static_cast<double>(b1 - b0);
      pooled->q.push_back(std::move(mean));
      pooled->anchor.push_back(anchor_sum / static_cast<double>(b1 - b0));
    }
  }

  const AttentionTask& task_;
  std::map<std::pair<int, int64_t>, Pooled> groups_;
  std::map<int, std::vector<double>> kv_;
};

// The GPU's stripe sets of task `t` of the last Run, [Hq * num_groups] (index h * ng + g), after
// checking that each list is sorted, unique, inside C_g and within its capacity.
std::vector<std::vector<int64_t>> GpuStripes(const CudaBackend::StripeSnapshot& snapshot, int t,
                                             const AttentionTask& task) {
  const cuda::BatchPlan& plan = snapshot.plan;
  const int hq = task.shape.num_q_heads;
  const int64_t ng = NumGroups(task.config, task.shape.seq_len);
  std::vector<std::vector<int64_t>> stripes(hq * ng);
  const int64_t group_begin = plan.seqs[t].group_begin;
  for (int64_t g = 0; g < ng; ++g) {
    const cuda::IdGroup& group = plan.groups[group_begin + g];
    const GroupRanges geo = GroupRangesOf(task.config, task.shape.seq_len, g);
    EXPECT_EQ(group.cand_end > group.cand_begin ? group.cand_end - group.cand_begin : 0,
              geo.cand_end - geo.cand_begin)
        << "group " << g;
    for (int h = 0; h < hq; ++h) {
      const int64_t list = (group_begin + g) * hq + h;
      const int32_t count = snapshot.counts[list];
      const int64_t offset = plan.list_offset[list];
      EXPECT_GE(count, 0);
      EXPECT_LE(count, geo.cand_end - geo.cand_begin) << "head " << h << " group " << g;
      std::vector<int64_t>& keys = stripes[h * ng + g];
      for (int32_t c = 0; c < count; ++c) keys.push_back(snapshot.index[offset + c]);
      for (size_t c = 0; c < keys.size(); ++c) {
        EXPECT_TRUE(keys[c] >= geo.cand_begin && keys[c] < geo.cand_end)
            << "head " << h << " group " << g << " key " << keys[c];
        if (c > 0) {
          EXPECT_LT(keys[c - 1], keys[c]) << "head " << h << " group " << g;
        }
      }
    }
  }
  return stripes;
}

struct StripeComparison {
  int64_t candidates = 0;
  int64_t selected = 0;
  int64_t disputed = 0;  // in one set only, margin within tolerance
  int64_t wrong = 0;     // in one set only, margin beyond tolerance
  std::string first_wrong;
  std::vector<bool> group_disputed;  // [Hq * ng]
};

// `expected` vs `got`; `margin(h, g, key)` gives the fp64 margin of a key in one set only.
template <typename MarginFn>
StripeComparison CompareStripes(const AttentionTask& task,
                                const std::vector<std::vector<int64_t>>& expected,
                                const std::vector<std::vector<int64_t>>& got, MarginFn margin) {
  StripeComparison result;
  const int hq = task.shape.num_q_heads;
  const int64_t ng = NumGroups(task.config, task.shape.seq_len);
  result.group_disputed.assign(hq * ng, false);
  std::vector<double> tolerance(hq);
  for (int h = 0; h < hq; ++h) tolerance[h] = MarginTolerance(task, h);
  for (int h = 0; h < hq; ++h) {
    for (int64_t g = 0; g < ng; ++g) {
      const GroupRanges geo = GroupRangesOf(task.config, task.shape.seq_len, g);
      result.candidates += geo.cand_end - geo.cand_begin;
      const std::vector<int64_t>& a = expected[h * ng + g];
      const std::vector<int64_t>& b = got[h * ng + g];
      result.selected += static_cast<int64_t>(b.size());
      std::vector<int64_t> differ;
      std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(),
                                    std::back_inserter(differ));
      for (int64_t key : differ) {
        const double m = margin(h, g, key);
        if (std::fabs(m) <= tolerance[h]) {
          ++result.disputed;
          result.group_disputed[h * ng + g] = true;
        } else {
          if (result.wrong == 0) {
            const bool in_gpu = std::binary_search(b.begin(), b.end(), key);
            result.first_wrong =
                absl::StrCat("head ", h, " group ", g, " key ", key,
                             in_gpu ? " selected by the GPU only" : " missed by the GPU",
                             ", fp64 margin ", m, ", tolerance ", tolerance[h]);
          }
          ++result.wrong;
        }
      }
    }
  }
  return result;
}

// HeadStats that the spec gives for these stripe sets.
std::vector<HeadStats> StatsForStripes(const AttentionTask& task,
                                       const std::vector<std::vector<int64_t>>& stripes) {
  const int hq = task.shape.num_q_heads;
  const int64_t n = task.shape.seq_len;
  std::vector<HeadStats> stats(hq);
  if (task.config.IsDense()) {
    for (HeadStats& s : stats) s.computed_entries = CausalEntries(n);
    return stats;
  }
  const int64_t ng = NumGroups(task.config, n);
  int64_t anchor_entries = 0;
  for (int64_t g = 0; g < ng; ++g) {
    const GroupRanges geo = GroupRangesOf(task.config, n, g);
    for (int64_t i = geo.row_begin; i < geo.row_end; ++i) {
      anchor_entries +=
          std::min(geo.init_end, i + 1) + std::max<int64_t>(0, i + 1 - geo.local_begin);
    }
  }
  for (int h = 0; h < hq; ++h) {
    HeadStats& s = stats[h];
    for (int64_t g = 0; g < ng; ++g) {
      const GroupRanges geo = GroupRangesOf(task.config, n, g);
      if (geo.cand_end <= geo.cand_begin) continue;
      const int64_t count = static_cast<int64_t>(stripes[h * ng + g].size());
      s.stripe_entries += count * (geo.row_end - geo.row_begin);
      s.stripes_min = s.stripe_groups == 0 ? count : std::min(s.stripes_min, count);
      s.stripes_max = std::max(s.stripes_max, count);
      s.stripes_total += count;
      ++s.stripe_groups;
    }
    s.computed_entries = anchor_entries + s.stripe_entries;
  }
  return stats;
}

void ExpectStatsEqual(const std::vector<HeadStats>& got, const std::vector<HeadStats>& expected,
                      const std::string& what) {
  ASSERT_EQ(got.size(), expected.size()) << what;
  for (size_t h = 0; h < got.size(); ++h) {
    EXPECT_EQ(got[h].computed_entries, expected[h].computed_entries) << what << " head " << h;
    EXPECT_EQ(got[h].stripe_entries, expected[h].stripe_entries) << what << " head " << h;
    EXPECT_EQ(got[h].stripe_groups, expected[h].stripe_groups) << what << " head " << h;
    EXPECT_EQ(got[h].stripes_total, expected[h].stripes_total) << what << " head " << h;
    EXPECT_EQ(got[h].stripes_min, expected[h].stripes_min) << what << " head " << h;
    EXPECT_EQ(got[h].stripes_max, expected[h].stripes_max) << what << " head " << h;
  }
}

// x(i) of sampled rows against fp64.
void CheckRowAnchors(const CudaBackend::StripeSnapshot& snapshot, int t, const AttentionTask& task,
                     const std::string& what) {
  if (snapshot.row_anchor.empty()) return;
  const AttentionShape& s = task.shape;
  const int d = s.head_dim;
  const double scale = task.config.ScaleFor(d);
  const int64_t lse_offset = snapshot.plan.seqs[t].lse_offset;
  int checked = 0, bad = 0;
  std::string first_bad;
  for (int h = 0; h < s.num_q_heads; ++h) {
    const std::vector<double> q =
        HeadRows(task.q, task.dtype, task.layout, s.seq_len, s.num_q_heads, d, h);
    const std::vector<double> k =
        HeadRows(task.k, task.dtype, task.layout, s.seq_len, s.num_kv_heads, d, h / s.GqaRatio());
    const double tolerance = 2e-5 * scale * MaxRowNorm(q, d) * MaxRowNorm(k, d) + 1e-6;
    const int64_t step = std::max<int64_t>(1, s.seq_len / 24);
    for (int64_t i = 0; i < s.seq_len; i += step) {
      const GroupRanges geo = GroupRangesOf(task.config, s.seq_len, i / task.config.GroupSize());
      double x = -kInf;
      auto visit = [&](int64_t j) {
        double dot = 0;
        for (int e = 0; e < d; ++e) dot += q[i * d + e] * k[j * d + e];
        x = std::max(x, scale * dot);
      };
      for (int64_t j = 0; j < std::min(geo.init_end, i + 1); ++j) visit(j);
      for (int64_t j = geo.local_begin; j <= i; ++j) visit(j);
      const double got = snapshot.row_anchor[lse_offset + int64_t{h} * s.seq_len + i];
      ++checked;
      if (!(std::fabs(got - x) <= tolerance)) {
        if (bad++ == 0) {
          first_bad = absl::StrCat("head ", h, " row ", i, ": got ", got, " expected ", x);
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << checked << " anchors off; " << first_bad;
}

double MaxAbs(const void* data, DType dtype, size_t count) {
  double best = 0;
  for (float value : ToFloats(data, dtype, count)) best = std::max(best, std::fabs(double{value}));
  return best;
}

// Allowed |out - ref| of the GPU kernels: they round P (the softmax weights fed to the PV
// product) and the output to the input dtype, so |err| <= 1.5 u (|ref| + max|v|) with u the
// dtype's unit roundoff; fp32 accumulation is far below that.
double KernelOutputTolerance(DType dtype, double expected, double max_abs_v) {
  const double unit = dtype == DType::kBf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  return 1.5 * unit * (std::fabs(expected) + max_abs_v) + 1e-6;
}

// task.out against ref.out ([Hq, N, d]) with KernelOutputTolerance; NaN always fails.
ErrorStats CompareOutput(const AttentionTask& task, const ReferenceResult& ref) {
  const AttentionShape& s = task.shape;
  const size_t elements = static_cast<size_t>(s.seq_len) * s.num_q_heads * s.head_dim;
  const double max_v =
      MaxAbs(task.v, task.dtype, static_cast<size_t>(s.seq_len) * s.num_kv_heads * s.head_dim);
  const std::vector<float> got = ToFloats(task.out, task.dtype, elements);
  const TensorStrides strides = StridesFor(task.layout, s.seq_len, s.num_q_heads, s.head_dim);
  ErrorStats stats;
  double worst_ratio = -1;
  for (int h = 0; h < s.num_q_heads; ++h) {
    for (int64_t i = 0; i < s.seq_len; ++i) {
      for (int e = 0; e < s.head_dim; ++e) {
        const int64_t ref_at = (int64_t{h} * s.seq_len + i) * s.head_dim + e;
        const double expected = ref.out[ref_at];
        const double value = got[i * strides.token + int64_t{h} * strides.head + e];
        const double tolerance = KernelOutputTolerance(task.dtype, expected, max_v);
        const double error = std::fabs(value - expected);
        ++stats.count;
        if (!std::isfinite(value)) ++stats.nan_count;
        if (!(error <= tolerance)) ++stats.over_tolerance;
        if (std::isfinite(error)) {
          stats.max_abs = std::max(stats.max_abs, error);
          stats.mean_abs += error;
        }
        const double ratio = std::isfinite(error) ? error / tolerance : kInf;
        if (ratio > worst_ratio) {
          worst_ratio = ratio;
          stats.worst_index = ref_at;
          stats.worst_got = value;
          stats.worst_expected = expected;
          stats.worst_tolerance = tolerance;
        }
      }
    }
  }
  if (stats.count > 0) stats.mean_abs /= static_cast<double>(stats.count);
  return stats;
}

std::string Describe(const CaseSpec& spec, int64_t n, uint64_t seed) {
  return absl::StrCat(spec.name, " N=", n, " Hq=", spec.hq, " Hkv=", spec.hkv, " d=", spec.d, " ",
                      std::string(DTypeName(spec.dtype)),
                      spec.layout == Layout::kTokenMajor ? " token-major" : " head-major",
                      spec.kind == InputKind::kStructured ? " structured" : " random",
                      " theta=", spec.config.theta, " B=", spec.config.block_size,
                      " s=", spec.config.step, " n_init=", spec.config.init_groups,
                      " n_loc=", spec.config.local_groups, " seed=", seed);
}

// Runs every sequence of `spec` in one batch and checks each against the fp64 reference.
void RunAgainstReference(const CaseSpec& spec) {
  absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  (*backend)->KeepStripesForTesting(true);
  std::vector<std::unique_ptr<TaskData>> tasks;
  const std::vector<AttentionTask*> batch = MakeBatch(spec, &tasks);
  const absl::Status status = (*backend)->Run(batch);
  ASSERT_TRUE(status.ok()) << status;
  const CudaBackend::StripeSnapshot snapshot = (*backend)->LastStripesForTesting();
  const bool dense = spec.config.IsDense();

  for (size_t t = 0; t < tasks.size(); ++t) {
    const AttentionTask& task = tasks[t]->task;
    const std::string what = Describe(spec, task.shape.seq_len, spec.seed + 1000 * t);
    ASSERT_TRUE(task.status.ok()) << what << ": " << task.status;
    ReferenceResult ref = ReferenceAttend(task);
    if (!dense) {
      const std::vector<std::vector<int64_t>> gpu = GpuStripes(snapshot, t, task);
      const int64_t ng = ref.num_groups;
      const StripeComparison cmp =
          CompareStripes(task, ref.stripes, gpu, [&](int h, int64_t g, int64_t key) {
            const GroupRanges geo = GroupRangesOf(task.config, task.shape.seq_len, g);
            return ref.stripe_margins[h * ng + g][key - geo.cand_begin];
          });
      EXPECT_EQ(cmp.wrong, 0) << what << ": " << cmp.wrong << " stripe decisions wrong of "
                              << cmp.candidates << " candidates; first: " << cmp.first_wrong;
      std::printf(
          "  %s: selected %lld of %lld candidates, %lld disputed (fp64 margin within "
          "rounding)\n",
          what.c_str(), static_cast<long long>(cmp.selected),
          static_cast<long long>(cmp.candidates), static_cast<long long>(cmp.disputed));
      ExpectStatsEqual(task.head_stats, StatsForStripes(task, gpu), what + " (own stripes)");
      if (cmp.disputed + cmp.wrong > 0) {
        ref = ReferenceAttendWithStripes(task, gpu);
      } else {
        ExpectStatsEqual(task.head_stats, ref.head_stats, what + " (reference)");
      }
      CheckRowAnchors(snapshot, t, task, what);
    } else {
      ExpectStatsEqual(task.head_stats, ref.head_stats, what + " (dense)");
    }
    const ErrorStats out_error = CompareOutput(task, ref);
    EXPECT_TRUE(out_error.ok()) << what << " output: " << out_error.ToString();
    const ErrorStats lse_error = CompareLseToReference(task.maybe_lse, ref);
    EXPECT_TRUE(lse_error.ok()) << what << " lse: " << lse_error.ToString();
  }
}

AnchorConfig Config(float theta, int block = 128, int step = 16, int init = 1, int local = 1) {
  AnchorConfig config;
  config.theta = theta;
  config.block_size = block;
  config.step = step;
  config.init_groups = init;
  config.local_groups = local;
  return config;
}

class CudaBackendReferenceTest : public testing::TestWithParam<CaseSpec> {};

TEST_P(CudaBackendReferenceTest, MatchesFp64Reference) {
  SKIP_WITHOUT_CUDA_DEVICE();
  RunAgainstReference(GetParam());
}

CaseSpec Spec(std::string name, std::vector<int64_t> lens, int hq, int hkv, int d, DType dtype,
              Layout layout, InputKind kind, AnchorConfig config, uint64_t seed) {
  CaseSpec spec;
  spec.name = std::move(name);
  spec.seq_lens = std::move(lens);
  spec.hq = hq;
  spec.hkv = hkv;
  spec.d = d;
  spec.dtype = dtype;
  spec.layout = layout;
  spec.kind = kind;
  spec.config = config;
  spec.seed = seed;
  return spec;
}

constexpr Layout kTok = Layout::kTokenMajor;
constexpr Layout kHead = Layout::kHeadMajor;
constexpr InputKind kStruct = InputKind::kStructured;
constexpr InputKind kRand = InputKind::kRandom;
constexpr DType kBf = DType::kBf16;
constexpr DType kFp = DType::kFp16;

// Random N(0,1) q/k: theta ~ 3.5 selects about half of the candidates, so many keys sit near
// the threshold; structured inputs use the spec's theta = 12.
INSTANTIATE_TEST_SUITE_P(
    Cases, CudaBackendReferenceTest,
    testing::Values(
        Spec("single_row", {1}, 4, 1, 64, kBf, kTok, kStruct, Config(12), 11),
        Spec("short_mha_head_major", {300}, 2, 2, 128, kFp, kHead, kRand, Config(3.5f), 12),
        Spec("one_group_gqa8", {2048}, 8, 1, 64, kBf, kTok, kStruct, Config(12), 13),
        Spec("first_candidates", {4097}, 4, 1, 128, kBf, kTok, kStruct, Config(12), 14),
        Spec("random_fp16_d64", {6000}, 4, 1, 64, kFp, kTok, kRand, Config(3.6f), 15),
        Spec("gqa4_head_major", {8269}, 4, 1, 128, kBf, kHead, kStruct, Config(12), 16),
        Spec("small_groups_n_init2_n_loc2", {3001}, 4, 2, 128, kBf, kTok, kRand,
             Config(3.0f, 64, 4, 2, 2), 17),
        Spec("block100_step20", {7000}, 2, 1, 64, kBf, kTok, kStruct, Config(12, 100, 20), 18),
        Spec("block256_step8_fp16", {5555}, 2, 2, 128, kFp, kHead, kRand, Config(3.5f, 256, 8), 19),
        Spec("no_init_group", {5000}, 4, 4, 64, kBf, kTok, kRand, Config(3.4f, 128, 8, 0, 1), 20),
        Spec("anchor_only", {5000}, 4, 1, 128, kFp, kTok, kStruct, Config(-INFINITY), 21),
        Spec("all_selected_sparse_path", {4500}, 4, 2, 64, kBf, kTok, kRand, Config(1e30f), 22),
        Spec("dense_theta_inf", {3000}, 4, 1, 128, kBf, kTok, kStruct, Config(INFINITY), 23),
        Spec("mixed_lengths_one_run", {777, 4096, 5001, 1, 2049}, 4, 1, 64, kFp, kTok, kRand,
             Config(3.5f), 24),
        // Hq/Hkv = 8: two 64-row passes of the wgmma stripe kernel per chunk.
        Spec("gqa8_fp16_d128_mixed", {6200, 3000}, 8, 1, 128, kFp, kTok, kRand, Config(3.5f), 25),
        // Odd ratios: the wgmma stripe kernel's last pass has 1-3 idle warps (GQA 7 as
        // Qwen2.5-7B, 5, 6); GQA 3 has fewer than 4 units and takes the mma.sync kernel.
        Spec("gqa7_bf16_d128", {5000}, 14, 2, 128, kBf, kTok, kStruct, Config(12), 26),
        Spec("gqa7_random_mixed", {4500, 1300}, 7, 1, 128, kBf, kTok, kRand, Config(3.5f), 27),
        Spec("gqa5_fp16_d64_head_major", {4100}, 5, 1, 64, kFp, kHead, kRand, Config(3.5f), 28),
        Spec("gqa6_bf16_d128", {3333}, 12, 2, 128, kBf, kTok, kRand, Config(3.5f), 29),
        Spec("gqa3_bf16_d64", {3100}, 6, 2, 64, kBf, kTok, kRand, Config(3.5f), 30)),
    [](const testing::TestParamInfo<CaseSpec>& info) { return info.param.name; });

// Attention on caller-owned device tensors, as the prefill engine calls it: Q, K and V are slices
// of one fused [N, Hq + 2 Hkv, d] projection output, the output goes to its own buffer, with the
// caller's workspace and stream. The same kernels as the host-buffer backend, so the output and
// the head statistics equal the backend's bit for bit.
TEST(CudaBackendTest, DeviceViewsOfAFusedQkvMatchTheBackend) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (const bool sparse : {true, false}) {
    SCOPED_TRACE(sparse ? "sparse" : "dense");
    const CaseSpec spec = Spec("fused", {5000}, 8, 2, 128, kBf, kTok, kStruct,
                               sparse ? Config(12, 128, 8) : Config(INFINITY), 61);
    const int64_t n = spec.seq_lens[0];
    std::unique_ptr<TaskData> host = MakeTask(spec, n, 61);
    absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    ASSERT_TRUE((*backend)->Run({&host->task}).ok());
    ASSERT_TRUE(host->task.status.ok()) << host->task.status;

    const int heads = spec.hq + 2 * spec.hkv;
    const size_t row_bytes = static_cast<size_t>(spec.d) * ElementSize(spec.dtype);
    std::vector<uint8_t> fused(static_cast<size_t>(n) * heads * row_bytes);
    for (int64_t t = 0; t < n; ++t) {
      uint8_t* dst = fused.data() + static_cast<size_t>(t) * heads * row_bytes;
      std::memcpy(dst, host->qkv.q.data() + t * spec.hq * row_bytes, spec.hq * row_bytes);
      std::memcpy(dst + spec.hq * row_bytes, host->qkv.k.data() + t * spec.hkv * row_bytes,
                  spec.hkv * row_bytes);
      std::memcpy(dst + (spec.hq + spec.hkv) * row_bytes,
                  host->qkv.v.data() + t * spec.hkv * row_bytes, spec.hkv * row_bytes);
    }
    const AttentionShape shape{n, spec.hq, spec.hkv, spec.d};
    absl::StatusOr<int64_t> workspace_bytes =
        cuda::AttentionRunner::DeviceWorkspaceBytes(shape, spec.config, spec.dtype, {n});
    ASSERT_TRUE(workspace_bytes.ok()) << workspace_bytes.status();
    void* fused_device = nullptr;
    void* workspace = nullptr;
    ASSERT_EQ(cudaMalloc(&fused_device, fused.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&workspace, *workspace_bytes), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(fused_device, fused.data(), fused.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);

    cuda::DeviceTensors tensors;
    char* base = static_cast<char*>(fused_device);
    tensors.q = base;
    tensors.k = base + spec.hq * row_bytes;
    tensors.v = base + (spec.hq + spec.hkv) * row_bytes;
    cuda::DeviceSequence seq;
    seq.seq_len = n;
    seq.q_token_stride = int64_t{heads} * spec.d;
    seq.q_head_stride = spec.d;
    seq.kv_token_stride = int64_t{heads} * spec.d;
    seq.kv_head_stride = spec.d;
    tensors.seqs = {seq};
    // The output is written with q's strides: a fused-width buffer, NaN-poisoned (0xffff in bf16).
    void* out_fused = nullptr;
    ASSERT_EQ(cudaMalloc(&out_fused, fused.size()), cudaSuccess);
    ASSERT_EQ(cudaMemset(out_fused, 0xff, fused.size()), cudaSuccess);
    tensors.out = out_fused;

    absl::StatusOr<std::unique_ptr<cuda::AttentionRunner>> runner =
        cuda::AttentionRunner::Create(0);
    ASSERT_TRUE(runner.ok()) << runner.status();
    std::vector<HeadStats> stats;
    const AttentionProblem problem{shape, spec.dtype, spec.layout, spec.config};
    ASSERT_TRUE(
        (*runner)->RunOnDevice(problem, tensors, workspace, *workspace_bytes, stream, &stats).ok());
    ASSERT_EQ((*runner)->stream(), stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<uint8_t> got(fused.size());
    ASSERT_EQ(cudaMemcpy(got.data(), out_fused, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t differing_rows = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (std::memcmp(got.data() + static_cast<size_t>(t) * heads * row_bytes,
                      host->out.data() + t * spec.hq * row_bytes, spec.hq * row_bytes) != 0) {
        ++differing_rows;
      }
    }
    EXPECT_EQ(differing_rows, 0);
    ASSERT_EQ(stats.size(), host->task.head_stats.size());
    for (size_t h = 0; h < stats.size(); ++h) {
      EXPECT_EQ(stats[h].computed_entries, host->task.head_stats[h].computed_entries) << h;
      EXPECT_EQ(stats[h].stripes_total, host->task.head_stats[h].stripes_total) << h;
    }
    if (sparse) {  // the sparse path really ran: some head skipped keys
      int64_t computed = 0;
      for (const HeadStats& head : stats) computed += head.computed_entries;
      EXPECT_LT(computed, int64_t{spec.hq} * CausalEntries(n));
    }
    cudaStreamDestroy(stream);
    cudaFree(out_fused);
    cudaFree(fused_device);
    cudaFree(workspace);
  }
}

TEST(CudaBackendTest, DenseModeMatchesReference) {
  SKIP_WITHOUT_CUDA_DEVICE();
  AnchorConfig config = Config(12);
  config.mode = AttentionMode::kDense;
  RunAgainstReference(Spec("dense_mode", {2500, 1200}, 2, 1, 64, kFp, kHead, kRand, config, 31));
}

// Long N: the CPU backend (fp32) gives outputs and stripes; keys the two backends decide
// differently must have an fp64 margin within rounding of zero. Rows of disputed groups are
// skipped in the output comparison (their key sets differ legitimately).
TEST(CudaBackendTest, LongSequenceMatchesCpuBackend) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (const CaseSpec& spec :
       {Spec("long_16k_gqa4", {16384 + 200}, 4, 1, 128, kBf, kTok, kStruct, Config(12), 41),
        Spec("long_16k_fp16_d64", {16384}, 2, 2, 64, kFp, kHead, kStruct, Config(15), 42)}) {
    const int64_t n = spec.seq_lens[0];
    const std::string what = Describe(spec, n, spec.seed);
    std::unique_ptr<TaskData> gpu_task = MakeTask(spec, n, spec.seed);
    std::unique_ptr<TaskData> cpu_task = MakeTask(spec, n, spec.seed);

    absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    (*backend)->KeepStripesForTesting(true);
    AttentionTask* batch[] = {&gpu_task->task};
    ASSERT_TRUE((*backend)->Run(batch).ok());
    const CudaBackend::StripeSnapshot snapshot = (*backend)->LastStripesForTesting();

    cpu::ThreadPool pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    std::vector<std::vector<int64_t>> cpu_stripes;
    ASSERT_TRUE(
        cpu::RunCpuAttention(&cpu_task->task, &pool, cpu::SelectTileKernels(), &cpu_stripes).ok());

    const AttentionTask& task = gpu_task->task;
    const std::vector<std::vector<int64_t>> gpu = GpuStripes(snapshot, 0, task);
    LazyMargins margins(task);
    const StripeComparison cmp =
        CompareStripes(task, cpu_stripes, gpu,
                       [&](int h, int64_t g, int64_t key) { return margins.Margin(h, g, key); });
    EXPECT_EQ(cmp.wrong, 0) << what << ": " << cmp.wrong << " wrong of " << cmp.candidates
                            << "; first: " << cmp.first_wrong;
    ExpectStatsEqual(task.head_stats, StatsForStripes(task, gpu), what);
    CheckRowAnchors(snapshot, 0, task, what);

    // Outputs and LSE of rows whose (head, group) stripe sets agree.
    const int hq = spec.hq, d = spec.d;
    const int64_t ng = NumGroups(spec.config, n);
    const std::vector<float> got =
        ToFloats(gpu_task->out.data(), spec.dtype, gpu_task->out.size() / 2);
    const std::vector<float> want =
        ToFloats(cpu_task->out.data(), spec.dtype, cpu_task->out.size() / 2);
    const TensorStrides strides = StridesFor(spec.layout, n, hq, d);
    const double max_v =
        MaxAbs(gpu_task->qkv.v.data(), spec.dtype, static_cast<size_t>(n) * spec.hkv * d);
    int64_t compared = 0, bad = 0;
    std::string first_bad;
    for (int h = 0; h < hq; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        if (cmp.group_disputed[h * ng + i / spec.config.GroupSize()]) continue;
        for (int e = 0; e < d; ++e) {
          const int64_t at = i * strides.token + int64_t{h} * strides.head + e;
          const double tolerance = KernelOutputTolerance(spec.dtype, want[at], max_v) +
                                   OutputTolerance(spec.dtype, want[at]);
          ++compared;
          if (!(std::fabs(got[at] - want[at]) <= tolerance) && bad++ == 0) {
            first_bad = absl::StrCat("head ", h, " row ", i, " dim ", e, ": gpu ", got[at], " cpu ",
                                     want[at]);
          }
        }
        const float lse_gpu = gpu_task->lse[int64_t{h} * n + i];
        const float lse_cpu = cpu_task->lse[int64_t{h} * n + i];
        ++compared;
        if (!(std::fabs(lse_gpu - lse_cpu) <= 2 * LseTolerance(lse_cpu)) && bad++ == 0) {
          first_bad = absl::StrCat("lse head ", h, " row ", i, ": gpu ", lse_gpu, " cpu ", lse_cpu);
        }
      }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << compared << " values off; " << first_bad;
    EXPECT_GT(compared, 0);
    std::printf("  %s: selected %lld of %lld candidates, %lld disputed\n", what.c_str(),
                static_cast<long long>(cmp.selected), static_cast<long long>(cmp.candidates),
                static_cast<long long>(cmp.disputed));
  }
}

// K with every KV head repeated `repeat` times (KV head h of the result is head h / repeat of
// `qkv`): the same problem for repeat * Hkv KV heads.
std::vector<uint8_t> RepeatKvHeads(const HostQkv& qkv, int repeat) {
  const AttentionShape& s = qkv.shape;
  const int64_t element = static_cast<int64_t>(ElementSize(qkv.dtype));
  const TensorStrides from = StridesFor(qkv.layout, s.seq_len, s.num_kv_heads, s.head_dim);
  const TensorStrides to = StridesFor(qkv.layout, s.seq_len, s.num_kv_heads * repeat, s.head_dim);
  std::vector<uint8_t> k(qkv.k.size() * repeat);
  for (int64_t t = 0; t < s.seq_len; ++t) {
    for (int h = 0; h < s.num_kv_heads * repeat; ++h) {
      std::memcpy(k.data() + (t * to.token + h * to.head) * element,
                  qkv.k.data() + (t * from.token + (h / repeat) * from.head) * element,
                  s.head_dim * element);
    }
  }
  return k;
}

// Identification picks its kernels by shape (identification.h): for these GQA shapes the two-head
// anchor kernel and the wgmma stripe kernel, for the same problem run as MHA (every KV head
// repeated Hq / Hkv times) the one-head anchor kernel and the mma.sync stripe kernel. Both runs
// must give the same row anchors x(i) and per-tile pooling sums within fp32 rounding, and the
// same stripe sets except for keys whose fp64 margin lies within rounding of the threshold (the
// tolerance of the reference tests).
TEST(CudaBackendTest, IdentificationKernelsAgreeAcrossGqaDispatch) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (const CaseSpec& spec :
       {Spec("dispatch_gqa4_bf16_d128", {5000}, 8, 2, 128, kBf, kTok, kRand, Config(3.5f), 51),
        Spec("dispatch_gqa8_fp16_d64", {4500}, 16, 2, 64, kFp, kHead, kRand, Config(3.5f), 52),
        Spec("dispatch_gqa2_step20_bf16_d64", {6100}, 4, 2, 64, kBf, kTok, kStruct,
             Config(12, 100, 20), 53)}) {
    const int64_t n = spec.seq_lens[0];
    const std::string what = Describe(spec, n, spec.seed);
    std::unique_ptr<TaskData> data = MakeTask(spec, n, spec.seed);
    const AttentionTask& task = data->task;
    const int repeat = spec.hq / spec.hkv;

    struct Identified {
      std::vector<float> row_anchor;  // [Hq, N]
      std::vector<double>
          tile_sums;  // [anchor tiles, Hq, d] q sums, then [anchor tiles, Hq] x sums
      int64_t qsum_count = 0;
      int pooled_rows = 0;
      std::vector<std::vector<int64_t>> stripes;
    };
    // The anchor and stripe stages with `num_kv_heads` KV heads holding `k`.
    auto identify = [&](int num_kv_heads, const std::vector<uint8_t>& k, Identified* out) {
      absl::StatusOr<std::unique_ptr<cuda::AttentionRunner>> runner_or =
          cuda::AttentionRunner::Create(0);
      ASSERT_TRUE(runner_or.ok()) << runner_or.status();
      cuda::AttentionRunner& runner = **runner_or;
      cuda::BatchPlanRequest request;
      request.seq_lens = {n};
      request.num_q_heads = spec.hq;
      request.num_kv_heads = num_kv_heads;
      request.head_dim = spec.d;
      request.layout = spec.layout;
      request.config = spec.config;
      ASSERT_TRUE(runner.Prepare(request, spec.dtype, /*keep_row_anchor=*/true).ok()) << what;
      ASSERT_EQ(
          cudaMemcpy(runner.q(), data->qkv.q.data(), data->qkv.q.size(), cudaMemcpyHostToDevice),
          cudaSuccess);
      ASSERT_EQ(cudaMemcpy(runner.k(), k.data(), k.size(), cudaMemcpyHostToDevice), cudaSuccess);
      const cuda::IdentificationParams p = runner.identification_params();
      const cudaStream_t stream = runner.stream();
      out->pooled_rows = p.pooled_rows;
      out->qsum_count = int64_t{p.num_anchor_tiles} * spec.hq * spec.d;
      const int64_t xsum_count = int64_t{p.num_anchor_tiles} * spec.hq;
      // Poison x(i) and the tile sums (0xff bytes: NaN) so that rows a kernel skips fail.
      ASSERT_EQ(cudaMemsetAsync(p.maybe_row_anchor, 0xff,
                                runner.plan().lse_elements * sizeof(float), stream),
                cudaSuccess);
      ASSERT_EQ(cudaMemsetAsync(p.tile_qsum, 0xff, out->qsum_count * sizeof(double), stream),
                cudaSuccess);
      ASSERT_EQ(cudaMemsetAsync(p.tile_xsum, 0xff, xsum_count * sizeof(double), stream),
                cudaSuccess);
      ASSERT_TRUE(runner.RunAnchorStage().ok()) << what;
      ASSERT_TRUE(runner.CopyRowAnchor(&out->row_anchor).ok());  // synchronizes the stream
      out->tile_sums.resize(out->qsum_count + xsum_count);
      ASSERT_EQ(cudaMemcpy(out->tile_sums.data(), p.tile_qsum, out->qsum_count * sizeof(double),
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(out->tile_sums.data() + out->qsum_count, p.tile_xsum,
                           xsum_count * sizeof(double), cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_TRUE(runner.RunStripeStage().ok()) << what;
      CudaBackend::StripeSnapshot snapshot;
      snapshot.plan = runner.plan();
      ASSERT_TRUE(runner.CopyStripeLists(&snapshot.counts, &snapshot.index).ok());
      out->stripes = GpuStripes(snapshot, 0, task);
    };
    Identified gqa, mha;
    identify(spec.hkv, data->qkv.k, &gqa);
    identify(spec.hq, RepeatKvHeads(data->qkv, repeat), &mha);
    if (HasFatalFailure()) return;
    // Two heads per anchor CTA need an even GQA ratio; the wgmma stripe kernel needs the
    // 16-row units of pooled queries of one KV head to come in fours.
    const int row_tiles = gqa.pooled_rows / cuda::kPooledRowTile;
    ASSERT_EQ(repeat % 2, 0) << what << ": the GQA run must take the two-head anchor kernel";
    ASSERT_EQ(repeat * row_tiles % 4, 0) << what << ": the GQA run must take the wgmma kernel";
    ASSERT_NE(row_tiles % 4, 0) << what << ": the MHA run must take the mma.sync kernel";
    ASSERT_EQ(gqa.tile_sums.size(), mha.tile_sums.size());

    const double scale = spec.config.ScaleFor(spec.d);
    std::vector<double> anchor_tolerance(spec.hq);
    double max_anchor_tolerance = 0;
    for (int h = 0; h < spec.hq; ++h) {
      const std::vector<double> q =
          HeadRows(task.q, task.dtype, task.layout, n, spec.hq, spec.d, h);
      const std::vector<double> k =
          HeadRows(task.k, task.dtype, task.layout, n, spec.hkv, spec.d, h / repeat);
      anchor_tolerance[h] = 2e-5 * scale * MaxRowNorm(q, spec.d) * MaxRowNorm(k, spec.d) + 1e-6;
      max_anchor_tolerance = std::max(max_anchor_tolerance, anchor_tolerance[h]);
    }
    // q sums are exact in fp64 (<= 128 half-precision terms); x sums add <= 128 anchors that
    // may each differ by the anchor tolerance.
    int64_t bad_sums = 0;
    for (size_t i = 0; i < gqa.tile_sums.size(); ++i) {
      const double want = gqa.tile_sums[i];
      const double tolerance = static_cast<int64_t>(i) < gqa.qsum_count
                                   ? 1e-9 * (1 + std::fabs(want))
                                   : 128 * max_anchor_tolerance;
      if (!(std::fabs(mha.tile_sums[i] - want) <= tolerance)) ++bad_sums;
    }
    EXPECT_EQ(bad_sums, 0) << what << ": per-tile pooling sums differ between the anchor kernels";
    int64_t bad = 0;
    std::string first_bad;
    for (int h = 0; h < spec.hq; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        const double want = gqa.row_anchor[h * n + i];
        const double value = mha.row_anchor[h * n + i];
        if (!(std::fabs(value - want) <= anchor_tolerance[h]) && bad++ == 0) {
          first_bad = absl::StrCat("head ", h, " row ", i, ": ", value, " vs ", want);
        }
      }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad
                      << " anchors differ between the anchor kernels; first: " << first_bad;

    // The stripe kernels read different (equally valid) pooled anchors; the margin tolerance
    // covers that.
    LazyMargins margins(task);
    const StripeComparison cmp =
        CompareStripes(task, gqa.stripes, mha.stripes,
                       [&](int h, int64_t g, int64_t key) { return margins.Margin(h, g, key); });
    EXPECT_EQ(cmp.wrong, 0) << what << ": " << cmp.wrong
                            << " stripe decisions differ beyond rounding; first: "
                            << cmp.first_wrong;
    std::printf("  %s: selected %lld of %lld, %lld differ within rounding\n", what.c_str(),
                static_cast<long long>(cmp.selected), static_cast<long long>(cmp.candidates),
                static_cast<long long>(cmp.disputed));
    EXPECT_GT(NumGroups(spec.config, n), 2) << what << ": the case needs groups with candidates";
  }
}

// Mass targets (spec section 8): every (head, group) threshold the GPU picks is one the fp64
// reference's estimate allows, its kept keys are the candidates within that threshold, the
// outputs and LSE are exact for those keys, and the per-head mass statistics add up. The CPU
// backend, which defines the semantics, picks the same thresholds on (nearly) every group.
struct MassSpec {
  CaseSpec base;
  float target = 0.95f;
  float density_cap = 1.0f;
  float min_theta = 0.0f;
};

MassSpec Mass(std::string name, std::vector<int64_t> lens, int hq, int hkv, int d, DType dtype,
              Layout layout, InputKind kind, float target, int block, int step, uint64_t seed) {
  AnchorConfig config = Config(-kInf, block, step);  // theta is unused with a mass target
  config.mass_target = target;
  MassSpec spec{
      Spec(std::move(name), std::move(lens), hq, hkv, d, dtype, layout, kind, config, seed),
      target};
  if (config.GroupSize() < 2048) {
    spec.base.local_window = 32;
    spec.base.needle_query_rows = 16;
  }
  return spec;
}

void PrintTo(const MassSpec& spec, std::ostream* os) { *os << spec.base.name; }

void RunMassAgainstReference(const MassSpec& mass) {
  CaseSpec spec = mass.base;
  spec.config.mass_target = mass.target;
  spec.config.mass_density_cap = mass.density_cap;
  spec.config.mass_min_theta = mass.min_theta;
  absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  (*backend)->KeepStripesForTesting(true);
  std::vector<std::unique_ptr<TaskData>> tasks;
  const std::vector<AttentionTask*> batch = MakeBatch(spec, &tasks);
  ASSERT_TRUE((*backend)->CanRun(ProblemOf(*batch[0])).ok());
  const absl::Status status = (*backend)->Run(batch);
  ASSERT_TRUE(status.ok()) << status;
  const CudaBackend::StripeSnapshot snapshot = (*backend)->LastStripesForTesting();
  ASSERT_EQ(snapshot.mass_theta.size(), snapshot.counts.size());

  for (size_t t = 0; t < tasks.size(); ++t) {
    const AttentionTask& task = tasks[t]->task;
    const int64_t n = task.shape.seq_len;
    const std::string what =
        absl::StrCat(Describe(spec, n, spec.seed + 1000 * t), " p=", mass.target,
                     " cap=", mass.density_cap, " min_theta=", mass.min_theta);
    SCOPED_TRACE(what);
    ASSERT_TRUE(task.status.ok()) << task.status;
    const ReferenceResult ref = ReferenceAttend(task);
    const std::vector<std::vector<int64_t>> gpu = GpuStripes(snapshot, t, task);
    const int hq = task.shape.num_q_heads;
    const int64_t ng = ref.num_groups;
    const int64_t group_begin = snapshot.plan.seqs[t].group_begin;

    // The CPU backend on the same inputs, with its thresholds.
    std::unique_ptr<TaskData> cpu_task = MakeTask(spec, n, spec.seed + 1000 * t);
    cpu::ThreadPool pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    std::vector<std::vector<int64_t>> cpu_stripes;
    std::vector<float> cpu_thetas;
    ASSERT_TRUE(cpu::RunCpuAttention(&cpu_task->task, &pool, cpu::SelectTileKernels(), &cpu_stripes,
                                     &cpu_thetas)
                    .ok());

    int64_t groups = 0, same_as_reference = 0, same_as_cpu = 0, kept = 0, candidates = 0;
    int64_t keys_differing_from_cpu = 0;
    for (int h = 0; h < hq; ++h) {
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t hg = h * ng + g;
        const float theta = snapshot.mass_theta[(group_begin + g) * hq + h];
        const std::vector<double>& margins = ref.pooled_margins[hg];
        SCOPED_TRACE(absl::StrCat("head ", h, " group ", g));
        if (margins.empty()) {
          EXPECT_TRUE(gpu[hg].empty());
          EXPECT_TRUE(std::isnan(theta)) << theta;
          continue;
        }
        ++groups;
        same_as_reference += static_cast<double>(theta) == ref.group_theta[hg];
        EXPECT_TRUE(ValidMassChoice(task.config, theta, ref.mass_estimate[hg],
                                    ref.mass_kept_keys[hg], margins));
        const GroupRanges geo = GroupRangesOf(task.config, n, g);
        EXPECT_TRUE(KeptKeysMatchTheta(theta, geo.cand_begin, margins, gpu[hg]));
        if (theta == cpu_thetas[hg]) {
          ++same_as_cpu;
          std::vector<int64_t> differ;
          std::set_symmetric_difference(gpu[hg].begin(), gpu[hg].end(), cpu_stripes[hg].begin(),
                                        cpu_stripes[hg].end(), std::back_inserter(differ));
          keys_differing_from_cpu += static_cast<int64_t>(differ.size());
        }
        kept += static_cast<int64_t>(gpu[hg].size());
        candidates += static_cast<int64_t>(margins.size());
      }
    }
    // Disagreements about the threshold itself are rare ties of the estimate with the target.
    EXPECT_GE(same_as_reference, groups * 9 / 10) << same_as_reference << " of " << groups;
    EXPECT_GE(same_as_cpu, groups * 9 / 10) << same_as_cpu << " of " << groups;
    std::printf(
        "  %s: kept %lld of %lld candidates; threshold as the reference on %lld of %lld groups, "
        "as the cpu backend on %lld (%lld keys differ there, margins within rounding)\n",
        what.c_str(), static_cast<long long>(kept), static_cast<long long>(candidates),
        static_cast<long long>(same_as_reference), static_cast<long long>(groups),
        static_cast<long long>(same_as_cpu), static_cast<long long>(keys_differing_from_cpu));

    // Outputs and LSE against the reference on the GPU's own key sets.
    const ReferenceResult exact = ReferenceAttendWithStripes(task, gpu);
    const ErrorStats out_error = CompareOutput(task, exact);
    EXPECT_TRUE(out_error.ok()) << "output: " << out_error.ToString();
    const ErrorStats lse_error = CompareLseToReference(task.maybe_lse, exact);
    EXPECT_TRUE(lse_error.ok()) << "lse: " << lse_error.ToString();
    ExpectStatsEqual(task.head_stats, StatsForStripes(task, gpu), "own stripes");
    for (int h = 0; h < hq; ++h) {
      SCOPED_TRACE(absl::StrCat("head ", h));
      const HeadStats& got = task.head_stats[h];
      const HeadStats& expected = ref.head_stats[h];
      EXPECT_EQ(got.mass_groups + got.mass_full_groups, got.stripe_groups);
      if (got.mass_groups == expected.mass_groups &&
          got.mass_full_groups == expected.mass_full_groups &&
          got.mass_theta_sum == expected.mass_theta_sum) {
        EXPECT_NEAR(got.estimated_mass_sum, expected.estimated_mass_sum,
                    kMassEstimateSlack * static_cast<double>(n));
        EXPECT_EQ(got.mass_theta_min, expected.mass_theta_min);
        EXPECT_EQ(got.mass_theta_max, expected.mass_theta_max);
      }
      EXPECT_GT(got.estimated_mass_sum, 0.0);
      EXPECT_LE(got.estimated_mass_sum, static_cast<double>(n) * (1 + 1e-6));
    }
  }
}

class CudaMassTargetTest : public testing::TestWithParam<MassSpec> {};

TEST_P(CudaMassTargetTest, MatchesReferenceAndCpuBackend) {
  SKIP_WITHOUT_CUDA_DEVICE();
  RunMassAgainstReference(GetParam());
}

std::vector<MassSpec> MassSpecs() {
  std::vector<MassSpec> specs;
  uint64_t seed = 700;
  for (float p : {0.5f, 0.9f, 0.95f, 0.99f, 1.0f}) {
    specs.push_back(
        Mass(absl::StrCat("p", p), {700}, 4, 1, 64, kBf, kTok, kStruct, p, 16, 4, seed++));
  }
  // A batch of two lengths, fp16, GQA 2, d 128; GQA 7 (a partial last pass); MHA head-major.
  specs.push_back(
      Mass("batch_fp16_gqa2", {2600, 1500}, 4, 2, 128, kFp, kTok, kStruct, 0.95f, 16, 4, seed++));
  specs.push_back(Mass("gqa7", {1800}, 7, 1, 128, kBf, kTok, kStruct, 0.9f, 16, 4, seed++));
  specs.push_back(
      Mass("mha_head_major", {900}, 2, 2, 64, kBf, kHead, kStruct, 0.95f, 16, 4, seed++));
  // Random inputs: broad score distributions where most candidates carry some mass.
  specs.push_back(Mass("random", {800}, 2, 1, 64, kFp, kTok, kRand, 0.95f, 16, 4, seed++));
  // step 8 (rows 8..15 of each head's tile are padding) and the default geometry.
  specs.push_back(Mass("step8", {1500}, 4, 1, 64, kBf, kTok, kStruct, 0.9f, 32, 8, seed++));
  specs.push_back(
      Mass("default_geometry", {9000}, 4, 1, 128, kBf, kTok, kStruct, 0.95f, 128, 16, seed++));
  // A density cap many groups exceed; minimum thresholds above and below zero.
  specs.push_back(Mass("cap", {700}, 4, 1, 64, kBf, kTok, kStruct, 0.95f, 16, 4, seed++));
  specs.back().density_cap = 0.05f;
  specs.push_back(Mass("min_theta3", {700}, 4, 1, 64, kBf, kTok, kStruct, 0.9f, 16, 4, seed++));
  specs.back().min_theta = 3.0f;
  specs.push_back(Mass("min_theta_neg", {700}, 4, 1, 64, kBf, kTok, kStruct, 0.9f, 16, 4, seed++));
  specs.back().min_theta = -2.0f;
  return specs;
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaMassTargetTest, testing::ValuesIn(MassSpecs()),
                         [](const testing::TestParamInfo<MassSpec>& info) {
                           std::string name = info.param.base.name;
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

TEST(CudaBackendTest, MassTargetWithStepOver16IsFailedPrecondition) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  MassSpec spec = Mass("step32", {4096}, 4, 1, 64, kBf, kTok, kRand, 0.9f, 16, 32, 81);
  std::unique_ptr<TaskData> data = MakeTask(spec.base, 4096, 81);
  const absl::Status status = (*backend)->CanRun(ProblemOf(data->task));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_NE(status.message().find("config.step"), std::string::npos) << status;
  data->task.config.step = 16;
  EXPECT_TRUE((*backend)->CanRun(ProblemOf(data->task)).ok());
}

TEST(CudaBackendTest, InfoAndSupports) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const BackendInfo info = (*backend)->Info();
  EXPECT_EQ(info.name, "cuda");
  EXPECT_FALSE(info.device.empty());

  CaseSpec spec = Spec("fp32", {64}, 2, 1, 64, kBf, kTok, kRand, Config(12), 51);
  std::unique_ptr<TaskData> data = MakeTask(spec, 64, 51);
  EXPECT_TRUE((*backend)->CanRun(ProblemOf(data->task)).ok());
  data->task.dtype = DType::kFp32;
  const absl::Status fp32 = (*backend)->CanRun(ProblemOf(data->task));
  EXPECT_EQ(fp32.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(fp32.message().find("dtype"), std::string::npos) << fp32;
  data->task.dtype = DType::kBf16;
  data->task.shape.head_dim = 96;
  EXPECT_EQ((*backend)->CanRun(ProblemOf(data->task)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(info.head_dims, (std::vector<int>{64, 128}));
  EXPECT_EQ(info.dtypes, (std::vector<DType>{DType::kBf16, DType::kFp16}));

  EXPECT_FALSE(CreateCudaBackend(CudaDeviceCount()).ok());
}

TEST(CudaBackendTest, CancelledTaskIsSkipped) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  CaseSpec spec = Spec("cancel", {512}, 2, 1, 64, kBf, kTok, kRand, Config(3.5f), 61);
  std::unique_ptr<TaskData> kept = MakeTask(spec, 512, 61);
  std::unique_ptr<TaskData> dropped = MakeTask(spec, 300, 62);
  std::atomic<bool> cancelled{true};
  dropped->task.maybe_cancelled = &cancelled;
  AttentionTask* batch[] = {&kept->task, &dropped->task};
  ASSERT_TRUE((*backend)->Run(batch).ok());
  EXPECT_EQ(dropped->task.status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(kept->task.status.ok());
  const ReferenceResult ref = ReferenceAttend(kept->task);
  const ErrorStats error = CompareOutput(kept->task, ref);
  EXPECT_TRUE(error.ok()) << error.ToString();
}

// Page-aligned host memory of whole pages, as the server's buffer cache pins it.
class PageBlock {
 public:
  explicit PageBlock(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_ = (bytes + page - 1) / page * page;
    data_ = static_cast<char*>(std::aligned_alloc(page, size_));
  }
  ~PageBlock() { std::free(data_); }
  PageBlock(const PageBlock&) = delete;
  PageBlock& operator=(const PageBlock&) = delete;
  char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  size_t size_ = 0;
  char* data_ = nullptr;
};

TEST(CudaBackendTest, PinnedHostRangesContainOnlyWhatWasPinned) {
  SKIP_WITHOUT_CUDA_DEVICE();
  cuda::PinnedHostRanges ranges(0);
  PageBlock block(3 << 20);
  ASSERT_TRUE(ranges.Pin(block.data(), block.size()));
  cudaPointerAttributes attributes{};
  ASSERT_EQ(cudaPointerGetAttributes(&attributes, block.data() + 12345), cudaSuccess);
  EXPECT_EQ(attributes.type, cudaMemoryTypeHost);  // registered with the driver
  EXPECT_TRUE(ranges.Contains(block.data(), static_cast<int64_t>(block.size())));
  EXPECT_TRUE(ranges.Contains(block.data() + 100, 1 << 20));
  EXPECT_FALSE(ranges.Contains(block.data() + 100, static_cast<int64_t>(block.size())));
  EXPECT_FALSE(ranges.Contains(block.data() - 1, 2));
  EXPECT_EQ(ranges.pinned_bytes(), static_cast<int64_t>(block.size()));
  ranges.Unpin(block.data());
  EXPECT_FALSE(ranges.Contains(block.data(), 1));
  EXPECT_EQ(ranges.pinned_bytes(), 0);
}

// The direct copies of pinned buffers give the staged copies' output, bit for bit.
TEST(CudaBackendTest, PinnedHostBuffersGiveTheSameOutputAsPageable) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  HostMemoryPinner* pinner = (*backend)->host_memory_pinner();
  ASSERT_NE(pinner, nullptr);
  CaseSpec spec = Spec("pinned", {3000}, 4, 2, 128, kBf, kTok, kStruct, Config(12), 91);
  std::unique_ptr<TaskData> pageable = MakeTask(spec, 3000, 91);
  AttentionTask* pageable_batch[] = {&pageable->task};
  ASSERT_TRUE((*backend)->Run(pageable_batch).ok());
  ASSERT_TRUE(pageable->task.status.ok()) << pageable->task.status;
  const ReferenceResult ref = ReferenceAttend(pageable->task);
  const ErrorStats error = CompareOutput(pageable->task, ref);
  ASSERT_TRUE(error.ok()) << error.ToString();

  // q, k and v in one block (as in a request buffer), the output in another; both pinned.
  std::unique_ptr<TaskData> pinned = MakeTask(spec, 3000, 91);
  const size_t q_bytes = pinned->qkv.q.size();
  const size_t kv_bytes = pinned->qkv.k.size();
  const size_t out_bytes = pinned->out.size();
  PageBlock inputs(q_bytes + 2 * kv_bytes);
  PageBlock output(out_bytes);
  std::memcpy(inputs.data(), pinned->qkv.q.data(), q_bytes);
  std::memcpy(inputs.data() + q_bytes, pinned->qkv.k.data(), kv_bytes);
  std::memcpy(inputs.data() + q_bytes + kv_bytes, pinned->qkv.v.data(), kv_bytes);
  std::memcpy(output.data(), pinned->out.data(), out_bytes);  // NaN-poisoned
  ASSERT_TRUE(pinner->Pin(inputs.data(), inputs.size()));
  ASSERT_TRUE(pinner->Pin(output.data(), output.size()));
  pinned->task.q = inputs.data();
  pinned->task.k = inputs.data() + q_bytes;
  pinned->task.v = inputs.data() + q_bytes + kv_bytes;
  pinned->task.out = output.data();
  AttentionTask* pinned_batch[] = {&pinned->task};
  const absl::Status run = (*backend)->Run(pinned_batch);
  pinner->Unpin(inputs.data());
  pinner->Unpin(output.data());
  ASSERT_TRUE(run.ok()) << run;
  ASSERT_TRUE(pinned->task.status.ok()) << pinned->task.status;
  EXPECT_EQ(std::memcmp(output.data(), pageable->out.data(), out_bytes), 0);
  EXPECT_EQ(pinned->lse, pageable->lse);
}

TEST(CudaBackendTest, MismatchedBatchIsRejected) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  CaseSpec spec = Spec("mismatch", {128}, 2, 1, 64, kBf, kTok, kRand, Config(12), 71);
  std::unique_ptr<TaskData> a = MakeTask(spec, 128, 71);
  std::unique_ptr<TaskData> b = MakeTask(spec, 128, 72);
  b->task.config.theta = 5;
  AttentionTask* batch[] = {&a->task, &b->task};
  EXPECT_EQ((*backend)->Run(batch).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace anchorserve
