// The CPU prefill engine against the independent fp64 reference forward: K/V of every layer and
// the last logits of each tiny preset within tolerances derived from fp32 error bounds and the
// K/V dtype; layer ranges, layouts, AnchorAttention density, cancellation, sink errors and
// validation. The engine poisons its workspace with NaN, and NaN always fails.
#include "model/cpu/cpu_prefill_engine.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/model/engine_test_util.h"
#include "tests/model/tiny_models.h"

namespace anchorserve {
namespace {

using testing::CachedModel;
using testing::CachedReference;
using testing::Comparison;
using testing::RecordingSink;

constexpr int kThreads = 2;

std::string ModelDir(const std::string& preset, DType dtype = DType::kBf16, int shards = 1) {
  const absl::StatusOr<std::string> dir = testing::TinyModelDir(preset, dtype, shards);
  if (!dir.ok()) {
    ADD_FAILURE() << dir.status();
    return "";
  }
  return *dir;
}

// One engine per model, poisoning its workspace.
PrefillEngine& EngineFor(const Model& model) {
  static auto* engines = new std::map<const Model*, std::unique_ptr<PrefillEngine>>();
  auto it = engines->find(&model);
  if (it == engines->end()) {
    CpuPrefillOptions options;
    options.threads = kThreads;
    options.poison_workspace = true;
    absl::StatusOr<std::unique_ptr<PrefillEngine>> engine = CreateCpuPrefillEngine(model, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    it = engines->emplace(&model, *std::move(engine)).first;
  }
  return *it->second;
}

PrefillTask DenseTask(const Model& model, const std::vector<int32_t>& ids) {
  PrefillTask task;
  task.token_ids = ids;
  task.config.mode = AttentionMode::kDense;
  task.kv_layer_begin = 0;
  task.kv_layer_end = model.config().num_layers;
  return task;
}

// Checks every delivered layer and the logits against the reference.
void ExpectMatchesReference(const Model& model, const PrefillTask& task, const RecordingSink& sink,
                            const PrefillResult& result, const ReferenceForward& ref) {
  const ModelConfig& c = model.config();
  const int64_t n = static_cast<int64_t>(task.token_ids.size());
  ASSERT_EQ(static_cast<int>(sink.layers.size()), task.kv_layer_end - task.kv_layer_begin);
  for (size_t i = 0; i < sink.layers.size(); ++i) {
    const RecordingSink::Layer& layer = sink.layers[i];
    ASSERT_EQ(layer.layer, task.kv_layer_begin + static_cast<int>(i));  // in order
    const Comparison k =
        testing::CompareKv(layer.k, task.kv_dtype, task.kv_layout, n, c.num_kv_heads, c.head_dim,
                           ref.k[layer.layer], ref.k_sigma[layer.layer]);
    EXPECT_TRUE(k.ok()) << "K of layer " << layer.layer << ": " << k.ToString();
    const Comparison v =
        testing::CompareKv(layer.v, task.kv_dtype, task.kv_layout, n, c.num_kv_heads, c.head_dim,
                           ref.v[layer.layer], ref.v_sigma[layer.layer]);
    EXPECT_TRUE(v.ok()) << "V of layer " << layer.layer << ": " << v.ToString();
    printf("DBG layer %d K ratio %.3f V ratio %.3f\n", layer.layer, k.max_ratio, v.max_ratio);
  }
  if (!task.compute_logits) {
    EXPECT_TRUE(result.last_logits.empty());
    return;
  }
  const Comparison logits =
      testing::CompareValues(result.last_logits, ref.logits, ref.logits_sigma);
  EXPECT_TRUE(logits.ok()) << "logits: " << logits.ToString();
  // The prompt is unambiguous when the reference's best logit beats every other one by more than
  // both tolerances; then the engine must pick the same token.
  const int64_t best = testing::ArgMax(ref.logits);
  for (size_t i = 0; i < ref.logits.size(); ++i) {
    if (static_cast<int64_t>(i) == best) continue;
    ASSERT_GT(ref.logits[best] - ref.logits[i],
              kToleranceSigmas * (ref.logits_sigma[best] + ref.logits_sigma[i]))
        << "the reference argmax is not separated from token " << i;
  }
  EXPECT_EQ(testing::ArgMax(result.last_logits), best);
}

struct DenseCase {
  std::string preset;
  DType kv_dtype;
  Layout kv_layout;
  std::string Name() const {
    return absl::StrCat(preset, "_", std::string(DTypeName(kv_dtype)),
                        kv_layout == Layout::kHeadMajor ? "_head" : "_token");
  }
};

void PrintTo(const DenseCase& c, std::ostream* os) { *os << c.Name(); }

class DenseMatchesReferenceTest : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DenseMatchesReferenceTest, EveryLayerAndLogits) {
  const DenseCase& p = GetParam();
  const std::string dir = ModelDir(p.preset);
  ASSERT_FALSE(dir.empty());
  const Model& model = CachedModel(dir);
  // 150 tokens: more than two 64-key tiles, so tile boundaries and the causal edge are exercised.
  const std::vector<int32_t> ids = testing::TestIds(150, model.config().vocab_size, 7);
  PrefillTask task = DenseTask(model, ids);
  task.kv_dtype = p.kv_dtype;
  task.kv_layout = p.kv_layout;
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, ids));
  ASSERT_EQ(static_cast<int>(result->layers.size()), model.config().num_layers);
  for (const PrefillLayerStats& stats : result->layers) {
    EXPECT_EQ(stats.density, 1.0);
    EXPECT_GT(stats.layer_seconds, 0.0);
    EXPECT_GT(stats.gemm_seconds, 0.0);
    EXPECT_LT(stats.gemm_seconds, stats.layer_seconds);
  }
  EXPECT_GT(result->compute_seconds, 0.0);
}

