// Prompt-ID prefill: the whole forward pass of a causal LM over one prompt, streaming each layer's
// post-RoPE K/V to a sink and returning the last position's logits. Backends implement
// PrefillEngine (model/cpu/cpu_prefill_engine.h for the CPU).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/attention_types.h"
#include "kernels/dtype.h"
#include "model/model_config.h"

namespace anchorserve {

struct PrefillTask {
  absl::Span<const int32_t> token_ids;  // [N], each in [0, vocab)
  AnchorConfig config;                  // attention of every layer (dense mode = exact)
  int kv_layer_begin = 0;               // layers [kv_layer_begin, kv_layer_end) go to the sink
  int kv_layer_end = 0;
  DType kv_dtype = DType::kBf16;
  Layout kv_layout = Layout::kHeadMajor;  // [Hkv, N, d] (HF cache) or kTokenMajor [N, Hkv, d]
  bool compute_logits = true;             // last position's logits
  const std::atomic<bool>* maybe_cancelled = nullptr;  // checked between layers -> CANCELLED
};

struct PrefillLayerStats {
  double density = 1;  // computed fraction of the causal score matrix, mean over heads
  double identification_seconds = 0;  // anchor + stripe identification (0 in dense mode)
  double attention_seconds = 0;       // dense or sparse attention compute, identification excluded
  double layer_seconds = 0;  // the whole layer incl. K/V conversion, excluding time in the sink
  double gemm_seconds = 0;   // the layer's matrix products (projections and MLP)
};

struct PrefillResult {
  std::vector<float> last_logits;         // [vocab] fp32 when compute_logits
  std::vector<PrefillLayerStats> layers;  // [num_layers]
  // The whole Run: excluding time spent in the sink (CPU engine); the GPU's time from the
  // embedding to the logits (CUDA engine, whose sink waits overlap the GPU work).
  double compute_seconds = 0;
  // Device memory the whole process held once the last layer was done, the run's buffers still
  // allocated (cudaMemGetInfo: weights, workspace, CUDA context, library handles); 0 on the CPU.
  int64_t device_bytes_in_use = 0;
};

class KvSink {
 public:
  virtual ~KvSink() = default;
  // In layer order, for each layer of [kv_layer_begin, kv_layer_end), as soon as it is done.
  // k, v: post-RoPE K and V of the layer in kv_dtype and kv_layout, bytes little-endian.
  // May block (backpressure). A non-OK return stops the prefill with that status.
  // The spans are valid only during the call.
  virtual absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) = 0;
};

// What every engine checks before a run: ids in [0, vocab), at most `max_tokens` of them, the
// layer range, dtype and layout of the KV, a sink when KV is asked for, the config, and a softmax
// scale that is the model's. INVALID_ARGUMENT naming the field; `engine` names the engine.
absl::Status ValidatePrefillTask(const ModelConfig& config, const PrefillTask& task,
                                 const KvSink* sink, int64_t max_tokens, absl::string_view engine);

class PrefillEngine {
 public:
  virtual ~PrefillEngine() = default;
  virtual std::string name() const = 0;  // "cpu"
  // Bytes one Run over num_tokens with `config` needs beyond the weights (activations, K/V,
  // scratch): host memory on the cpu engine, device memory on the cuda one.
  virtual int64_t WorkspaceBytes(int64_t num_tokens, const AnchorConfig& config) const = 0;
  // Whether this engine supports a valid `config` (FAILED_PRECONDITION naming the field when it
  // does not, e.g. a mass target with step > 16 on the cuda engine). The service asks before
  // queueing a request; Run refuses such a task the same way.
  virtual absl::Status CanRun(const AnchorConfig& config) const { return absl::OkStatus(); }
  // Validates the task (ids in range, layer range, dtype) with INVALID_ARGUMENT naming the field.
  virtual absl::StatusOr<PrefillResult> Run(const PrefillTask& task, KvSink* sink) = 0;
  // Page-locked host memory the engine keeps between runs (the CUDA engine's K/V ring).
  virtual int64_t KeptPinnedHostBytes() const { return 0; }
};

}  // namespace anchorserve
