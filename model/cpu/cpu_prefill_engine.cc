#include "model/cpu/cpu_prefill_engine.h"

#include <blis.h>
#include <cblas.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_attention.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/sparsity_stats.h"
#include "kernels/status_macros.h"
#include "model/rope.h"

// K/V bytes are handed to the sink as the host stores them; the wire format is little-endian.
static_assert(std::endian::native == std::endian::little, "the CPU engine assumes little-endian");

namespace anchorserve {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Uninitialized, 64-byte aligned storage; allocation failure is a status, not an exception.
template <typename T>
class Buffer {
 public:
  absl::Status Allocate(int64_t count, absl::string_view what, bool poison) {
    const size_t bytes =
        (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (data_ == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu prefill: cannot allocate ", bytes, " bytes for ", what));
    }
    count_ = count;
    if (poison) std::memset(data_.get(), 0xff, bytes);  // NaN in bf16, fp16 and fp32
    return absl::OkStatus();
  }
  T* get() const { return data_.get(); }
  int64_t count() const { return count_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> data_;
  int64_t count_ = 0;
};

// Rows handed out per work item for row-wise elementwise work.
constexpr int64_t kRowsPerItem = 16;
// Elements per work item for flat conversions.
constexpr int64_t kElementsPerItem = int64_t{1} << 16;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[m, n] = beta * out[m, n] + a[m, k] . w[n, k]^T (w is a [out, in] linear weight).
void Linear(const float* a, int64_t m, int64_t k, const float* w, int64_t n, float beta,
            float* out) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<f77_int>(m),
              static_cast<f77_int>(n), static_cast<f77_int>(k), 1.0f, a, static_cast<f77_int>(k), w,
              static_cast<f77_int>(k), beta, out, static_cast<f77_int>(n));
}

// y = x * rsqrt(mean(x^2) + eps) * w for one row of h elements. In fp32 the cast back to the
// input dtype that transformers does before the weight multiply is the identity.
void RmsNormRow(const float* x, const float* w, int h, float eps, float* y) {
  double sum_squares = 0;  // a more accurate fp32 mean of squares
  for (int e = 0; e < h; ++e) sum_squares += static_cast<double>(x[e]) * x[e];
  const float variance = static_cast<float>(sum_squares / h);
  const float inv_rms = static_cast<float>(1.0 / std::sqrt(static_cast<double>(variance + eps)));
  for (int e = 0; e < h; ++e) y[e] = w[e] * (x[e] * inv_rms);
}

class CpuPrefillEngine : public PrefillEngine {
 public:
  CpuPrefillEngine(const Model& model, int threads, bool poison,
                   std::unique_ptr<AttentionBackend> attention)
      : model_(model),
        config_(model.config()),
        threads_(threads),
        poison_(poison),
        pool_(threads),
        attention_(std::move(attention)),
        inv_freq_(RopeInverseFrequencies(model.config())) {
    bli_thread_set_num_threads(threads_);
  }

  std::string name() const override { return "cpu"; }

  int64_t WorkspaceBytes(int64_t num_tokens, const AnchorConfig& /*config*/) const override {
    const int64_t n = std::max<int64_t>(num_tokens, 0);
    const ModelConfig& c = config_;
    const int64_t d_pad = CeilDiv(c.head_dim, 16) * 16;
    const int64_t ratio = c.num_heads / c.num_kv_heads;
    int64_t floats = 0;
    floats += 2 * n * c.hidden_size;                      // residual x, normed h
    floats += 2 * n * c.QDim() + 2 * n * c.KvDim();       // q, attention out, k, v
    floats += 2 * MlpChunkRows(n) * c.intermediate_size;  // gate, up
    floats += n * c.head_dim;                             // cos, sin tables
    floats += c.vocab_size + c.hidden_size;               // logits, last normed row
    floats += 2 * n * c.KvDim();                          // exported K, V (fp32 at most)
    // Attention backend: one KV head's K/V as fp32 tiles plus, in anchor mode, the softmax state
    // of its query heads, plus per-thread tiles.
    floats += 2 * (CeilDiv(n, 64) * 64) * d_pad + ratio * (CeilDiv(n, 64) * 64) * (d_pad + 2);
    const int64_t per_thread_bytes = int64_t{1} << 20;
    return floats * 4 + per_thread_bytes * threads_;
  }

