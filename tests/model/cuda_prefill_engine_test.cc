// The CUDA prefill engine against the CPU engine on tiny models whose head dims the CUDA
// attention serves (label gpu; every test skips itself without a device).
//
// The CPU engine computes in fp32; the CUDA engine rounds every GEMM input and output to bf16
// (the residual stream stays fp32), so the two agree to bf16 accuracy: errors are measured
// against each tensor's RMS, with a bound of a few bf16 roundings per layer.
#include "model/cuda/cuda_prefill_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/cpu/cpu_prefill_engine.h"
#include "model/model.h"
#include "tests/model/tiny_models.h"

namespace anchorserve {
namespace {

#define SKIP_WITHOUT_CUDA_DEVICE()                                        \
  do {                                                                    \
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (false)

constexpr double kBf16Epsilon = 1.0 / 256;  // 2^-8, the spacing of bf16 at 1

// Keeps every layer's K and V as fp32.
class CollectingSink final : public KvSink {
 public:
  absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) override {
    layers.push_back(layer);
    this->k.emplace_back(reinterpret_cast<const float*>(k.data()),
                         reinterpret_cast<const float*>(k.data()) + k.size() / sizeof(float));
    this->v.emplace_back(reinterpret_cast<const float*>(v.data()),
                         reinterpret_cast<const float*>(v.data()) + v.size() / sizeof(float));
    return status;
  }
  std::vector<int> layers;
  std::vector<std::vector<float>> k, v;
  absl::Status status;
};

// max |a - b| / rms(b); NaN in either makes it infinite.
double RelativeMaxError(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || b.empty()) return INFINITY;
  double sum_squares = 0, max_error = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    sum_squares += static_cast<double>(b[i]) * b[i];
    max_error = std::max(max_error, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  const double rms = std::sqrt(sum_squares / static_cast<double>(b.size()));
  return max_error / std::max(rms, 1e-30);
}

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<PrefillEngine> cpu, cuda;
  std::unique_ptr<PrefillEngine> cuda_chunked;  // MLP chunks of 128 rows: several per prompt
};

void Load(const std::string& preset, Loaded* loaded) {
  absl::StatusOr<std::string> dir = testing::TinyModelDir(preset);
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(*dir);
  ASSERT_TRUE(model.ok()) << model.status();
  loaded->model = *std::move(model);
  absl::StatusOr<std::unique_ptr<PrefillEngine>> cpu = CreateCpuPrefillEngine(*loaded->model, 0);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  loaded->cpu = *std::move(cpu);
  absl::StatusOr<std::unique_ptr<PrefillEngine>> cuda = CreateCudaPrefillEngine(*loaded->model, 0);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  loaded->cuda = *std::move(cuda);
  absl::StatusOr<std::unique_ptr<PrefillEngine>> chunked =
      CreateCudaPrefillEngine(*loaded->model, 0, /*mlp_chunk_rows=*/100);  // rounded up to 128
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  loaded->cuda_chunked = *std::move(chunked);
}

PrefillTask DenseTask(const std::vector<int32_t>& ids, int layers) {
  PrefillTask task;
  task.token_ids = ids;
  task.config.mode = AttentionMode::kDense;
  task.kv_layer_begin = 0;
  task.kv_layer_end = layers;
  task.kv_dtype = DType::kFp32;
  task.kv_layout = Layout::kHeadMajor;
  return task;
}

// The CUDA engine's dense run of `task` against the CPU engine's (fp32) to bf16 accuracy.
void ExpectMatchesCpu(PrefillEngine& engine, const PrefillTask& task, const PrefillResult& cpu,
                      const CollectingSink& cpu_sink, const ModelConfig& c) {
  CollectingSink cuda_sink;
  absl::StatusOr<PrefillResult> cuda = engine.Run(task, &cuda_sink);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  ASSERT_EQ(cuda_sink.layers, cpu_sink.layers);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    // A few bf16 roundings per layer (norm output, GEMM output, RoPE) compound over the layers.
    const double bound = 8 * kBf16Epsilon * (layer + 1);
    EXPECT_LE(RelativeMaxError(cuda_sink.k[layer], cpu_sink.k[layer]), bound) << "K " << layer;
    EXPECT_LE(RelativeMaxError(cuda_sink.v[layer], cpu_sink.v[layer]), bound) << "V " << layer;
  }
  const double logits_error = RelativeMaxError(cuda->last_logits, cpu.last_logits);
  EXPECT_LE(logits_error, 8 * kBf16Epsilon * (c.num_layers + 1));
  // Argmax equal unless the CPU's top two are closer than the error allows.
  std::vector<float> sorted = cpu.last_logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  const auto argmax = [](const std::vector<float>& v) {
    return std::max_element(v.begin(), v.end()) - v.begin();
  };
  double rms = 0;
  for (float value : cpu.last_logits) rms += static_cast<double>(value) * value;
  rms = std::sqrt(rms / static_cast<double>(cpu.last_logits.size()));
  if (sorted[0] - sorted[1] > 2 * logits_error * rms) {
    EXPECT_EQ(argmax(cuda->last_logits), argmax(cpu.last_logits));
  }
  ASSERT_EQ(cuda->layers.size(), static_cast<size_t>(c.num_layers));
  for (const PrefillLayerStats& stats : cuda->layers) {
    EXPECT_EQ(stats.density, 1.0);
    EXPECT_GT(stats.gemm_seconds, 0.0);
    EXPECT_LT(stats.gemm_seconds, stats.layer_seconds);
  }
}

class CudaPrefillEngineTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaPrefillEngineTest, DenseMatchesTheCpuEngineToBf16Accuracy) {
  SKIP_WITHOUT_CUDA_DEVICE();
  Loaded loaded;
  ASSERT_NO_FATAL_FAILURE(Load(GetParam(), &loaded));
  const ModelConfig& c = loaded.model->config();
  const std::vector<int32_t> ids = testing::TestIds(777, c.vocab_size, 7);
  const PrefillTask task = DenseTask(ids, c.num_layers);
  CollectingSink cpu_sink;
  absl::StatusOr<PrefillResult> cpu = loaded.cpu->Run(task, &cpu_sink);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  // 777 tokens: one MLP chunk with the default height, seven (the last of 9 rows) with 128.
  for (PrefillEngine* engine : {loaded.cuda.get(), loaded.cuda_chunked.get()}) {
    SCOPED_TRACE(engine == loaded.cuda.get() ? "default MLP chunks" : "MLP chunks of 128 rows");
    ExpectMatchesCpu(*engine, task, *cpu, cpu_sink, c);
  }
}

TEST_P(CudaPrefillEngineTest, AnchorModeRunsAndInfiniteThetaIsDense) {
  SKIP_WITHOUT_CUDA_DEVICE();
  Loaded loaded;
  ASSERT_NO_FATAL_FAILURE(Load(GetParam(), &loaded));
  const ModelConfig& c = loaded.model->config();
  const std::vector<int32_t> ids = testing::TestIds(1500, c.vocab_size, 8);
  PrefillTask dense = DenseTask(ids, c.num_layers);
  CollectingSink dense_sink, inf_sink, anchor_sink;
  absl::StatusOr<PrefillResult> dense_result = loaded.cuda->Run(dense, &dense_sink);
  ASSERT_TRUE(dense_result.ok()) << dense_result.status();

  PrefillTask inf = dense;
  inf.config.mode = AttentionMode::kAnchor;
  inf.config.theta = INFINITY;
  absl::StatusOr<PrefillResult> inf_result = loaded.cuda->Run(inf, &inf_sink);
  ASSERT_TRUE(inf_result.ok()) << inf_result.status();
  EXPECT_EQ(inf_sink.k, dense_sink.k);
  EXPECT_EQ(inf_sink.v, dense_sink.v);
  EXPECT_EQ(inf_result->last_logits, dense_result->last_logits);

  // Small groups and a tight theta (random weights give nearly flat scores) so keys are skipped.
  PrefillTask anchor = dense;
  anchor.config.mode = AttentionMode::kAnchor;
  anchor.config.theta = 0.1f;
  anchor.config.block_size = 16;
  anchor.config.step = 4;
  absl::StatusOr<PrefillResult> anchor_result = loaded.cuda->Run(anchor, &anchor_sink);
  ASSERT_TRUE(anchor_result.ok()) << anchor_result.status();
  double density = 0;
  for (const PrefillLayerStats& stats : anchor_result->layers) density += stats.density;
  EXPECT_LT(density / c.num_layers, 1.0);
  // Layer 0's K and V come before any attention: the same in every mode.
  EXPECT_EQ(anchor_sink.k[0], dense_sink.k[0]);
  EXPECT_EQ(anchor_sink.v[0], dense_sink.v[0]);
  for (const std::vector<float>& k : anchor_sink.k) {
    for (float value : k) ASSERT_TRUE(std::isfinite(value));
  }
}

