// The CPU backend against the fp64 reference of the spec.
#include "kernels/cpu/cpu_backend.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tile_kernels.h"
#include "kernels/structured_inputs.h"
#include "tests/test_util/compare.h"
#include "tests/test_util/reference.h"

namespace anchorserve {
namespace {

struct Case {
  int64_t seq_len;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  DType dtype;
  Layout layout;
  int block_size = 16;
  int step = 4;  // G = 64
  float theta = 2.5f;
  uint64_t seed = 1;
  bool structured = false;  // structured inputs instead of i.i.d. normal
  int init_groups = 1;
  int local_groups = 1;

  std::string Name() const {
    return absl::StrCat(
        "N", seq_len, "_Hq", num_q_heads, "_Hkv", num_kv_heads, "_d", head_dim, "_",
        std::string(DTypeName(dtype)), layout == Layout::kTokenMajor ? "_tok" : "_head", "_B",
        block_size, "s", step, "_init", init_groups, "loc", local_groups, "_theta",
        static_cast<int>(theta * 10), structured ? "_structured" : "_random", "_seed", seed);
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

// Inputs plus an output buffer poisoned with NaN and a bound task.
struct Problem {
  HostQkv qkv;
  std::vector<uint8_t> out;
  std::vector<float> lse;
  AttentionTask task;
};

void MakeProblem(const Case& c, Problem* p) {
  const AttentionShape shape{c.seq_len, c.num_q_heads, c.num_kv_heads, c.head_dim};
  if (c.structured) {
    StructuredInputOptions options;
    options.seed = c.seed;
    p->qkv = *GenerateStructuredQkv(shape, c.dtype, c.layout, options);
  } else {
    p->qkv = *GenerateRandomQkv(shape, c.dtype, c.layout, c.seed);
  }
  const size_t out_elements = static_cast<size_t>(c.seq_len) * c.num_q_heads * c.head_dim;
  p->out.resize(out_elements * ElementSize(c.dtype));
  FillWithNaN(p->out.data(), c.dtype, out_elements);
  p->lse.assign(static_cast<size_t>(c.seq_len) * c.num_q_heads,
                std::numeric_limits<float>::quiet_NaN());
  p->task = AttentionTask{};
  BindInputs(p->qkv, &p->task);
  p->task.out = p->out.data();
  p->task.maybe_lse = p->lse.data();
  p->task.config.block_size = c.block_size;
  p->task.config.step = c.step;
  p->task.config.theta = c.theta;
  p->task.config.init_groups = c.init_groups;
  p->task.config.local_groups = c.local_groups;
}

void ExpectStatsEqual(const std::vector<HeadStats>& got, const std::vector<HeadStats>& expected) {
  ASSERT_EQ(got.size(), expected.size());
  for (size_t h = 0; h < got.size(); ++h) {
    SCOPED_TRACE(absl::StrCat("head ", h));
    EXPECT_EQ(got[h].computed_entries, expected[h].computed_entries);
    EXPECT_EQ(got[h].stripe_entries, expected[h].stripe_entries);
    EXPECT_EQ(got[h].stripe_groups, expected[h].stripe_groups);
    EXPECT_EQ(got[h].stripes_total, expected[h].stripes_total);
    EXPECT_EQ(got[h].stripes_min, expected[h].stripes_min);
    EXPECT_EQ(got[h].stripes_max, expected[h].stripes_max);
  }
}

// fp32 identification may flip keys whose fp64 margin is this close to the threshold (nats):
// scores of O(10) nats carry fp32 rounding of about 1e-5 from the dot product, the pooled
// means and the anchors.
constexpr double kMarginSlack = 2e-3;

// Runs the CPU attention on `c` with `kernels` and checks outputs, LSE, stripe sets and stats
// against the reference. Returns the fraction of candidates selected (for callers that want the
// case to be non-trivial).
double CheckAgainstReference(const Case& c, const cpu::TileKernels& kernels, int threads) {
  SCOPED_TRACE(absl::StrCat(c.Name(), " kernels=", kernels.name, " threads=", threads));
  Problem p;
  MakeProblem(c, &p);
  cpu::ThreadPool pool(threads);
  std::vector<std::vector<int64_t>> stripes;
  const absl::Status status = cpu::RunCpuAttention(&p.task, &pool, kernels, &stripes);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_TRUE(p.task.status.ok()) << p.task.status;

  const ReferenceResult ref = ReferenceAttend(p.task);
  int64_t candidates = 0, selected = 0;
  if (!p.task.config.IsDense()) {
    EXPECT_EQ(stripes.size(), ref.stripes.size());
    // Equal sets except keys whose reference margin sits within fp32 rounding of the threshold.
    for (size_t hg = 0; hg < ref.stripes.size() && hg < stripes.size(); ++hg) {
      const std::vector<double>& margins = ref.stripe_margins[hg];
      candidates += static_cast<int64_t>(margins.size());
      selected += static_cast<int64_t>(ref.stripes[hg].size());
      if (margins.empty()) {
        EXPECT_TRUE(stripes[hg].empty()) << "stripes in a group without candidates";
        continue;
      }
      const int64_t g = static_cast<int64_t>(hg) % ref.num_groups;
      const int64_t cand_begin = int64_t{c.init_groups} * c.block_size * c.step;
      std::vector<bool> in_backend(margins.size(), false);
      for (int64_t key : stripes[hg]) {
        const bool in_candidates =
            key >= cand_begin && key - cand_begin < static_cast<int64_t>(margins.size());
        EXPECT_TRUE(in_candidates) << "group " << g << " key " << key;
        if (in_candidates) in_backend[key - cand_begin] = true;
      }
      for (size_t j = 0; j < margins.size(); ++j) {
        const bool in_reference = margins[j] >= 0;
        if (in_backend[j] != in_reference) {
          EXPECT_LT(std::fabs(margins[j]), kMarginSlack)
              << "group " << g << " key " << cand_begin + static_cast<int64_t>(j) << " margin "
              << margins[j] << " backend " << in_backend[j];
        }
      }
    }
  }
  // Outputs against the reference evaluated on the backend's own stripe sets (identical to
  // `ref` unless a key sat on the threshold).
  const ReferenceResult exact = p.task.config.IsDense() || stripes == ref.stripes
                                    ? ref
                                    : ReferenceAttendWithStripes(p.task, stripes);
  const ErrorStats out_errors = CompareToReference(p.task, exact);
  EXPECT_TRUE(out_errors.ok()) << "out: " << out_errors.ToString();
  const ErrorStats lse_errors = CompareLseToReference(p.lse.data(), exact);
  EXPECT_TRUE(lse_errors.ok()) << "lse: " << lse_errors.ToString();
  ExpectStatsEqual(p.task.head_stats, exact.head_stats);
  return candidates > 0 ? static_cast<double>(selected) / static_cast<double>(candidates) : -1;
}

class CpuVsReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(CpuVsReferenceTest, MatchesReference) {
  CheckAgainstReference(GetParam(), cpu::SelectTileKernels(), 2);
}

std::vector<Case> SmallGroupCases() {
  std::vector<Case> cases;
  const DType dtypes[] = {DType::kBf16, DType::kFp16, DType::kFp32};
  const Layout layouts[] = {Layout::kTokenMajor, Layout::kHeadMajor};
  // Every dtype x layout, at lengths below, equal to and not a multiple of G = 64, and long
  // enough for several groups with candidates.
  const int64_t lengths[] = {40, 64, 200, 333};
  uint64_t seed = 100;
  for (DType dtype : dtypes) {
    for (Layout layout : layouts) {
      for (int64_t n : lengths) {
        cases.push_back({n, 4, 1, 64, dtype, layout});  // GQA 4
        cases.back().seed = seed++;
      }
    }
  }
  // GQA ratios 1 and 8, head dims 128 and odd ones, on the longer lengths.
  cases.push_back({333, 2, 2, 128, DType::kBf16, Layout::kTokenMajor});
  cases.push_back({333, 8, 1, 128, DType::kBf16, Layout::kHeadMajor});
  cases.push_back({257, 8, 1, 64, DType::kFp32, Layout::kTokenMajor});
  cases.push_back({300, 2, 1, 1, DType::kFp32, Layout::kTokenMajor});
  cases.push_back({300, 2, 1, 80, DType::kFp16, Layout::kHeadMajor});
  cases.push_back({200, 2, 1, 256, DType::kBf16, Layout::kTokenMajor});
  // Other region sizes and block shapes: 2 initial and 2 local groups; blocks that do not
  // divide the last group.
  Case wide{500, 2, 1, 64, DType::kBf16, Layout::kTokenMajor};
  wide.init_groups = 2;
  wide.local_groups = 2;
  cases.push_back(wide);
  Case odd_blocks{411, 4, 2, 64, DType::kFp32, Layout::kHeadMajor};
  odd_blocks.block_size = 24;
  odd_blocks.step = 3;
  cases.push_back(odd_blocks);
  Case no_init{300, 2, 1, 64, DType::kFp32, Layout::kTokenMajor};
  no_init.init_groups = 0;
  cases.push_back(no_init);
  // Structured inputs at the default threshold.
  Case structured{600, 4, 1, 128, DType::kBf16, Layout::kTokenMajor};
  structured.structured = true;
  structured.theta = 12.0f;
  cases.push_back(structured);
  for (size_t i = 0; i < cases.size(); ++i) cases[i].seed += 1000 * i;
  return cases;
}

INSTANTIATE_TEST_SUITE_P(SmallGroups, CpuVsReferenceTest, ::testing::ValuesIn(SmallGroupCases()),
                         [](const auto& info) { return info.param.Name(); });

// The default G = 2048 around one group: below, equal and not a multiple.
std::vector<Case> DefaultGroupCases() {
  std::vector<Case> cases;
  for (int64_t n : {2000, 2048, 2100}) {
    Case c{n, 2, 1, 128, DType::kBf16, Layout::kTokenMajor};
    c.block_size = 128;
    c.step = 16;
    c.theta = 12.0f;
    c.seed = static_cast<uint64_t>(n);
    cases.push_back(c);
  }
  cases[1].layout = Layout::kHeadMajor;
  cases[2].dtype = DType::kFp16;
  // Three groups: group 2 has candidates [2048, 4096); structured inputs make the selection a
  // proper subset at theta = 12.
  Case stripes{4500, 4, 1, 128, DType::kBf16, Layout::kTokenMajor};
  stripes.block_size = 128;
  stripes.step = 16;
  stripes.theta = 12.0f;
  stripes.structured = true;
  stripes.seed = 4500;
  cases.push_back(stripes);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DefaultGroup, CpuVsReferenceTest, ::testing::ValuesIn(DefaultGroupCases()),
                         [](const auto& info) { return info.param.Name(); });

// Every tile-kernel variant this CPU runs (the portable one always) on a case with stripes.
TEST(CpuKernelsTest, EveryVariantMatchesReference) {
  for (const cpu::TileKernels* kernels : cpu::SupportedTileKernels()) {
    for (Layout layout : {Layout::kTokenMajor, Layout::kHeadMajor}) {
      Case c{290, 4, 2, 96, DType::kFp32, layout};
      c.seed = 7;
      const double fraction = CheckAgainstReference(c, *kernels, 2);
      // theta chosen so that the selection is a proper subset: a test that can fail.
      EXPECT_GT(fraction, 0.05);
      EXPECT_LT(fraction, 0.95);
    }
  }
}

TEST(CpuKernelsTest, SelectionIsNonTrivialAtTestThreshold) {
  Case c{333, 4, 1, 64, DType::kBf16, Layout::kTokenMajor};
  const double fraction = CheckAgainstReference(c, cpu::SelectTileKernels(), 1);
  EXPECT_GT(fraction, 0.05);
  EXPECT_LT(fraction, 0.95);
}

TEST(CpuKernelsTest, ThreadCountDoesNotChangeResults) {
  Case c{333, 4, 2, 64, DType::kFp32, Layout::kTokenMajor};
  std::vector<uint8_t> outputs[2];
  std::vector<float> lses[2];
  for (int run = 0; run < 2; ++run) {
    Problem p;
    MakeProblem(c, &p);
    cpu::ThreadPool pool(run == 0 ? 1 : 3);
    ASSERT_TRUE(cpu::RunCpuAttention(&p.task, &pool, cpu::SelectTileKernels()).ok());
    outputs[run] = p.out;
    lses[run] = p.lse;
  }
  EXPECT_EQ(outputs[0], outputs[1]);
  EXPECT_EQ(lses[0], lses[1]);
}

// theta = +inf is dense attention: served by the dense kernel, equal to mode DENSE, and both
// equal to the reference's dense evaluation.
TEST(CpuDenseTest, InfiniteThetaEqualsDenseMode) {
  for (DType dtype : {DType::kBf16, DType::kFp32}) {
    Case c{700, 4, 2, 128, dtype, Layout::kHeadMajor};
    c.theta = std::numeric_limits<float>::infinity();
    Problem by_theta, by_mode;
    MakeProblem(c, &by_theta);
    MakeProblem(c, &by_mode);
    by_mode.task.config.theta = 12.0f;
    by_mode.task.config.mode = AttentionMode::kDense;
    auto backend = CreateCpuBackend(2);
    ASSERT_TRUE(backend.ok());
    // Different configs: one batch each (a batch shares AttentionBatchKey).
    ASSERT_TRUE((*backend)->Run({&by_theta.task}).ok());
    ASSERT_TRUE((*backend)->Run({&by_mode.task}).ok());
    EXPECT_EQ(by_theta.out, by_mode.out);
    EXPECT_EQ(by_theta.lse, by_mode.lse);
    const ReferenceResult ref = ReferenceAttend(by_mode.task);
    const ErrorStats errors = CompareToReference(by_mode.task, ref);
    EXPECT_TRUE(errors.ok()) << errors.ToString();
    const ErrorStats lse_errors = CompareLseToReference(by_mode.lse.data(), ref);
    EXPECT_TRUE(lse_errors.ok()) << lse_errors.ToString();
    for (const HeadStats& stats : by_mode.task.head_stats) {
      EXPECT_EQ(stats.computed_entries, CausalEntries(c.seq_len));
      EXPECT_EQ(stats.stripe_entries, 0);
      EXPECT_EQ(stats.stripe_groups, 0);
    }
    ExpectStatsEqual(by_theta.task.head_stats, by_mode.task.head_stats);
  }
}

TEST(CpuDenseTest, DenseModeMatchesReferenceAcrossShapes) {
  for (int64_t n : {1, 5, 64, 130, 517}) {
    Case c{n, 3, 1, 64, DType::kFp16, Layout::kTokenMajor};
    c.seed = static_cast<uint64_t>(n);
    Problem p;
    MakeProblem(c, &p);
    p.task.config.mode = AttentionMode::kDense;
    auto backend = CreateCpuBackend(2);
    ASSERT_TRUE(backend.ok());
    ASSERT_TRUE((*backend)->Run({&p.task}).ok());
    const ReferenceResult ref = ReferenceAttend(p.task);
    const ErrorStats errors = CompareToReference(p.task, ref);
    EXPECT_TRUE(errors.ok()) << "N=" << n << " " << errors.ToString();
    EXPECT_TRUE(CompareLseToReference(p.lse.data(), ref).ok()) << "N=" << n;
  }
}

// theta = -inf keeps the anchor region alone: no stripes, density = sum_i |A(i)|.
TEST(CpuAnchorTest, MinusInfiniteThetaIsAnchorRegionOnly) {
  Case c{333, 4, 2, 64, DType::kBf16, Layout::kTokenMajor};
  c.theta = -std::numeric_limits<float>::infinity();
  Problem p;
  MakeProblem(c, &p);
  auto backend = CreateCpuBackend(2);
  ASSERT_TRUE(backend.ok());
  ASSERT_TRUE((*backend)->Run({&p.task}).ok());
  const ReferenceResult ref = ReferenceAttend(p.task);
  EXPECT_TRUE(CompareToReference(p.task, ref).ok()) << CompareToReference(p.task, ref).ToString();
  EXPECT_TRUE(CompareLseToReference(p.lse.data(), ref).ok());
  // sum_i |A(i)| by hand: G = 64, n_init = n_loc = 1: rows of group 0 see [0, i]; rows i of
  // group g >= 1 see [0, 64) and [64 g, i].
  int64_t anchor_entries = 0;
  for (int64_t i = 0; i < c.seq_len; ++i) {
    const int64_t g = i / 64;
    anchor_entries += g == 0 ? i + 1 : 64 + (i - 64 * g + 1);
  }
  for (const HeadStats& stats : p.task.head_stats) {
    EXPECT_EQ(stats.computed_entries, anchor_entries);
    EXPECT_EQ(stats.stripe_entries, 0);
    EXPECT_EQ(stats.stripes_total, 0);
    EXPECT_EQ(stats.stripes_max, 0);
    EXPECT_EQ(stats.stripe_groups, 4);  // groups 2..5 have candidates
  }
  ExpectStatsEqual(p.task.head_stats, ref.head_stats);
}

// A tiny problem whose stripe sets are worked out by hand (see the comments), checking the
// stats the backend reports.
TEST(CpuAnchorTest, HandComputedStripesAndStats) {
  // N = 10, d = 4, B = 2, s = 1 (G = 2), n_init = n_loc = 1, scale 1, theta 0.5.
  // Every query is (1, 0, 0, 0) and key j is (a_j, 0, 0, 0), so s_ij = a_j and qbar = q.
  const float a[10] = {0, 0, 0.2f, -1, 0.1f, -0.6f, 0, 0, 0, 0};
  // A(i): group 0 rows see [0, i]; rows of group g >= 1 see [0, 2) and [2g, i].
  // Candidates C_g = [2, 2g): empty for g = 0, 1.
  // g = 2 (rows 4, 5): x = max(0, 0, a4) = 0.1 for both -> abar 0.1; C = {2, 3}: margins
  //   a_j - 0.1 = 0.1, -1.1 -> S_2 = {2}.
  // g = 3 (rows 6, 7): x = 0 -> abar 0; C = {2..5}: 0.2, -1, 0.1, -0.6 -> S_3 = {2, 4}.
  // g = 4 (rows 8, 9): abar 0; C = {2..7}: keys 2, 4, 6, 7 pass -> |S_4| = 4.
  const std::vector<std::vector<int64_t>> expected_stripes = {{}, {}, {2}, {2, 4}, {2, 4, 6, 7}};
  // sum |A(i)| = 1 + 2 + (3 + 4) * 4 = 31; stripe entries = (1 + 2 + 4) * 2 = 14.
  const int64_t n = 10;
  const int d = 4;
  std::vector<float> q(n * d, 0.0f), k(n * d, 0.0f), v(n * d);
  for (int64_t i = 0; i < n; ++i) {
    q[i * d] = 1.0f;
    k[i * d] = a[i];
    for (int e = 0; e < d; ++e) v[i * d + e] = static_cast<float>(i * 10 + e);
  }
  std::vector<float> out(n * d, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(n, std::numeric_limits<float>::quiet_NaN());
  AttentionTask task;
  task.shape = {n, 1, 1, d};
  task.dtype = DType::kFp32;
  task.layout = Layout::kTokenMajor;
  task.q = q.data();
  task.k = k.data();
  task.v = v.data();
  task.out = out.data();
  task.maybe_lse = lse.data();
  task.config.block_size = 2;
  task.config.step = 1;
  task.config.softmax_scale = 1.0f;
  task.config.theta = 0.5f;
  cpu::ThreadPool pool(2);
  std::vector<std::vector<int64_t>> stripes;
  ASSERT_TRUE(cpu::RunCpuAttention(&task, &pool, cpu::SelectTileKernels(), &stripes).ok());
  EXPECT_EQ(stripes, expected_stripes);
  ASSERT_EQ(task.head_stats.size(), 1u);
  const HeadStats& stats = task.head_stats[0];
  EXPECT_EQ(stats.computed_entries, 31 + 14);
  EXPECT_EQ(stats.stripe_entries, 14);
  EXPECT_EQ(stats.stripe_groups, 3);
  EXPECT_EQ(stats.stripes_total, 7);
  EXPECT_EQ(stats.stripes_min, 1);
  EXPECT_EQ(stats.stripes_max, 4);
  const ReferenceResult ref = ReferenceAttend(task);
  EXPECT_EQ(ref.stripes, expected_stripes);
  ExpectStatsEqual(task.head_stats, ref.head_stats);
  EXPECT_TRUE(CompareToReference(task, ref, 100.0).ok());
  // Row 9 by hand: keys A = {0, 1, 8, 9}, S = {2, 4, 6, 7}; scores a_j.
  double weights = 0, first = 0;
  for (int j : {0, 1, 8, 9, 2, 4, 6, 7}) {
    weights += std::exp(a[j]);
    first += std::exp(a[j]) * v[j * d];
  }
  EXPECT_NEAR(out[9 * d], first / weights, 1e-4);
  EXPECT_NEAR(lse[9], std::log(weights), 1e-5);
}

TEST(CpuBackendTest, CancelledTaskIsReportedAndSkipped) {
  Case c{333, 4, 1, 64, DType::kBf16, Layout::kTokenMajor};
  Problem p;
  MakeProblem(c, &p);
  std::atomic<bool> cancelled{true};
  p.task.maybe_cancelled = &cancelled;
  auto backend = CreateCpuBackend(2);
  ASSERT_TRUE(backend.ok());
  Problem other;
  MakeProblem(c, &other);
  ASSERT_TRUE((*backend)->Run({&p.task, &other.task}).ok());
  EXPECT_EQ(p.task.status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(other.task.status.ok());
  // The kernel itself stops too when the flag is set (checked between work items).
  Problem direct;
  MakeProblem(c, &direct);
  direct.task.maybe_cancelled = &cancelled;
  cpu::ThreadPool pool(2);
  ASSERT_TRUE(cpu::RunCpuAttention(&direct.task, &pool, cpu::SelectTileKernels()).ok());
  EXPECT_EQ(direct.task.status.code(), absl::StatusCode::kCancelled);
}

TEST(CpuBackendTest, RejectsInvalidTasks) {
  auto backend = CreateCpuBackend(1);
  ASSERT_TRUE(backend.ok());
  Case c{64, 4, 2, 64, DType::kFp32, Layout::kTokenMajor};
  {
    Problem p;
    MakeProblem(c, &p);
    p.task.out = nullptr;
    EXPECT_EQ((*backend)->Run({&p.task}).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    Problem p;
    MakeProblem(c, &p);
    p.task.shape.num_kv_heads = 3;
    EXPECT_EQ((*backend)->Run({&p.task}).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    Problem p;
    MakeProblem(c, &p);
    p.task.config.theta = std::numeric_limits<float>::quiet_NaN();
    EXPECT_EQ((*backend)->Run({&p.task}).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    Problem p;  // auto is resolved per sequence before a backend runs it
    MakeProblem(c, &p);
    p.task.config.mode = AttentionMode::kAuto;
    const absl::Status status = (*backend)->Run({&p.task});
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("config.mode auto"));
  }
  {
    Problem p;
    MakeProblem(c, &p);
    p.task.shape.head_dim = 300;
    EXPECT_EQ((*backend)->CanRun(ProblemOf(p.task)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*backend)->Run({&p.task}).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(CreateCpuBackend(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, InfoDescribesTheBackend) {
  auto backend = CreateCpuBackend(2);
  ASSERT_TRUE(backend.ok());
  const BackendInfo info = (*backend)->Info();
  EXPECT_EQ(info.name, "cpu");
  EXPECT_NE(info.device.find("2 threads"), std::string::npos) << info.device;
  EXPECT_EQ(info.dtypes.size(), 3u);
  EXPECT_FALSE(info.head_dims.empty());
  Case c{64, 4, 2, 200, DType::kFp16, Layout::kTokenMajor};
  Problem p;
  MakeProblem(c, &p);
  EXPECT_TRUE((*backend)->CanRun(ProblemOf(p.task)).ok());
}

TEST(CpuBackendTest, KernelVariantsCanBeForced) {
  for (const cpu::TileKernels* kernels : cpu::SupportedTileKernels()) {
    auto backend = CreateCpuBackendWithKernels(1, kernels->name);
    ASSERT_TRUE(backend.ok()) << kernels->name;
    EXPECT_NE((*backend)->Info().device.find(kernels->name), std::string::npos);
  }
  EXPECT_TRUE(CreateCpuBackendWithKernels(1, "portable").ok());
  EXPECT_EQ(CreateCpuBackendWithKernels(1, "sse9").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, TimesAreFilled) {
  Case c{333, 4, 1, 64, DType::kBf16, Layout::kTokenMajor};
  Problem p;
  MakeProblem(c, &p);
  auto backend = CreateCpuBackend(2);
  ASSERT_TRUE(backend.ok());
  ASSERT_TRUE((*backend)->Run({&p.task}).ok());
  EXPECT_GT(p.task.times.identification_seconds, 0.0);
  EXPECT_GT(p.task.times.compute_seconds, 0.0);
}

}  // namespace
}  // namespace anchorserve
