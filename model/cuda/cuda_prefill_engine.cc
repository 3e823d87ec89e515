#include "model/cuda/cuda_prefill_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_runner.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_event.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/layer_ops.h"
#include "kernels/sparsity_stats.h"
#include "kernels/status_macros.h"
#include "model/rope.h"

namespace anchorserve {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Default rows of the MLP's [rows, 2I] intermediate per chunk: about 256 MiB of bf16.
constexpr int64_t kMlpChunkElements = int64_t{128} << 20;
// Chunk heights are whole GEMM tiles.
constexpr int64_t kMlpChunkAlign = 128;
// The pinned K/V ring stays allocated between runs up to this size (all four slots together):
// page-locking takes time in proportion to the prompt, and the next request reuses the ring.
constexpr int64_t kKeptPinnedBytes = int64_t{4} << 30;

absl::Status LaunchStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return cuda::CudaErrorToStatus(error, what, __FILE__, __LINE__);
}

// Device memory freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(std::exchange(other.data_, nullptr)) {}

  absl::Status Allocate(int64_t bytes, absl::string_view what) {
    Reset();
    if (bytes <= 0) return absl::OkStatus();
    const cudaError_t error = cudaMalloc(&data_, static_cast<size_t>(bytes));
    if (error != cudaSuccess) {
      cudaGetLastError();
      data_ = nullptr;
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes,
                                                       " bytes of device memory for ", what, ": ",
                                                       cudaGetErrorString(error)));
    }
    return absl::OkStatus();
  }
  void Reset() {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
};