std::vector<DenseCase> AllDenseCases() {
  std::vector<DenseCase> cases;
  for (const std::string& preset : testing::TinyPresets()) {
    for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
      for (Layout layout : {Layout::kHeadMajor, Layout::kTokenMajor}) {
        cases.push_back({preset, dtype, layout});
      }
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(All, DenseMatchesReferenceTest, ::testing::ValuesIn(AllDenseCases()),
                         [](const ::testing::TestParamInfo<DenseCase>& info) {
                           std::string name = info.param.Name();
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

// Checkpoints in fp32 (used in place), fp16, and fp32 sharded over three files.
TEST(CpuPrefillEngineTest, WeightDtypesAndShards) {
  struct Variant {
    std::string preset;
    DType dtype;
    int shards;
  };
  for (const Variant& variant :
       {Variant{"llama-tiny", DType::kFp32, 1}, Variant{"llama-tiny", DType::kFp16, 1},
        Variant{"qwen2-tiny", DType::kFp32, 3}}) {
    SCOPED_TRACE(absl::StrCat(variant.preset, " ", std::string(DTypeName(variant.dtype)), " ",
                              variant.shards));
    const std::string dir = ModelDir(variant.preset, variant.dtype, variant.shards);
    ASSERT_FALSE(dir.empty());
    const Model& model = CachedModel(dir);
    EXPECT_EQ(model.weight_dtype(), variant.dtype);
    const std::vector<int32_t> ids = testing::TestIds(97, model.config().vocab_size, 11);
    PrefillTask task = DenseTask(model, ids);
    task.kv_dtype = DType::kFp32;
    RecordingSink sink;
    const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
    ASSERT_TRUE(result.ok()) << result.status();
    ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, ids));
  }
}

TEST(CpuPrefillEngineTest, SingleToken) {
  const std::string dir = ModelDir("llama3-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = {5};
  PrefillTask task = DenseTask(model, ids);
  task.kv_dtype = DType::kFp32;
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, ids));
}

TEST(CpuPrefillEngineTest, LayerRangeGoesToTheSinkInOrder) {
  const std::string dir = ModelDir("llama3-tiny");  // 3 layers
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(70, model.config().vocab_size, 3);
  PrefillTask task = DenseTask(model, ids);
  task.kv_layer_begin = 1;
  task.kv_layer_end = 3;
  task.kv_dtype = DType::kBf16;
  task.kv_layout = Layout::kTokenMajor;
  RecordingSink sink;
  absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(sink.layers.size(), 2u);
  ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, ids));

  // An empty range needs no sink.
  task.kv_layer_begin = task.kv_layer_end = 2;
  result = EngineFor(model).Run(task, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->last_logits.size(), static_cast<size_t>(model.config().vocab_size));
}

