// The subset of a Hugging Face config.json that a Llama- or Qwen2-family causal LM needs, parsed
// and validated up front so that the loader and the engines can rely on consistent shapes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"

namespace anchorserve {

enum class Architecture {
  kLlama,  // LlamaForCausalLM: no biases
  kQwen2,  // Qwen2ForCausalLM: q/k/v projections carry a bias, o_proj does not
};

absl::string_view ArchitectureName(Architecture architecture);

enum class RopeType {
  kDefault,  // inv_freq_i = theta^(-2i/d)
  kLlama3,   // Llama 3.1 frequency-dependent scaling of the default frequencies
};

struct RopeParameters {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  // kLlama3 only.
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  int num_layers = 0;         // num_hidden_layers
  int hidden_size = 0;        // H
  int intermediate_size = 0;  // I
  int num_heads = 0;          // Hq
  int num_kv_heads = 0;       // Hkv
  int head_dim = 0;           // d
  int64_t vocab_size = 0;     // V
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeParameters rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;                // true for Qwen2
  std::optional<DType> declared_dtype;  // torch_dtype / dtype, when present

  int64_t QDim() const { return int64_t{num_heads} * head_dim; }
  int64_t KvDim() const { return int64_t{num_kv_heads} * head_dim; }
};

// Parses config.json text. `file` names the file in error messages. INVALID_ARGUMENT for malformed
// or inconsistent content (bad JSON, a missing or mistyped field, heads not divisible, ...);
// FAILED_PRECONDITION for well-formed configs this engine does not run (another architecture,
// sliding-window attention, mixture of experts, another activation or RoPE type, Llama biases).
// Messages name the file and the field.
//
// Both dialects are accepted: top-level rope_theta + rope_scaling (hub checkpoints) and
// rope_parameters (what transformers 5 writes); torch_dtype or dtype.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json, absl::string_view file);

}  // namespace anchorserve