// Mass targets run on cuda (step <= 16); a larger step is FAILED_PRECONDITION naming the field
// before anything runs.
TEST_P(CudaPrefillEngineTest, MassTargetRunsAndLargeStepIsFailedPrecondition) {
  SKIP_WITHOUT_CUDA_DEVICE();
  Loaded loaded;
  ASSERT_NO_FATAL_FAILURE(Load(GetParam(), &loaded));
  const ModelConfig& c = loaded.model->config();
  const std::vector<int32_t> ids = testing::TestIds(300, c.vocab_size, 9);
  PrefillTask task = DenseTask(ids, c.num_layers);
  task.config.mode = AttentionMode::kAnchor;
  task.config.block_size = 16;
  task.config.step = 4;  // G = 64: groups with candidates at N = 300
  task.config.mass_target = 0.95f;
  ASSERT_TRUE(loaded.cuda->CanRun(task.config).ok());
  // Admission counts the mass-target scratch (levels, histograms, row anchors).
  AnchorConfig fixed_theta = task.config;
  fixed_theta.mass_target = 0.0f;
  EXPECT_GT(loaded.cuda->WorkspaceBytes(300, task.config),
            loaded.cuda->WorkspaceBytes(300, fixed_theta));
  CollectingSink mass_sink;
  const absl::StatusOr<PrefillResult> mass = loaded.cuda->Run(task, &mass_sink);
  ASSERT_TRUE(mass.ok()) << mass.status();
  ASSERT_EQ(mass_sink.layers.size(), static_cast<size_t>(c.num_layers));
  for (const std::vector<float>& k : mass_sink.k) {
    for (float value : k) ASSERT_TRUE(std::isfinite(value));
  }

  task.config.step = 32;
  const absl::Status can_run = loaded.cuda->CanRun(task.config);
  EXPECT_EQ(can_run.code(), absl::StatusCode::kFailedPrecondition) << can_run;
  EXPECT_NE(can_run.message().find("config.step"), absl::string_view::npos) << can_run;
  CollectingSink sink;
  const absl::StatusOr<PrefillResult> result = loaded.cuda->Run(task, &sink);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  EXPECT_TRUE(sink.layers.empty());
  // The CPU engine runs it; a dense task (mass target ignored) still runs on cuda.
  EXPECT_TRUE(loaded.cpu->CanRun(task.config).ok());
  task.config.mode = AttentionMode::kDense;
  EXPECT_TRUE(loaded.cuda->CanRun(task.config).ok());
}

