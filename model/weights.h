// The Hugging Face tensor-name table of Llama/Qwen2 causal LMs, checked against the config, and
// the weights in fp32 for the CPU engine.
//
// Memory: the CPU engine computes in fp32, so bf16/fp16 checkpoints are converted at load and
// held at 4 bytes per parameter (twice the file size; about 4.9 GB for a 1.2B-parameter model).
// fp32 tensors whose file offset is 4-byte aligned are used in place from the read-only mapping,
// which the kernel pages in from the file and may evict. Converted tensors' file pages are
// released right after conversion, so the file does not stay resident next to its copy.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace anchorserve {

// Linear weights are [out, in] (y = x W^T), as transformers stores them.
struct LayerWeights {
  const float* input_norm = nullptr;           // [H]
  const float* q_proj = nullptr;               // [Hq*d, H]
  const float* k_proj = nullptr;               // [Hkv*d, H]
  const float* v_proj = nullptr;               // [Hkv*d, H]
  const float* q_bias = nullptr;               // [Hq*d], Qwen2 only
  const float* k_bias = nullptr;               // [Hkv*d], Qwen2 only
  const float* v_bias = nullptr;               // [Hkv*d], Qwen2 only
  const float* o_proj = nullptr;               // [H, Hq*d]
  const float* post_attention_norm = nullptr;  // [H]
  const float* gate_proj = nullptr;            // [I, H]
  const float* up_proj = nullptr;              // [I, H]
  const float* down_proj = nullptr;            // [H, I]
};

struct ModelWeights {
  const float* embed_tokens = nullptr;  // [V, H]
  std::vector<LayerWeights> layers;     // [num_layers]
  const float* final_norm = nullptr;    // [H]
  const float* lm_head = nullptr;       // [V, H]; embed_tokens when the embeddings are tied
};

// One tensor the model needs: its checkpoint name and expected shape.
struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// Every tensor `config` needs, in a fixed order: embeddings, then per layer input_layernorm,
// q/k/v (+ biases for Qwen2), o, post_attention_layernorm, gate, up, down, then model.norm and
// lm_head (absent when tied).
std::vector<WeightSpec> ExpectedWeights(const ModelConfig& config);

// Checks that `store` holds every expected tensor with its shape, and no layer beyond the
// config's count. INVALID_ARGUMENT naming the tensor (and its file) otherwise.
absl::Status CheckWeightTable(const ModelConfig& config, const TensorStore& store);

// The checked weights in fp32, owning whatever they point to.
class Weights {
 public:
  // Checks the table, then converts (with `threads` workers, 0 = all) what is not fp32 already.
  // RESOURCE_EXHAUSTED when the fp32 copies cannot be allocated.
  static absl::StatusOr<std::unique_ptr<Weights>> Load(const ModelConfig& config,
                                                       std::unique_ptr<TensorStore> store,
                                                       int threads);

  const ModelWeights& get() const { return weights_; }
  const TensorStore& store() const { return *store_; }
  int64_t num_parameters() const { return num_parameters_; }
  // Bytes of fp32 copies held on the heap (the rest is used in place from the mapping).
  int64_t converted_bytes() const { return converted_bytes_; }
  // dtype of model.embed_tokens.weight on disk (checkpoints normally use one dtype throughout).
  DType disk_dtype() const { return disk_dtype_; }

 private:
  struct FreeDeleter {
    void operator()(float* p) const;
  };

  Weights() = default;

  std::unique_ptr<TensorStore> store_;
  std::vector<std::unique_ptr<float[], FreeDeleter>> buffers_;
  ModelWeights weights_;
  int64_t num_parameters_ = 0;
  int64_t converted_bytes_ = 0;
  DType disk_dtype_ = DType::kFp32;
};

}  // namespace anchorserve