// Page-locked host memory (the D2H copies of K/V run asynchronously into it).
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { Reset(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  absl::Status Allocate(int64_t bytes) {
    Reset();
    if (bytes <= 0) return absl::OkStatus();
    const cudaError_t error = cudaMallocHost(&data_, static_cast<size_t>(bytes));
    if (error != cudaSuccess) {
      cudaGetLastError();
      data_ = nullptr;
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", bytes, " bytes of pinned host memory for K/V"));
    }
    return absl::OkStatus();
  }
  void Reset() {
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
  }
  char* get() const { return static_cast<char*>(data_); }

 private:
  void* data_ = nullptr;
};

using cuda::Event;
using cuda::SecondsBetween;

// One layer's weights on the device, bf16 bit patterns.
struct DeviceLayer {
  DeviceBuffer input_norm;  // [H]
  DeviceBuffer q;           // [Hq*d, H]
  DeviceBuffer kv;          // [2*Hkv*d, H]: k rows, then v rows
  DeviceBuffer q_bias;      // [Hq*d], Qwen2 only
  DeviceBuffer kv_bias;     // [2*Hkv*d], Qwen2 only
  DeviceBuffer o;           // [H, Hq*d]
  DeviceBuffer post_norm;   // [H]
  DeviceBuffer gate_up;     // [2*I, H]: gate rows, then up rows
  DeviceBuffer down;        // [H, I]
};

class CudaPrefillEngine : public PrefillEngine {
 public:
  CudaPrefillEngine(const Model& model, int device, int64_t mlp_chunk_rows)
      : model_(model), config_(model.config()), device_(device) {
    const int64_t rows =
        mlp_chunk_rows > 0 ? mlp_chunk_rows : kMlpChunkElements / (2 * config_.intermediate_size);
    mlp_chunk_rows_ = std::max<int64_t>(
        kMlpChunkAlign, (rows + kMlpChunkAlign - 1) / kMlpChunkAlign * kMlpChunkAlign);
  }
  ~CudaPrefillEngine() override {
    cudaSetDevice(device_);
    if (compute_ != nullptr) cudaStreamSynchronize(compute_);
    if (copy_ != nullptr) cudaStreamSynchronize(copy_);
    layers_.clear();
    if (compute_ != nullptr) cudaStreamDestroy(compute_);
    if (copy_ != nullptr) cudaStreamDestroy(copy_);
  }

  absl::Status Init();

  std::string name() const override { return "cuda"; }

  int64_t WorkspaceBytes(int64_t num_tokens, const AnchorConfig& config) const override {
    const int64_t n = std::max<int64_t>(num_tokens, 1);
    const ModelConfig& c = config_;
    int64_t bytes = 0;
    bytes += n * 4;                                          // ids
    bytes += n * c.hidden_size * 4;                          // residual x (fp32)
    bytes += n * c.hidden_size * 2 * 2;                      // normed, projection output (bf16)
    bytes += n * c.QDim() * 2 * 2;                           // q, attention output
    bytes += n * c.KvDim() * 2 * 2;                          // k|v
    bytes += MlpChunkRows(n) * c.intermediate_size * 2 * 3;  // gate|up, activation
    bytes += 2 * 2 * n * c.KvDim() * 4;             // two export slots of K and V (fp32 at most)
    bytes += c.vocab_size * 4 + c.hidden_size * 2;  // logits, last normed row
    AttentionShape shape{n, c.num_heads, c.num_kv_heads, c.head_dim};
    // The attention workspace depends on the mode (identification lists, mass-target scratch).
    AnchorConfig attention_config = config;
    attention_config.softmax_scale = 0.0f;
    if (attention_config.mode == AttentionMode::kAuto) {
      attention_config.mode = ResolveMode(attention_config, n).mode;
    }
    absl::StatusOr<int64_t> attention =
        cuda::AttentionRunner::DeviceWorkspaceBytes(shape, attention_config, DType::kBf16, {n});
    bytes += attention.ok() ? *attention : 0;
    return bytes;
  }

  // The attention backend's answer for this model's shape (bf16): e.g. step <= 16 with mass
  // targets.
  absl::Status CanRun(const AnchorConfig& config) const override {
    const AttentionShape shape{1, config_.num_heads, config_.num_kv_heads, config_.head_dim};
    return CanRunOnCuda(AttentionProblem{shape, DType::kBf16, Layout::kTokenMajor, config});
  }

  absl::StatusOr<PrefillResult> Run(const PrefillTask& task, KvSink* sink) override;

  int64_t KeptPinnedHostBytes() const override {
    return static_cast<int64_t>(k_host_.size() + v_host_.size()) * host_slot_bytes_.load();
  }

 private:
  int64_t MlpChunkRows(int64_t n) const {
    return std::max<int64_t>(1, std::min(n, mlp_chunk_rows_));
  }

  // fp32 host [count] -> bf16 device at dst (through a staging buffer).
  absl::Status Upload(const float* src, int64_t count, uint16_t* dst);
  absl::Status UploadTensor(const float* src, int64_t count, DeviceBuffer* dst,
                            absl::string_view what) {
    ANCHOR_RETURN_IF_ERROR(dst->Allocate(count * 2, what));
    return Upload(src, count, dst->as<uint16_t>());
  }
  absl::Status RunLocked(const PrefillTask& task, KvSink* sink, PrefillResult* result,
                         double* sink_seconds);
  // Grows the pinned ring to slots of `slot_bytes` (a smaller request reuses it); after a failed
  // allocation nothing is kept. Only while no copy into the ring is in flight.
  absl::Status ReserveHostRing(int64_t slot_bytes);
  void ReleaseHostRing();

  const Model& model_;
  const ModelConfig& config_;
  const int device_;
  int64_t mlp_chunk_rows_ = 0;  // a multiple of kMlpChunkAlign
  cudaStream_t compute_ = nullptr;
  cudaStream_t copy_ = nullptr;
  std::unique_ptr<cuda::GemmRunner> gemm_;
  std::unique_ptr<cuda::AttentionRunner> attention_;
  std::vector<DeviceLayer> layers_;
  DeviceBuffer embed_;       // [V, H]
  DeviceBuffer final_norm_;  // [H]
  DeviceBuffer lm_head_;     // [V, H] (untied only)
  DeviceBuffer inv_freq_;    // [d/2] fp32
  DeviceBuffer staging_;     // fp32, the largest weight tensor
  int64_t staging_count_ = 0;
  // The pinned ring of exported K/V (two layers in flight), kept across runs up to
  // kKeptPinnedBytes; each slot holds host_slot_bytes_.
  std::array<PinnedBuffer, 2> k_host_, v_host_;
  std::atomic<int64_t> host_slot_bytes_{0};
  std::mutex run_mutex_;
};

absl::Status CudaPrefillEngine::Upload(const float* src, int64_t count, uint16_t* dst) {
  if (count > staging_count_) return absl::InternalError("weight staging buffer too small");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_.as<float>(), src,
                                              static_cast<size_t>(count) * sizeof(float),
                                              cudaMemcpyHostToDevice, compute_));
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(
      cuda::LaunchFloatToBf16(staging_.as<float>(), count, dst, compute_), "LaunchFloatToBf16"));
  // The staging buffer is reused by the next tensor; pageable sources are consumed on return.
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(compute_));
  return absl::OkStatus();
}