  absl::StatusOr<PrefillResult> Run(const PrefillTask& task, KvSink* sink) override;

 private:
  int64_t MlpChunkRows(int64_t n) const {
    const int64_t rows = std::max(kMinMlpChunkRows, kMlpChunkFloats / config_.intermediate_size);
    return std::max<int64_t>(1, std::min(n, rows));
  }

  absl::Status Validate(const PrefillTask& task, const KvSink* sink) const;
  void ParallelRows(int64_t rows, absl::FunctionRef<void(int64_t begin, int64_t end)> fn) {
    pool_.ParallelFor(CeilDiv(rows, kRowsPerItem), [&](int64_t item, int) {
      const int64_t begin = item * kRowsPerItem;
      fn(begin, std::min(rows, begin + kRowsPerItem));
    });
  }
  // src [N, Hkv*d] fp32 -> dst in dtype and layout.
  void ExportKv(const float* src, int64_t n, DType dtype, Layout layout, char* dst);

  const Model& model_;
  const ModelConfig& config_;
  const int threads_;
  const bool poison_;
  cpu::ThreadPool pool_;
  std::unique_ptr<AttentionBackend> attention_;
  const std::vector<float> inv_freq_;  // [d/2]
  std::mutex run_mutex_;
};

absl::Status CpuPrefillEngine::Validate(const PrefillTask& task, const KvSink* sink) const {
  return ValidatePrefillTask(config_, task, sink, cpu::kMaxCpuSeqLen, "cpu");
}

void CpuPrefillEngine::ExportKv(const float* src, int64_t n, DType dtype, Layout layout,
                                char* dst) {
  const int hkv = config_.num_kv_heads, d = config_.head_dim;
  const int64_t element_size = static_cast<int64_t>(ElementSize(dtype));
  if (layout == Layout::kTokenMajor) {  // same order as src
    const int64_t total = n * hkv * d;
    pool_.ParallelFor(CeilDiv(total, kElementsPerItem), [&](int64_t item, int) {
      const int64_t begin = item * kElementsPerItem;
      const int64_t count = std::min(kElementsPerItem, total - begin);
      ConvertFromFloat(src + begin, static_cast<size_t>(count), dtype, dst + begin * element_size);
    });
    return;
  }
  // [N, Hkv, d] -> [Hkv, N, d]
  const int64_t token_blocks = CeilDiv(n, kRowsPerItem * 4);
  pool_.ParallelFor(hkv * token_blocks, [&](int64_t item, int) {
    const int head = static_cast<int>(item / token_blocks);
    const int64_t begin = (item % token_blocks) * kRowsPerItem * 4;
    const int64_t end = std::min(n, begin + kRowsPerItem * 4);
    for (int64_t t = begin; t < end; ++t) {
      ConvertFromFloat(src + (t * hkv + head) * d, static_cast<size_t>(d), dtype,
                       dst + ((int64_t{head} * n + t) * d) * element_size);
    }
  });
}

absl::StatusOr<PrefillResult> CpuPrefillEngine::Run(const PrefillTask& task, KvSink* sink) {
  ANCHOR_RETURN_IF_ERROR(Validate(task, sink));
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  const auto run_start = Clock::now();
  double sink_seconds = 0;
  bli_thread_set_num_threads(threads_);

  const ModelConfig& c = config_;
  const ModelWeights& weights = model_.weights();
  const int64_t n = static_cast<int64_t>(task.token_ids.size());
  const int h = c.hidden_size, d = c.head_dim, half = d / 2;
  const int64_t q_dim = c.QDim(), kv_dim = c.KvDim(), inter = c.intermediate_size;
  const int64_t mlp_rows = MlpChunkRows(n);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const bool export_kv = task.kv_layer_end > task.kv_layer_begin;
  auto cancelled = [&] {
    return task.maybe_cancelled != nullptr && task.maybe_cancelled->load(std::memory_order_relaxed);
  };
  if (cancelled()) return absl::CancelledError("prefill cancelled before it started");

  Buffer<float> x, normed, q, k, v, attn, gate, up, cos, sin;
  Buffer<char> k_out, v_out;
  ANCHOR_RETURN_IF_ERROR(x.Allocate(n * h, "the residual stream", poison_));          // [N, H]
  ANCHOR_RETURN_IF_ERROR(normed.Allocate(n * h, "normed activations", poison_));      // [N, H]
  ANCHOR_RETURN_IF_ERROR(q.Allocate(n * q_dim, "Q", poison_));                        // [N, Hq, d]
  ANCHOR_RETURN_IF_ERROR(k.Allocate(n * kv_dim, "K", poison_));                       // [N, Hkv, d]
  ANCHOR_RETURN_IF_ERROR(v.Allocate(n * kv_dim, "V", poison_));                       // [N, Hkv, d]
  ANCHOR_RETURN_IF_ERROR(attn.Allocate(n * q_dim, "the attention output", poison_));  // [N, Hq, d]
  ANCHOR_RETURN_IF_ERROR(gate.Allocate(mlp_rows * inter, "the MLP gate", poison_));   // [rows, I]
  ANCHOR_RETURN_IF_ERROR(up.Allocate(mlp_rows * inter, "the MLP up", poison_));       // [rows, I]
  ANCHOR_RETURN_IF_ERROR(cos.Allocate(n * half, "RoPE cos", poison_));                // [N, d/2]
  ANCHOR_RETURN_IF_ERROR(sin.Allocate(n * half, "RoPE sin", poison_));                // [N, d/2]
  const int64_t kv_bytes = n * kv_dim * static_cast<int64_t>(ElementSize(task.kv_dtype));
  if (export_kv) {
    ANCHOR_RETURN_IF_ERROR(k_out.Allocate(kv_bytes, "exported K", poison_));
    ANCHOR_RETURN_IF_ERROR(v_out.Allocate(kv_bytes, "exported V", poison_));
  }

  // Embedding and RoPE tables (positions 0..N-1).
  ParallelRows(n, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(x.get() + t * h, weights.embed_tokens + int64_t{task.token_ids[t]} * h,
                  sizeof(float) * h);
      RopeCosSin(inv_freq_, t, cos.get() + t * half, sin.get() + t * half);
    }
  });

  PrefillResult result;
  result.layers.resize(c.num_layers);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    if (cancelled()) {
      return absl::CancelledError(absl::StrCat("prefill cancelled before layer ", layer));
    }
    const auto layer_start = Clock::now();
    const LayerWeights& lw = weights.layers[layer];
    double gemm_seconds = 0;
    auto linear = [&gemm_seconds](const float* a, int64_t m, int64_t k, const float* w, int64_t n,
                                  float beta, float* out) {
      const auto start = Clock::now();
      Linear(a, m, k, w, n, beta, out);
      gemm_seconds += SecondsSince(start);
    };

    // Attention block: normed = RMSNorm(x); q, k, v projections (+ bias); RoPE.
    ParallelRows(n, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        RmsNormRow(x.get() + t * h, lw.input_norm, h, eps, normed.get() + t * h);
      }
    });
    linear(normed.get(), n, h, lw.q_proj, q_dim, 0.0f, q.get());
    linear(normed.get(), n, h, lw.k_proj, kv_dim, 0.0f, k.get());
    linear(normed.get(), n, h, lw.v_proj, kv_dim, 0.0f, v.get());
    ParallelRows(n, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* qt = q.get() + t * q_dim;
        float* kt = k.get() + t * kv_dim;
        float* vt = v.get() + t * kv_dim;
        if (lw.q_bias != nullptr) {
          for (int64_t e = 0; e < q_dim; ++e) qt[e] += lw.q_bias[e];
          for (int64_t e = 0; e < kv_dim; ++e) kt[e] += lw.k_bias[e];
          for (int64_t e = 0; e < kv_dim; ++e) vt[e] += lw.v_bias[e];
        }
        const float* ct = cos.get() + t * half;
        const float* st = sin.get() + t * half;
        auto rotate = [&](float* head) {
          for (int i = 0; i < half; ++i) {
            const float a = head[i], b = head[i + half];
            head[i] = a * ct[i] - b * st[i];
            head[i + half] = b * ct[i] + a * st[i];
          }
        };
        for (int hq = 0; hq < c.num_heads; ++hq) rotate(qt + int64_t{hq} * d);
        for (int hk = 0; hk < c.num_kv_heads; ++hk) rotate(kt + int64_t{hk} * d);
      }
    });

    AttentionTask attention;
    attention.shape = AttentionShape{n, c.num_heads, c.num_kv_heads, d};
    attention.dtype = DType::kFp32;
    attention.layout = Layout::kTokenMajor;
    attention.q = q.get();
    attention.k = k.get();
    attention.v = v.get();
    attention.out = attn.get();
    attention.config = task.config;
    attention.config.softmax_scale = 0.0f;  // the model's 1/sqrt(d)
    attention.maybe_cancelled = task.maybe_cancelled;
    AttentionTask* batch[] = {&attention};
    ANCHOR_RETURN_IF_ERROR(attention_->Run(batch));
    if (!attention.status.ok()) return attention.status;
    PrefillLayerStats& stats = result.layers[layer];
    stats.density = SummarizeHeads(n, attention.head_stats).density;
    stats.identification_seconds = attention.times.identification_seconds;
    stats.attention_seconds = attention.times.compute_seconds;

    // x += o_proj(attn)
    linear(attn.get(), n, q_dim, lw.o_proj, h, 1.0f, x.get());

    // MLP block over row chunks: x += down(silu(gate(n)) * up(n)), n = RMSNorm(x).
    for (int64_t row0 = 0; row0 < n; row0 += mlp_rows) {
      const int64_t rows = std::min(mlp_rows, n - row0);
      float* xr = x.get() + row0 * h;
      ParallelRows(rows, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          RmsNormRow(xr + t * h, lw.post_attention_norm, h, eps, normed.get() + t * h);
        }
      });
      linear(normed.get(), rows, h, lw.gate_proj, inter, 0.0f, gate.get());
      linear(normed.get(), rows, h, lw.up_proj, inter, 0.0f, up.get());
      ParallelRows(rows, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          float* g = gate.get() + t * inter;
          const float* u = up.get() + t * inter;
          for (int64_t e = 0; e < inter; ++e) g[e] = g[e] / (1.0f + std::exp(-g[e])) * u[e];
        }
      });
      linear(gate.get(), rows, inter, lw.down_proj, h, 1.0f, xr);
    }

    stats.gemm_seconds = gemm_seconds;
    if (layer >= task.kv_layer_begin && layer < task.kv_layer_end) {
      ExportKv(k.get(), n, task.kv_dtype, task.kv_layout, k_out.get());
      ExportKv(v.get(), n, task.kv_dtype, task.kv_layout, v_out.get());
      stats.layer_seconds = SecondsSince(layer_start);
      const auto sink_start = Clock::now();
      const absl::Status sunk = sink->OnLayer(layer, absl::MakeConstSpan(k_out.get(), kv_bytes),
                                              absl::MakeConstSpan(v_out.get(), kv_bytes));
      sink_seconds += SecondsSince(sink_start);
      if (!sunk.ok()) return sunk;
    } else {
      stats.layer_seconds = SecondsSince(layer_start);
    }
  }

  if (task.compute_logits) {
    if (cancelled()) return absl::CancelledError("prefill cancelled before the logits");
    RmsNormRow(x.get() + (n - 1) * h, weights.final_norm, h, eps, normed.get());
    result.last_logits.resize(static_cast<size_t>(c.vocab_size));
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<f77_int>(c.vocab_size),
                static_cast<f77_int>(h), 1.0f, weights.lm_head, static_cast<f77_int>(h),
                normed.get(), 1, 0.0f, result.last_logits.data(), 1);
  }
  result.compute_seconds = SecondsSince(run_start) - sink_seconds;
  return result;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCpuPrefillEngine(const Model& model,
                                                                      int threads) {
  CpuPrefillOptions options;
  options.threads = threads;
  return CreateCpuPrefillEngine(model, options);
}

absl::StatusOr<std::unique_ptr<PrefillEngine>> CreateCpuPrefillEngine(
    const Model& model, const CpuPrefillOptions& options) {
  int threads = options.threads;
  if (threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must be >= 0 (0 = all hardware threads), got ", threads));
  }
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> attention, CreateCpuBackend(threads));
  return std::unique_ptr<PrefillEngine>(
      new CpuPrefillEngine(model, threads, options.poison_workspace, std::move(attention)));
}

}  // namespace anchorserve