TEST(CpuPrefillEngineTest, NoLogitsWhenNotAsked) {
  const std::string dir = ModelDir("qwen2-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(33, model.config().vocab_size, 5);
  PrefillTask task = DenseTask(model, ids);
  task.compute_logits = false;
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, ids));
  EXPECT_EQ(static_cast<int>(result->layers.size()), model.config().num_layers);
}

TEST(CpuPrefillEngineTest, RepeatedRunsAreIdentical) {
  const std::string dir = ModelDir("llama-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(80, model.config().vocab_size, 9);
  const PrefillTask task = DenseTask(model, ids);
  RecordingSink first, second;
  const absl::StatusOr<PrefillResult> a = EngineFor(model).Run(task, &first);
  const absl::StatusOr<PrefillResult> b = EngineFor(model).Run(task, &second);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(first.layers.size(), second.layers.size());
  for (size_t i = 0; i < first.layers.size(); ++i) {
    EXPECT_EQ(first.layers[i].k, second.layers[i].k);
    EXPECT_EQ(first.layers[i].v, second.layers[i].v);
  }
  EXPECT_EQ(a->last_logits, b->last_logits);
}

// A small group (block 16, step 2: G = 32) so that a few hundred tokens have stripe candidates.
AnchorConfig SmallAnchorConfig(float theta) {
  AnchorConfig config;
  config.mode = AttentionMode::kAnchor;
  config.theta = theta;
  config.block_size = 16;
  config.step = 2;
  return config;
}

TEST(CpuPrefillEngineTest, ThetaInfinityEqualsDense) {
  const std::string dir = ModelDir("llama-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(200, model.config().vocab_size, 13);
  PrefillTask dense = DenseTask(model, ids);
  PrefillTask anchor = dense;
  anchor.config = SmallAnchorConfig(std::numeric_limits<float>::infinity());
  RecordingSink dense_sink, anchor_sink;
  const absl::StatusOr<PrefillResult> a = EngineFor(model).Run(dense, &dense_sink);
  const absl::StatusOr<PrefillResult> b = EngineFor(model).Run(anchor, &anchor_sink);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(dense_sink.layers.size(), anchor_sink.layers.size());
  for (size_t i = 0; i < dense_sink.layers.size(); ++i) {
    EXPECT_EQ(dense_sink.layers[i].k, anchor_sink.layers[i].k) << "layer " << i;
    EXPECT_EQ(dense_sink.layers[i].v, anchor_sink.layers[i].v) << "layer " << i;
  }
  EXPECT_EQ(a->last_logits, b->last_logits);
  for (const PrefillLayerStats& stats : b->layers) EXPECT_EQ(stats.density, 1.0);
}

TEST(CpuPrefillEngineTest, AnchorModeDensityOnlyWhereItShouldBeBelowOne) {
  const std::string dir = ModelDir("llama-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(300, model.config().vocab_size, 17);
  PrefillTask dense = DenseTask(model, ids);
  RecordingSink dense_sink;
  const absl::StatusOr<PrefillResult> exact = EngineFor(model).Run(dense, &dense_sink);
  ASSERT_TRUE(exact.ok()) << exact.status();

  const AnchorConfig anchor_only = SmallAnchorConfig(-std::numeric_limits<float>::infinity());
  const double floor = testing::AnchorOnlyDensity(300, anchor_only);
  ASSERT_LT(floor, 0.9);
  for (float theta : {-std::numeric_limits<float>::infinity(), 1.0f}) {
    SCOPED_TRACE(absl::StrCat("theta ", theta));
    PrefillTask task = dense;
    task.config = SmallAnchorConfig(theta);
    RecordingSink sink;
    const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
    ASSERT_TRUE(result.ok()) << result.status();
    for (const PrefillLayerStats& stats : result->layers) {
      if (std::isinf(theta)) {
        EXPECT_NEAR(stats.density, floor, 1e-12);  // exactly the anchor region
      } else {
        EXPECT_GE(stats.density, floor);
        EXPECT_LT(stats.density, 1.0);
      }
    }
    // Layer 0's K/V come before any attention: identical to dense. Layer 1's follow a sparse
    // attention, so they differ.
    EXPECT_EQ(sink.layers[0].k, dense_sink.layers[0].k);
    EXPECT_EQ(sink.layers[0].v, dense_sink.layers[0].v);
    EXPECT_NE(sink.layers[1].k, dense_sink.layers[1].k);
    for (float logit : result->last_logits) ASSERT_TRUE(std::isfinite(logit));
  }

  // Fewer than two groups of tokens leave no stripe candidates: anchor mode is exact there.
  const std::vector<int32_t> short_ids(ids.begin(), ids.begin() + 60);
  PrefillTask task = DenseTask(model, short_ids);
  task.config = SmallAnchorConfig(1.0f);
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const PrefillLayerStats& stats : result->layers) EXPECT_EQ(stats.density, 1.0);
  ExpectMatchesReference(model, task, sink, *result, CachedReference(dir, short_ids));
}

TEST(CpuPrefillEngineTest, MassTargetRuns) {
  // The per-layer attention config carries the mass target to the CPU backend, which supports it.
  const std::string dir = ModelDir("llama-tiny");
  const Model& model = CachedModel(dir);
  const std::vector<int32_t> ids = testing::TestIds(300, model.config().vocab_size, 19);
  PrefillTask task = DenseTask(model, ids);
  task.config = SmallAnchorConfig(12.0f);
  task.config.mass_target = 0.95f;
  EXPECT_TRUE(EngineFor(model).CanRun(task.config).ok());
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->layers.size(), static_cast<size_t>(model.config().num_layers));
  const double floor = testing::AnchorOnlyDensity(300, task.config);
  for (const PrefillLayerStats& stats : result->layers) {
    EXPECT_GE(stats.density, floor);
    EXPECT_LE(stats.density, 1.0);
  }
  EXPECT_EQ(sink.layers.size(), static_cast<size_t>(model.config().num_layers));
  for (float logit : result->last_logits) ASSERT_TRUE(std::isfinite(logit));
}

TEST(CpuPrefillEngineTest, CancelledBeforeTheStart) {
  const Model& model = CachedModel(ModelDir("llama-tiny"));
  const std::vector<int32_t> ids = testing::TestIds(20, model.config().vocab_size, 1);
  std::atomic<bool> cancelled{true};
  PrefillTask task = DenseTask(model, ids);
  task.maybe_cancelled = &cancelled;
  RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(sink.layers.empty());
}

TEST(CpuPrefillEngineTest, CancelledBetweenLayers) {
  const Model& model = CachedModel(ModelDir("llama3-tiny"));
  const std::vector<int32_t> ids = testing::TestIds(40, model.config().vocab_size, 2);
  std::atomic<bool> cancelled{false};
  PrefillTask task = DenseTask(model, ids);
  task.maybe_cancelled = &cancelled;
  RecordingSink sink;
  sink.cancel_at = 0;
  sink.cancel_flag = &cancelled;
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  EXPECT_NE(result.status().message().find("layer 1"), absl::string_view::npos) << result.status();
  ASSERT_EQ(sink.layers.size(), 1u);
  EXPECT_EQ(sink.layers[0].layer, 0);
}

TEST(CpuPrefillEngineTest, SinkErrorStopsTheRun) {
  const Model& model = CachedModel(ModelDir("llama3-tiny"));
  const std::vector<int32_t> ids = testing::TestIds(40, model.config().vocab_size, 4);
  PrefillTask task = DenseTask(model, ids);
  RecordingSink sink;
  sink.fail_at = 1;
  sink.failure = absl::UnavailableError("client went away");
  const absl::StatusOr<PrefillResult> result = EngineFor(model).Run(task, &sink);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status(), sink.failure);
  ASSERT_EQ(sink.layers.size(), 2u);  // layers 0 and 1, nothing after the failure
  EXPECT_EQ(sink.layers[1].layer, 1);
}