absl::Status CudaPrefillEngine::Init() {
  const ModelConfig& c = config_;
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
  ANCHOR_ASSIGN_OR_RETURN(gemm_, cuda::GemmRunner::Create(device_));
  ANCHOR_ASSIGN_OR_RETURN(attention_, cuda::AttentionRunner::Create(device_));

  const int64_t h = c.hidden_size, q_dim = c.QDim(), kv_dim = c.KvDim(),
                inter = c.intermediate_size, vocab = c.vocab_size;
  staging_count_ = std::max({vocab * h, 2 * inter * h, 2 * kv_dim * h, q_dim * h});
  ANCHOR_RETURN_IF_ERROR(staging_.Allocate(staging_count_ * 4, "weight staging"));

  const ModelWeights& w = model_.weights();
  ANCHOR_RETURN_IF_ERROR(UploadTensor(w.embed_tokens, vocab * h, &embed_, "embed_tokens"));
  ANCHOR_RETURN_IF_ERROR(UploadTensor(w.final_norm, h, &final_norm_, "model.norm"));
  if (w.lm_head != w.embed_tokens) {
    ANCHOR_RETURN_IF_ERROR(UploadTensor(w.lm_head, vocab * h, &lm_head_, "lm_head"));
  }
  layers_.resize(static_cast<size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    DeviceLayer& dl = layers_[l];
    ANCHOR_RETURN_IF_ERROR(UploadTensor(lw.input_norm, h, &dl.input_norm, "input_layernorm"));
    ANCHOR_RETURN_IF_ERROR(UploadTensor(lw.q_proj, q_dim * h, &dl.q, "q_proj"));
    ANCHOR_RETURN_IF_ERROR(dl.kv.Allocate(2 * kv_dim * h * 2, "k_proj|v_proj"));
    ANCHOR_RETURN_IF_ERROR(Upload(lw.k_proj, kv_dim * h, dl.kv.as<uint16_t>()));
    ANCHOR_RETURN_IF_ERROR(Upload(lw.v_proj, kv_dim * h, dl.kv.as<uint16_t>() + kv_dim * h));
    if (lw.q_bias != nullptr) {
      ANCHOR_RETURN_IF_ERROR(UploadTensor(lw.q_bias, q_dim, &dl.q_bias, "q_proj.bias"));
      ANCHOR_RETURN_IF_ERROR(dl.kv_bias.Allocate(2 * kv_dim * 2, "k|v bias"));
      ANCHOR_RETURN_IF_ERROR(Upload(lw.k_bias, kv_dim, dl.kv_bias.as<uint16_t>()));
      ANCHOR_RETURN_IF_ERROR(Upload(lw.v_bias, kv_dim, dl.kv_bias.as<uint16_t>() + kv_dim));
    }
    ANCHOR_RETURN_IF_ERROR(UploadTensor(lw.o_proj, h * q_dim, &dl.o, "o_proj"));
    ANCHOR_RETURN_IF_ERROR(
        UploadTensor(lw.post_attention_norm, h, &dl.post_norm, "post_attention_layernorm"));
    ANCHOR_RETURN_IF_ERROR(dl.gate_up.Allocate(2 * inter * h * 2, "gate_proj|up_proj"));
    ANCHOR_RETURN_IF_ERROR(Upload(lw.gate_proj, inter * h, dl.gate_up.as<uint16_t>()));
    ANCHOR_RETURN_IF_ERROR(Upload(lw.up_proj, inter * h, dl.gate_up.as<uint16_t>() + inter * h));
    ANCHOR_RETURN_IF_ERROR(UploadTensor(lw.down_proj, h * inter, &dl.down, "down_proj"));
  }
  staging_.Reset();
  staging_count_ = 0;

  const std::vector<float> inv_freq = RopeInverseFrequencies(c);
  ANCHOR_RETURN_IF_ERROR(inv_freq_.Allocate(static_cast<int64_t>(inv_freq.size()) * 4, "RoPE"));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_.as<float>(), inv_freq.data(),
                                         inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::StatusOr<PrefillResult> CudaPrefillEngine::Run(const PrefillTask& task, KvSink* sink) {
  ANCHOR_RETURN_IF_ERROR(
      ValidatePrefillTask(config_, task, sink, std::numeric_limits<int32_t>::max(), "cuda"));
  // The kernels select by a fixed theta; a config they would silently misread is refused.
  ANCHOR_RETURN_IF_ERROR(CanRun(task.config));
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  PrefillResult result;
  double sink_seconds = 0;
  const absl::Status status = RunLocked(task, sink, &result, &sink_seconds);
  // Whatever happened, nothing may still run on buffers about to be freed.
  const cudaError_t drained_compute = cudaStreamSynchronize(compute_);
  const cudaError_t drained_copy = cudaStreamSynchronize(copy_);
  if (KeptPinnedHostBytes() > kKeptPinnedBytes) ReleaseHostRing();
  if (!status.ok()) return status;
  ANCHOR_CUDA_RETURN_IF_ERROR(drained_compute);
  ANCHOR_CUDA_RETURN_IF_ERROR(drained_copy);
  return result;
}

absl::Status CudaPrefillEngine::ReserveHostRing(int64_t slot_bytes) {
  if (slot_bytes <= host_slot_bytes_) return absl::OkStatus();
  ReleaseHostRing();
  for (int s = 0; s < 2; ++s) {
    absl::Status allocated = k_host_[s].Allocate(slot_bytes);
    if (allocated.ok()) allocated = v_host_[s].Allocate(slot_bytes);
    if (!allocated.ok()) {
      ReleaseHostRing();
      return allocated;
    }
  }
  host_slot_bytes_ = slot_bytes;
  return absl::OkStatus();
}

void CudaPrefillEngine::ReleaseHostRing() {
  for (int s = 0; s < 2; ++s) {
    k_host_[s].Reset();
    v_host_[s].Reset();
  }
  host_slot_bytes_ = 0;
}

absl::Status CudaPrefillEngine::RunLocked(const PrefillTask& task, KvSink* sink,
                                          PrefillResult* result, double* sink_seconds) {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(task.token_ids.size());
  const int64_t h = c.hidden_size, q_dim = c.QDim(), kv_dim = c.KvDim(),
                inter = c.intermediate_size;
  const int hq = c.num_heads, hkv = c.num_kv_heads, d = c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t mlp_rows = MlpChunkRows(n);
  const bool sparse = cuda::SelectKernel(task.config) == cuda::KernelChoice::kSparse;
  auto cancelled = [&] {
    return task.maybe_cancelled != nullptr && task.maybe_cancelled->load(std::memory_order_relaxed);
  };
  if (cancelled()) return absl::CancelledError("prefill cancelled before it started");

  // Everything a run needs, allocated before the first layer.
  const AttentionShape shape{n, hq, hkv, d};
  AnchorConfig attention_config = task.config;
  attention_config.softmax_scale = 0.0f;  // the model's 1/sqrt(d)
  ANCHOR_ASSIGN_OR_RETURN(int64_t attention_bytes, cuda::AttentionRunner::DeviceWorkspaceBytes(
                                                       shape, attention_config, DType::kBf16, {n}));
  const int64_t kv_element_bytes = static_cast<int64_t>(ElementSize(task.kv_dtype));
  const int64_t kv_bytes = n * kv_dim * kv_element_bytes;  // one K (or V) tensor
  const bool export_kv = task.kv_layer_end > task.kv_layer_begin;
  DeviceBuffer ids, x, normed, q, kv, attn, proj, gate_up, act, attention_ws, logits, last;
  std::array<DeviceBuffer, 2> k_slot, v_slot;
  ANCHOR_RETURN_IF_ERROR(ids.Allocate(n * 4, "token ids"));
  ANCHOR_RETURN_IF_ERROR(x.Allocate(n * h * 4, "the residual stream"));           // [N, H] fp32
  ANCHOR_RETURN_IF_ERROR(normed.Allocate(n * h * 2, "normed activations"));       // [N, H]
  ANCHOR_RETURN_IF_ERROR(q.Allocate(n * q_dim * 2, "Q"));                         // [N, Hq, d]
  ANCHOR_RETURN_IF_ERROR(kv.Allocate(n * 2 * kv_dim * 2, "K|V"));                 // [N, 2, Hkv, d]
  ANCHOR_RETURN_IF_ERROR(attn.Allocate(n * q_dim * 2, "the attention output"));   // [N, Hq, d]
  ANCHOR_RETURN_IF_ERROR(proj.Allocate(n * h * 2, "o_proj/down_proj output"));    // [N, H]
  ANCHOR_RETURN_IF_ERROR(gate_up.Allocate(mlp_rows * 2 * inter * 2, "gate|up"));  // [rows, 2I]
  ANCHOR_RETURN_IF_ERROR(act.Allocate(mlp_rows * inter * 2, "the MLP activation"));  // [rows, I]
  ANCHOR_RETURN_IF_ERROR(attention_ws.Allocate(attention_bytes, "the attention workspace"));
  ANCHOR_RETURN_IF_ERROR(logits.Allocate(c.vocab_size * 4, "logits"));
  ANCHOR_RETURN_IF_ERROR(last.Allocate(h * 2, "the last normed row"));
  if (export_kv) {
    for (int s = 0; s < 2; ++s) {
      ANCHOR_RETURN_IF_ERROR(k_slot[s].Allocate(kv_bytes, "exported K"));
      ANCHOR_RETURN_IF_ERROR(v_slot[s].Allocate(kv_bytes, "exported V"));
    }
    // The previous run's copies into the ring were drained before it returned.
    ANCHOR_RETURN_IF_ERROR(ReserveHostRing(kv_bytes));
  }
  const int num_layers = c.num_layers;
  std::vector<Event> layer_start(num_layers), layer_end(num_layers), attention_start(num_layers),
      attention_mid(num_layers), attention_end(num_layers);
  std::array<Event, 2> exported, copied;
  Event run_begin, run_end;  // the GPU work of the run (the sink waits overlap it)
  ANCHOR_RETURN_IF_ERROR(run_begin.Create());
  ANCHOR_RETURN_IF_ERROR(run_end.Create());
  for (int l = 0; l < num_layers; ++l) {
    for (Event* e : {&layer_start[l], &layer_end[l], &attention_start[l], &attention_mid[l],
                     &attention_end[l]}) {
      ANCHOR_RETURN_IF_ERROR(e->Create());
    }
  }
  for (int s = 0; s < 2; ++s) {
    ANCHOR_RETURN_IF_ERROR(exported[s].Create());
    ANCHOR_RETURN_IF_ERROR(copied[s].Create());
  }
  // A start and an end event around each layer's GEMM brackets (q and k|v together, o, and each
  // MLP chunk's two): the GEMM share of the layer's time.
  const int64_t gemm_brackets = 2 + 2 * ((n + mlp_rows - 1) / mlp_rows);
  std::vector<Event> gemm_marks(static_cast<size_t>(2 * gemm_brackets * num_layers));
  for (Event& e : gemm_marks) ANCHOR_RETURN_IF_ERROR(e.Create());
  size_t next_mark = 0;
  auto mark_gemm = [&]() -> absl::Status {
    if (next_mark == gemm_marks.size()) return absl::InternalError("GEMM event pool exhausted");
    return gemm_marks[next_mark++].Record(compute_);
  };

  ANCHOR_RETURN_IF_ERROR(run_begin.Record(compute_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids.as<int32_t>(), task.token_ids.data(), n * 4,
                                              cudaMemcpyHostToDevice, compute_));
  ANCHOR_RETURN_IF_ERROR(
      LaunchStatus(cuda::LaunchEmbeddingGather(ids.as<int32_t>(), n, embed_.as<uint16_t>(),
                                               static_cast<int>(h), x.as<float>(), compute_),
                   "LaunchEmbeddingGather"));

  // The device views of one layer's attention: Q [N, Hq, d]; K and V interleaved per token in
  // the k|v projection output [N, 2, Hkv, d]; the output [N, Hq, d] with Q's strides.
  cuda::DeviceTensors views;
  views.q = q.as<uint16_t>();
  views.k = kv.as<uint16_t>();
  views.v = kv.as<uint16_t>() + kv_dim;
  views.out = attn.as<uint16_t>();
  cuda::DeviceSequence seq;
  seq.seq_len = n;
  seq.q_token_stride = q_dim;
  seq.q_head_stride = d;
  seq.kv_token_stride = 2 * kv_dim;
  seq.kv_head_stride = d;
  views.seqs = {seq};

  result->layers.assign(static_cast<size_t>(num_layers), PrefillLayerStats{});
  std::vector<std::vector<HeadStats>> head_stats(static_cast<size_t>(num_layers));
  int pending = -1;  // exported layer whose copy is in flight and not yet handed to the sink
  auto hand_over = [&](int layer) -> absl::Status {
    const int slot = layer % 2;
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(copied[slot].get()));
    const auto sink_start = Clock::now();
    const absl::Status sunk =
        sink->OnLayer(layer, absl::MakeConstSpan(k_host_[slot].get(), kv_bytes),
                      absl::MakeConstSpan(v_host_[slot].get(), kv_bytes));
    *sink_seconds += SecondsSince(sink_start);
    return sunk;
  };

  for (int l = 0; l < num_layers; ++l) {
    if (cancelled())
      return absl::CancelledError(absl::StrCat("prefill cancelled before layer ", l));
    const DeviceLayer& w = layers_[l];
    ANCHOR_RETURN_IF_ERROR(layer_start[l].Record(compute_));

    // Attention block. Layers after the first get their input norm from the previous layer's
    // last residual add (fused).
    if (l == 0) {
      ANCHOR_RETURN_IF_ERROR(LaunchStatus(
          cuda::LaunchRmsNorm(x.as<float>(), n, static_cast<int>(h), w.input_norm.as<uint16_t>(),
                              eps, normed.as<uint16_t>(), compute_),
          "LaunchRmsNorm"));
    }
    ANCHOR_RETURN_IF_ERROR(mark_gemm());
    ANCHOR_RETURN_IF_ERROR(gemm_->Linear(normed.as<uint16_t>(), n, h, w.q.as<uint16_t>(), q_dim,
                                         w.q_bias.as<uint16_t>(), q.as<uint16_t>(), compute_));
    ANCHOR_RETURN_IF_ERROR(gemm_->Linear(normed.as<uint16_t>(), n, h, w.kv.as<uint16_t>(),
                                         2 * kv_dim, w.kv_bias.as<uint16_t>(), kv.as<uint16_t>(),
                                         compute_));
    ANCHOR_RETURN_IF_ERROR(mark_gemm());
    ANCHOR_RETURN_IF_ERROR(LaunchStatus(
        cuda::LaunchRope(q.as<uint16_t>(), n, q_dim, hq, d, inv_freq_.as<float>(), compute_),
        "LaunchRope(q)"));
    ANCHOR_RETURN_IF_ERROR(LaunchStatus(
        cuda::LaunchRope(kv.as<uint16_t>(), n, 2 * kv_dim, hkv, d, inv_freq_.as<float>(), compute_),
        "LaunchRope(k)"));
    ANCHOR_RETURN_IF_ERROR(attention_start[l].Record(compute_));
    ANCHOR_RETURN_IF_ERROR(attention_->PrepareOnDevice(shape, attention_config, DType::kBf16, views,
                                                       attention_ws.as<void>(), attention_bytes,
                                                       compute_));
    if (sparse) {
      ANCHOR_RETURN_IF_ERROR(attention_->RunAnchorStage());
      ANCHOR_RETURN_IF_ERROR(attention_->RunStripeStage());
      ANCHOR_RETURN_IF_ERROR(attention_->RunHeadStats(false));
    }
    ANCHOR_RETURN_IF_ERROR(attention_mid[l].Record(compute_));
    ANCHOR_RETURN_IF_ERROR(attention_->RunAttention(sparse ? cuda::KernelChoice::kSparse
                                                           : cuda::KernelChoice::kDense));
    ANCHOR_RETURN_IF_ERROR(attention_end[l].Record(compute_));
    if (sparse) {
      // One small copy per layer for the density metric (the only synchronisation of a layer).
      ANCHOR_RETURN_IF_ERROR(attention_->CopyHeadStats(&head_stats[l]));
    }
    ANCHOR_RETURN_IF_ERROR(mark_gemm());
    ANCHOR_RETURN_IF_ERROR(gemm_->Linear(attn.as<uint16_t>(), n, q_dim, w.o.as<uint16_t>(), h,
                                         nullptr, proj.as<uint16_t>(), compute_));
    ANCHOR_RETURN_IF_ERROR(mark_gemm());
    // x += o_proj output, and the MLP's input norm of the new x.
    ANCHOR_RETURN_IF_ERROR(
        LaunchStatus(cuda::LaunchResidualAddRmsNorm(x.as<float>(), proj.as<uint16_t>(), n,
                                                    static_cast<int>(h), w.post_norm.as<uint16_t>(),
                                                    eps, normed.as<uint16_t>(), compute_),
                     "LaunchResidualAddRmsNorm"));

    // K/V of this layer out to the host while the MLP and the next layer compute.
    if (export_kv && l >= task.kv_layer_begin && l < task.kv_layer_end) {
      const int slot = l % 2;
      // The slot's previous copy (two exported layers ago) must be done before it is rewritten.
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute_, copied[slot].get(), 0));
      const int dtype_code = static_cast<int>(task.kv_dtype);
      const bool head_major = task.kv_layout == Layout::kHeadMajor;
      ANCHOR_RETURN_IF_ERROR(
          LaunchStatus(cuda::LaunchExtractKv(kv.as<uint16_t>(), n, 2 * kv_dim, hkv, d, dtype_code,
                                             head_major, k_slot[slot].as<void>(), compute_),
                       "LaunchExtractKv(k)"));
      ANCHOR_RETURN_IF_ERROR(LaunchStatus(
          cuda::LaunchExtractKv(kv.as<uint16_t>() + kv_dim, n, 2 * kv_dim, hkv, d, dtype_code,
                                head_major, v_slot[slot].as<void>(), compute_),
          "LaunchExtractKv(v)"));
      ANCHOR_RETURN_IF_ERROR(exported[slot].Record(compute_));
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(copy_, exported[slot].get(), 0));
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(k_host_[slot].get(), k_slot[slot].as<void>(),
                                                  kv_bytes, cudaMemcpyDeviceToHost, copy_));
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v_host_[slot].get(), v_slot[slot].as<void>(),
                                                  kv_bytes, cudaMemcpyDeviceToHost, copy_));
      ANCHOR_RETURN_IF_ERROR(copied[slot].Record(copy_));
    }

    // MLP block over row chunks: x += down(silu(gate(m)) * up(m)), m = RMSNorm(x) (above).
    for (int64_t row0 = 0; row0 < n; row0 += mlp_rows) {
      const int64_t rows = std::min(mlp_rows, n - row0);
      ANCHOR_RETURN_IF_ERROR(mark_gemm());
      ANCHOR_RETURN_IF_ERROR(gemm_->Linear(normed.as<uint16_t>() + row0 * h, rows, h,
                                           w.gate_up.as<uint16_t>(), 2 * inter, nullptr,
                                           gate_up.as<uint16_t>(), compute_));
      ANCHOR_RETURN_IF_ERROR(mark_gemm());
      ANCHOR_RETURN_IF_ERROR(
          LaunchStatus(cuda::LaunchSiluMul(gate_up.as<uint16_t>(), rows, static_cast<int>(inter),
                                           act.as<uint16_t>(), compute_),
                       "LaunchSiluMul"));
      ANCHOR_RETURN_IF_ERROR(mark_gemm());
      ANCHOR_RETURN_IF_ERROR(gemm_->Linear(act.as<uint16_t>(), rows, inter, w.down.as<uint16_t>(),
                                           h, nullptr, proj.as<uint16_t>() + row0 * h, compute_));
      ANCHOR_RETURN_IF_ERROR(mark_gemm());
    }
    if (l + 1 < num_layers) {
      // x += down_proj output, and the next layer's input norm of the new x.
      ANCHOR_RETURN_IF_ERROR(LaunchStatus(
          cuda::LaunchResidualAddRmsNorm(x.as<float>(), proj.as<uint16_t>(), n, static_cast<int>(h),
                                         layers_[l + 1].input_norm.as<uint16_t>(), eps,
                                         normed.as<uint16_t>(), compute_),
          "LaunchResidualAddRmsNorm"));
    } else {
      ANCHOR_RETURN_IF_ERROR(
          LaunchStatus(cuda::LaunchResidualAdd(x.as<float>(), proj.as<uint16_t>(), n,
                                               static_cast<int>(h), compute_),
                       "LaunchResidualAdd"));
    }
    ANCHOR_RETURN_IF_ERROR(layer_end[l].Record(compute_));

    // The previous exported layer has had this layer's compute to arrive: hand it over now.
    if (pending >= 0) {
      ANCHOR_RETURN_IF_ERROR(hand_over(pending));
      pending = -1;
    }
    if (export_kv && l >= task.kv_layer_begin && l < task.kv_layer_end) pending = l;
  }
  if (pending >= 0) ANCHOR_RETURN_IF_ERROR(hand_over(pending));

  if (task.compute_logits) {
    if (cancelled()) return absl::CancelledError("prefill cancelled before the logits");
    ANCHOR_RETURN_IF_ERROR(LaunchStatus(
        cuda::LaunchRmsNorm(x.as<float>() + (n - 1) * h, 1, static_cast<int>(h),
                            final_norm_.as<uint16_t>(), eps, last.as<uint16_t>(), compute_),
        "LaunchRmsNorm(final)"));
    const uint16_t* lm_head =
        lm_head_.as<uint16_t>() != nullptr ? lm_head_.as<uint16_t>() : embed_.as<uint16_t>();
    ANCHOR_RETURN_IF_ERROR(gemm_->LinearF32(last.as<uint16_t>(), 1, h, lm_head, c.vocab_size,
                                            logits.as<float>(), compute_));
    result->last_logits.resize(static_cast<size_t>(c.vocab_size));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result->last_logits.data(), logits.as<float>(),
                                                c.vocab_size * sizeof(float),
                                                cudaMemcpyDeviceToHost, compute_));
  }
  ANCHOR_RETURN_IF_ERROR(run_end.Record(compute_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(compute_));
  if (next_mark != gemm_marks.size()) {
    return absl::InternalError(
        absl::StrCat("recorded ", next_mark, " GEMM events, sized for ", gemm_marks.size()));
  }
  result->compute_seconds = SecondsBetween(run_begin, run_end);
  for (int l = 0; l < num_layers; ++l) {
    PrefillLayerStats& stats = result->layers[l];
    stats.density = sparse ? SummarizeHeads(n, head_stats[l]).density : 1.0;
    stats.identification_seconds =
        sparse ? SecondsBetween(attention_start[l], attention_mid[l]) : 0.0;
    stats.attention_seconds = SecondsBetween(attention_mid[l], attention_end[l]);
    stats.layer_seconds = SecondsBetween(layer_start[l], layer_end[l]);
    for (int64_t b = 0; b < gemm_brackets; ++b) {
      const size_t first = static_cast<size_t>(2 * (l * gemm_brackets + b));
      stats.gemm_seconds += SecondsBetween(gemm_marks[first], gemm_marks[first + 1]);
    }
  }
  size_t free_bytes = 0, total_bytes = 0;
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  result->device_bytes_in_use = static_cast<int64_t>(total_bytes - free_bytes);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCudaPrefillEngine(const Model& model,
                                                                       int device,
                                                                       int64_t mlp_chunk_rows) {
  const ModelConfig& c = model.config();
  AttentionProblem probe;
  probe.shape = AttentionShape{1, c.num_heads, c.num_kv_heads, c.head_dim};
  probe.dtype = DType::kBf16;
  if (absl::Status can_run = CanRunOnCuda(probe); !can_run.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the model's attention cannot run on the cuda backend: ", can_run.message()));
  }
  if (device < 0 || device >= CudaDeviceCount()) {
    return absl::FailedPreconditionError(absl::StrCat("cuda device ", device, " is not visible"));
  }
  auto engine = std::make_unique<CudaPrefillEngine>(model, device, mlp_chunk_rows);
  ANCHOR_RETURN_IF_ERROR(engine->Init());
  return std::unique_ptr<PrefillEngine>(std::move(engine));
}

}  // namespace anchorserve
