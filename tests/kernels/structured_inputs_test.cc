// The seeded structured Q/K/V generator: determinism, consistency across dtypes and layouts,
// and that its attention is sparser than i.i.d. Gaussian inputs' under AnchorAttention.
#include "kernels/structured_inputs.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/sparsity_stats.h"

namespace anchorserve {
namespace {

const AttentionShape kShape{600, 8, 2, 64};

TEST(StructuredInputsTest, DeterministicPerSeed) {
  StructuredInputOptions options;
  options.seed = 42;
  auto a = GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options);
  auto b = GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->q, b->q);
  EXPECT_EQ(a->k, b->k);
  EXPECT_EQ(a->v, b->v);
  EXPECT_EQ(a->head_kinds, b->head_kinds);
  options.seed = 43;
  auto c = GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->q, c->q);
  EXPECT_NE(a->k, c->k);
  EXPECT_NE(a->v, c->v);
  auto r1 = GenerateRandomQkv(kShape, DType::kFp16, Layout::kHeadMajor, 5);
  auto r2 = GenerateRandomQkv(kShape, DType::kFp16, Layout::kHeadMajor, 5);
  auto r3 = GenerateRandomQkv(kShape, DType::kFp16, Layout::kHeadMajor, 6);
  ASSERT_TRUE(r1.ok() && r2.ok() && r3.ok());
  EXPECT_EQ(r1->q, r2->q);
  EXPECT_NE(r1->q, r3->q);
  EXPECT_TRUE(r1->head_kinds.empty());
}

// The fp32 tensors rounded to bf16 are the bf16 tensors; head-major is token-major permuted.
TEST(StructuredInputsTest, ConsistentAcrossDTypesAndLayouts) {
  StructuredInputOptions options;
  options.seed = 3;
  auto fp32 = GenerateStructuredQkv(kShape, DType::kFp32, Layout::kTokenMajor, options);
  auto bf16 = GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options);
  auto head_major = GenerateStructuredQkv(kShape, DType::kFp32, Layout::kHeadMajor, options);
  ASSERT_TRUE(fp32.ok() && bf16.ok() && head_major.ok());
  const auto* f = reinterpret_cast<const float*>(fp32->k.data());
  const auto* b = reinterpret_cast<const uint16_t*>(bf16->k.data());
  const auto* hm = reinterpret_cast<const float*>(head_major->k.data());
  const int64_t n = kShape.seq_len;
  const int d = kShape.head_dim;
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < kShape.num_kv_heads; ++h) {
      for (int e = 0; e < d; ++e) {
        const int64_t token_major = (t * kShape.num_kv_heads + h) * d + e;
        ASSERT_EQ(FloatToBf16(f[token_major]), b[token_major]);
        ASSERT_EQ(f[token_major], hm[(h * n + t) * d + e]);
        ASSERT_TRUE(std::isfinite(f[token_major]));
      }
    }
  }
}

TEST(StructuredInputsTest, HeadKindsFollowFractions) {
  StructuredInputOptions options;
  auto qkv = GenerateStructuredQkv({64, 32, 8, 128}, DType::kBf16, Layout::kTokenMajor, options);
  ASSERT_TRUE(qkv.ok());
  std::map<StructuredHeadKind, int> counts;
  for (StructuredHeadKind kind : qkv->head_kinds) ++counts[kind];
  EXPECT_EQ(counts[StructuredHeadKind::kRetrieval], 4);  // 0.125 * 32
  EXPECT_EQ(counts[StructuredHeadKind::kDiffuse], 2);    // 0.0625 * 32
  EXPECT_EQ(counts[StructuredHeadKind::kStripe], 12);    // 0.375 * 32
  EXPECT_EQ(counts[StructuredHeadKind::kSinkLocal], 14);
}

// question_rows: the last rows of every retrieval head score one key of the first half far
// above the rest, and nothing else of the inputs changes.
TEST(StructuredInputsTest, QuestionRowsLookUpAFarNeedle) {
  const AttentionShape shape{2048, 8, 2, 128};
  StructuredInputOptions options;
  options.seed = 11;
  options.retrieval_head_fraction = 0.5f;
  options.stripe_head_fraction = 0.25f;
  auto plain = GenerateStructuredQkv(shape, DType::kFp32, Layout::kTokenMajor, options);
  options.question_rows = 32;
  auto asked = GenerateStructuredQkv(shape, DType::kFp32, Layout::kTokenMajor, options);
  ASSERT_TRUE(plain.ok() && asked.ok());
  EXPECT_EQ(plain->k, asked->k);
  EXPECT_EQ(plain->v, asked->v);
  const int64_t n = shape.seq_len;
  const int d = shape.head_dim;
  const size_t row_bytes = static_cast<size_t>(shape.num_q_heads) * d * sizeof(float);
  EXPECT_TRUE(
      std::equal(plain->q.begin(), plain->q.begin() + (n - 32) * row_bytes, asked->q.begin()));
  const auto* q = reinterpret_cast<const float*>(asked->q.data());
  const auto* k = reinterpret_cast<const float*>(asked->k.data());
  int retrieval_heads = 0;
  for (int h = 0; h < shape.num_q_heads; ++h) {
    if (asked->head_kinds[h] != StructuredHeadKind::kRetrieval) continue;
    ++retrieval_heads;
    const int kv_head = h / shape.GqaRatio();
    std::vector<double> scores;
    for (int64_t j = options.sink_tokens; j < n / 2; ++j) {
      double dot = 0;
      for (int e = 0; e < d; ++e) {
        dot += double{q[((n - 1) * shape.num_q_heads + h) * d + e]} *
               k[(j * shape.num_kv_heads + kv_head) * d + e];
      }
      scores.push_back(dot / std::sqrt(static_cast<double>(d)));
    }
    std::vector<double> sorted = scores;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_GT(sorted.back() - sorted[sorted.size() / 2], 8.0) << "head " << h;
  }
  EXPECT_EQ(retrieval_heads, 4);
  options.question_rows = -1;
  EXPECT_FALSE(GenerateStructuredQkv(shape, DType::kFp32, Layout::kTokenMajor, options).ok());
}