TEST_P(CudaPrefillEngineTest, LayoutsDtypesRangeSinkErrorsCancellationNoLeakAndRingReuse) {
  SKIP_WITHOUT_CUDA_DEVICE();
  Loaded loaded;
  ASSERT_NO_FATAL_FAILURE(Load(GetParam(), &loaded));
  const ModelConfig& c = loaded.model->config();
  const std::vector<int32_t> ids = testing::TestIds(300, c.vocab_size, 9);
  CollectingSink head_major;
  EXPECT_EQ(loaded.cuda->KeptPinnedHostBytes(), 0);
  ASSERT_TRUE(loaded.cuda->Run(DenseTask(ids, c.num_layers), &head_major).ok());
  // Two slots of K and V, fp32.
  const int64_t ring_bytes = 4 * static_cast<int64_t>(ids.size()) * c.KvDim() * 4;
  EXPECT_EQ(loaded.cuda->KeptPinnedHostBytes(), ring_bytes);

  // Token-major bf16 of one layer: the same values as head-major fp32, rounded.
  class RawSink final : public KvSink {
   public:
    absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) override {
      layers.push_back(layer);
      this->k.assign(k.begin(), k.end());
      return absl::OkStatus();
    }
    std::vector<int> layers;
    std::vector<char> k;
  } raw;
  PrefillTask token_major = DenseTask(ids, c.num_layers);
  token_major.kv_layer_begin = 1;
  token_major.kv_layer_end = 2;
  token_major.kv_dtype = DType::kBf16;
  token_major.kv_layout = Layout::kTokenMajor;
  ASSERT_TRUE(loaded.cuda->Run(token_major, &raw).ok());
  EXPECT_EQ(loaded.cuda->KeptPinnedHostBytes(), ring_bytes);  // reused, not shrunk
  ASSERT_EQ(raw.layers, std::vector<int>{1});
  const int64_t n = static_cast<int64_t>(ids.size());
  ASSERT_EQ(raw.k.size(), static_cast<size_t>(n * c.KvDim() * 2));
  int64_t mismatches = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int head = 0; head < c.num_kv_heads; ++head) {
      for (int e = 0; e < c.head_dim; ++e) {
        uint16_t bits = 0;
        std::memcpy(&bits, raw.k.data() + ((t * c.num_kv_heads + head) * c.head_dim + e) * 2, 2);
        float got = 0;
        ConvertToFloat(&bits, DType::kBf16, 1, &got);
        const float want = head_major.k[1][(head * n + t) * c.head_dim + e];
        // The K tensor is bf16 on the device: fp32 export is exact, bf16 export equals it.
        if (got != want) ++mismatches;
      }
    }
  }
  EXPECT_EQ(mismatches, 0);

  // A sink error stops the run with that status.
  CollectingSink failing;
  failing.status = absl::DataLossError("sink refused");
  EXPECT_EQ(loaded.cuda->Run(DenseTask(ids, c.num_layers), &failing).status().code(),
            absl::StatusCode::kDataLoss);
  // Cancelled before it starts.
  std::atomic<bool> cancelled{true};
  PrefillTask cancelled_task = DenseTask(ids, c.num_layers);
  cancelled_task.maybe_cancelled = &cancelled;
  CollectingSink unused;
  EXPECT_EQ(loaded.cuda->Run(cancelled_task, &unused).status().code(),
            absl::StatusCode::kCancelled);

  // Device memory returns to its level after a run (weights and the GEMM workspace stay).
  size_t free_before = 0, free_after = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
  CollectingSink again;
  ASSERT_TRUE(loaded.cuda->Run(DenseTask(ids, c.num_layers), &again).ok());
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  EXPECT_EQ(free_after, free_before);
  EXPECT_EQ(again.k, head_major.k);  // deterministic

  // The pinned K/V ring is kept between runs: the smaller bf16 export above reused it, and a
  // longer prompt now grows it.
  const std::vector<int32_t> longer = testing::TestIds(600, c.vocab_size, 11);
  const PrefillTask longer_task = DenseTask(longer, c.num_layers);
  CollectingSink cpu_sink;
  absl::StatusOr<PrefillResult> cpu = loaded.cpu->Run(longer_task, &cpu_sink);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ExpectMatchesCpu(*loaded.cuda, longer_task, *cpu, cpu_sink, c);
  EXPECT_EQ(loaded.cuda->KeptPinnedHostBytes(), 2 * ring_bytes);
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaPrefillEngineTest,
                         ::testing::Values("llama3-gpu-tiny", "qwen2-gpu-tiny"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace anchorserve