TEST(CpuPrefillEngineTest, ValidationNamesTheField) {
  const Model& model = CachedModel(ModelDir("llama-tiny"));
  const int64_t vocab = model.config().vocab_size;
  const std::vector<int32_t> ids = testing::TestIds(10, vocab, 6);
  std::vector<int32_t> too_big = ids, negative = ids;
  too_big[3] = static_cast<int32_t>(vocab);
  negative[0] = -1;
  const std::vector<int32_t> empty;
  struct Bad {
    std::string name;
    std::function<void(PrefillTask&)> mutate;
    std::string field;
    bool null_sink = false;
  };
  const std::vector<Bad> cases = {
      {"empty", [&](PrefillTask& t) { t.token_ids = empty; }, "token_ids"},
      {"id = vocab", [&](PrefillTask& t) { t.token_ids = too_big; }, "token_ids[3]"},
      {"id < 0", [&](PrefillTask& t) { t.token_ids = negative; }, "token_ids[0]"},
      {"begin < 0", [](PrefillTask& t) { t.kv_layer_begin = -1; }, "kv_layer_begin"},
      {"end > layers", [](PrefillTask& t) { t.kv_layer_end = 3; }, "kv_layer_end"},
      {"begin > end",
       [](PrefillTask& t) {
         t.kv_layer_begin = 2;
         t.kv_layer_end = 1;
       },
       "kv_layer_begin"},
      {"null sink", [](PrefillTask&) {}, "sink", true},
      {"dtype", [](PrefillTask& t) { t.kv_dtype = static_cast<DType>(9); }, "kv_dtype"},
      {"layout", [](PrefillTask& t) { t.kv_layout = static_cast<Layout>(9); }, "kv_layout"},
      {"block_size", [](PrefillTask& t) { t.config.block_size = 0; }, "config.block_size"},
      {"theta NaN", [](PrefillTask& t) { t.config.theta = NAN; }, "config.theta"},
      {"mass_target", [](PrefillTask& t) { t.config.mass_target = 1.5f; }, "config.mass_target"},
      {"softmax_scale", [](PrefillTask& t) { t.config.softmax_scale = 0.5f; },
       "config.softmax_scale"},
  };
  for (const Bad& bad : cases) {
    SCOPED_TRACE(bad.name);
    PrefillTask task = DenseTask(model, ids);
    bad.mutate(task);
    RecordingSink sink;
    const absl::StatusOr<PrefillResult> result =
        EngineFor(model).Run(task, bad.null_sink ? nullptr : &sink);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
    EXPECT_NE(result.status().message().find(bad.field), absl::string_view::npos)
        << result.status();
    EXPECT_TRUE(sink.layers.empty());
  }
  // The model's own scale, given explicitly, is accepted.
  PrefillTask task = DenseTask(model, ids);
  task.config.softmax_scale = 0.25f;  // head_dim 16
  RecordingSink sink;
  EXPECT_TRUE(EngineFor(model).Run(task, &sink).ok());
}

TEST(CpuPrefillEngineTest, CreationAndWorkspace) {
  const Model& model = CachedModel(ModelDir("llama-tiny"));
  const auto bad = CreateCpuPrefillEngine(model, -1);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  const auto engine = CreateCpuPrefillEngine(model, 0);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->name(), "cpu");
  const ModelConfig& c = model.config();
  const int64_t small = (*engine)->WorkspaceBytes(128, AnchorConfig{});
  const int64_t large = (*engine)->WorkspaceBytes(4096, AnchorConfig{});
  // At least the residual stream, Q/K/V and the attention output of every token.
  EXPECT_GE(small, 128 * 4 * (2 * c.hidden_size + 2 * c.QDim() + 2 * c.KvDim()));
  EXPECT_GT(large, small);
}

}  // namespace
}  // namespace anchorserve