TEST(StructuredInputsTest, RandomInputsLookNormal) {
  auto qkv = GenerateRandomQkv({512, 4, 2, 64}, DType::kFp32, Layout::kTokenMajor, 9);
  ASSERT_TRUE(qkv.ok());
  const auto* q = reinterpret_cast<const float*>(qkv->q.data());
  const size_t count = qkv->q.size() / sizeof(float);
  double sum = 0, sum_sq = 0;
  for (size_t i = 0; i < count; ++i) {
    sum += q[i];
    sum_sq += double{q[i]} * q[i];
  }
  const double mean = sum / count;
  const double variance = sum_sq / count - mean * mean;
  // 131072 samples: the mean's standard error is 0.003, the variance's 0.004.
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(variance, 1.0, 0.03);
}

TEST(StructuredInputsTest, RejectsBadArguments) {
  StructuredInputOptions options;
  EXPECT_EQ(GenerateStructuredQkv({0, 4, 2, 64}, DType::kBf16, Layout::kTokenMajor, options)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GenerateRandomQkv({16, 4, 3, 64}, DType::kBf16, Layout::kTokenMajor, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.diffuse_head_fraction = 0.9f;  // with the other fractions the sum exceeds 1
  EXPECT_EQ(
      GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options).status().code(),
      absl::StatusCode::kInvalidArgument);
  options = StructuredInputOptions{};
  options.local_window = 0;
  EXPECT_FALSE(GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options).ok());
  options = StructuredInputOptions{};
  options.sink_strength = std::nanf("");
  EXPECT_FALSE(GenerateStructuredQkv(kShape, DType::kBf16, Layout::kTokenMajor, options).ok());
}

TEST(StructuredInputsTest, SmallAndOddHeadDims) {
  StructuredInputOptions options;
  for (int d : {1, 2, 5, 7, 9, 33}) {
    auto qkv = GenerateStructuredQkv({100, 2, 1, d}, DType::kFp32, Layout::kTokenMajor, options);
    ASSERT_TRUE(qkv.ok()) << d;
    const auto* q = reinterpret_cast<const float*>(qkv->q.data());
    for (size_t i = 0; i < qkv->q.size() / sizeof(float); ++i) ASSERT_TRUE(std::isfinite(q[i]));
  }
}

// AnchorAttention density at theta = 12, with groups of 256 rows so that many groups have
// candidates at N = 2048: structured inputs keep less than all, and less than i.i.d. Gaussian
// inputs (which have no anchor to speak of, so nearly every candidate passes).
double AnchorDensity(const HostQkv& qkv) {
  std::vector<uint8_t> out(qkv.q.size());
  AttentionTask task;
  BindInputs(qkv, &task);
  task.out = out.data();
  task.config.block_size = 64;
  task.config.step = 4;
  task.config.theta = 12.0f;
  auto backend = CreateCpuBackend(2);
  EXPECT_TRUE(backend.ok());
  EXPECT_TRUE((*backend)->Run({&task}).ok());
  return SummarizeHeads(qkv.shape.seq_len, task.head_stats).density;
}

TEST(StructuredInputsTest, SparserThanRandomUnderAnchorAttention) {
  const AttentionShape shape{2048, 8, 2, 128};
  StructuredInputOptions options;
  options.seed = 11;
  auto structured = GenerateStructuredQkv(shape, DType::kBf16, Layout::kTokenMajor, options);
  auto random = GenerateRandomQkv(shape, DType::kBf16, Layout::kTokenMajor, 11);
  ASSERT_TRUE(structured.ok() && random.ok());
  const double structured_density = AnchorDensity(*structured);
  const double random_density = AnchorDensity(*random);
  EXPECT_LT(structured_density, 1.0);
  EXPECT_LT(structured_density, random_density);
  RecordProperty("structured_density", std::to_string(structured_density));
  RecordProperty("random_density", std::to_string(random_density));
}

}  // namespace
}  // namespace anchorserve
