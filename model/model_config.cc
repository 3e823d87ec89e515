#include "model/model_config.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/attention_types.h"
#include "kernels/status_macros.h"
#include "nlohmann/json.hpp"

namespace anchorserve {
namespace {

using Json = nlohmann::json;

// Field accessors of one JSON object; every error names the file and the field.
class Fields {
 public:
  Fields(const Json& object, absl::string_view file, std::string prefix = "")
      : object_(object), file_(file), prefix_(std::move(prefix)) {}

  // Present and not null.
  bool Has(const char* name) const {
    auto it = object_.find(name);
    return it != object_.end() && !it->is_null();
  }

  absl::Status Invalid(const char* name, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": field '", prefix_, name, "' ", what));
  }
  absl::Status Unsupported(const char* name, absl::string_view what) const {
    return absl::FailedPreconditionError(
        absl::StrCat(file_, ": field '", prefix_, name, "' ", what));
  }

  // An integer in [min_value, max_value]; `fallback` when absent (nullopt: required).
  absl::StatusOr<int64_t> Int(const char* name, int64_t min_value, int64_t max_value,
                              std::optional<int64_t> fallback = std::nullopt) const {
    if (!Has(name)) {
      if (fallback.has_value()) return *fallback;
      return Invalid(name, "is missing");
    }
    const Json& value = object_.at(name);
    int64_t result = 0;
    if (value.is_number_unsigned()) {
      const uint64_t u = value.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Invalid(name, "is out of range");
      }
      result = static_cast<int64_t>(u);
    } else if (value.is_number_integer()) {
      result = value.get<int64_t>();
    } else {
      return Invalid(name, absl::StrCat("must be an integer, got ", value.type_name()));
    }
    if (result < min_value || result > max_value) {
      return Invalid(name,
                     absl::StrCat("must be in [", min_value, ", ", max_value, "], got ", result));
    }
    return result;
  }

  // A finite number; `fallback` when absent.
  absl::StatusOr<double> Number(const char* name, std::optional<double> fallback) const {
    if (!Has(name)) {
      if (fallback.has_value()) return *fallback;
      return Invalid(name, "is missing");
    }
    const Json& value = object_.at(name);
    if (!value.is_number()) {
      return Invalid(name, absl::StrCat("must be a number, got ", value.type_name()));
    }
    const double result = value.get<double>();
    if (!std::isfinite(result)) return Invalid(name, "must be finite");
    return result;
  }

  absl::StatusOr<bool> Bool(const char* name, bool fallback) const {
    if (!Has(name)) return fallback;
    const Json& value = object_.at(name);
    if (!value.is_boolean()) {
      return Invalid(name, absl::StrCat("must be a boolean, got ", value.type_name()));
    }
    return value.get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> String(const char* name) const {
    if (!Has(name)) return std::optional<std::string>();
    const Json& value = object_.at(name);
    if (!value.is_string()) {
      return Invalid(name, absl::StrCat("must be a string, got ", value.type_name()));
    }
    return std::optional<std::string>(value.get<std::string>());
  }

 private:
  const Json& object_;
  absl::string_view file_;
  std::string prefix_;
};

constexpr int64_t kMaxDim = int64_t{1} << 20;  // hidden, intermediate and head counts
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxLayers = 4096;

// Mixture-of-experts keys used by the Llama/Qwen families' MoE variants.
constexpr const char* kMoeFields[] = {"num_experts",         "num_local_experts",
                                      "num_experts_per_tok", "moe_intermediate_size",
                                      "n_routed_experts",    "shared_expert_intermediate_size"};

absl::StatusOr<RopeParameters> ParseRope(const Json& root, absl::string_view file) {
  const Fields top(root, file);
  RopeParameters rope;
  // transformers 5 writes rope_parameters (theta inside); hub files carry rope_theta and an
  // optional rope_scaling. rope_parameters wins when both are present, as in transformers 5.
  const bool new_dialect = top.Has("rope_parameters");
  const char* block_name = new_dialect ? "rope_parameters" : "rope_scaling";
  if (!new_dialect) {
    ANCHOR_ASSIGN_OR_RETURN(rope.theta, top.Number("rope_theta", 10000.0));
  }
  if (!top.Has(block_name)) {
    if (rope.theta <= 0) return top.Invalid("rope_theta", "must be positive");
    return rope;
  }
  const Json& block = root.at(block_name);
  if (!block.is_object()) {
    return top.Invalid(block_name, absl::StrCat("must be an object, got ", block.type_name()));
  }
  const Fields fields(block, file, absl::StrCat(block_name, "."));
  if (new_dialect) {
    ANCHOR_ASSIGN_OR_RETURN(rope.theta, fields.Number("rope_theta", 10000.0));
  }
  if (rope.theta <= 0) {
    return new_dialect ? fields.Invalid("rope_theta", "must be positive")
                       : top.Invalid("rope_theta", "must be positive");
  }
  // The key was "type" in older files.
  const char* type_key = fields.Has("rope_type") ? "rope_type" : "type";
  ANCHOR_ASSIGN_OR_RETURN(std::optional<std::string> type, fields.String(type_key));
  if (!type.has_value() || *type == "default") {
    rope.type = RopeType::kDefault;
  } else if (*type == "llama3") {
    rope.type = RopeType::kLlama3;
  } else {
    return fields.Unsupported(type_key, absl::StrCat("'", *type,
                                                     "' is not supported (default and llama3 "
                                                     "are)"));
  }
  if (fields.Has("partial_rotary_factor")) {
    ANCHOR_ASSIGN_OR_RETURN(double partial, fields.Number("partial_rotary_factor", 1.0));
    if (partial != 1.0) return fields.Unsupported("partial_rotary_factor", "must be 1");
  }
  if (rope.type == RopeType::kLlama3) {
    ANCHOR_ASSIGN_OR_RETURN(rope.factor, fields.Number("factor", std::nullopt));
    ANCHOR_ASSIGN_OR_RETURN(rope.low_freq_factor, fields.Number("low_freq_factor", std::nullopt));
    ANCHOR_ASSIGN_OR_RETURN(rope.high_freq_factor, fields.Number("high_freq_factor", std::nullopt));
    ANCHOR_ASSIGN_OR_RETURN(
        rope.original_max_position_embeddings,
        fields.Int("original_max_position_embeddings", 1, std::numeric_limits<int32_t>::max()));
    if (rope.factor <= 0) return fields.Invalid("factor", "must be positive");
    if (rope.low_freq_factor <= 0) return fields.Invalid("low_freq_factor", "must be positive");
    if (rope.high_freq_factor <= rope.low_freq_factor) {
      return fields.Invalid("high_freq_factor", "must be greater than low_freq_factor");
    }
  }
  return rope;
}

absl::StatusOr<std::optional<DType>> ParseDType(const Fields& top) {
  // transformers 5 writes "dtype", older versions "torch_dtype".
  const char* key = top.Has("dtype") ? "dtype" : "torch_dtype";
  ANCHOR_ASSIGN_OR_RETURN(std::optional<std::string> name, top.String(key));
  if (!name.has_value()) return std::optional<DType>();
  if (*name == "bfloat16") return std::optional<DType>(DType::kBf16);
  if (*name == "float16") return std::optional<DType>(DType::kFp16);
  if (*name == "float32") return std::optional<DType>(DType::kFp32);
  return top.Unsupported(
      key, absl::StrCat("'", *name, "' is not supported (bfloat16, float16, float32)"));
}

}  // namespace

absl::string_view ArchitectureName(Architecture architecture) {
  switch (architecture) {
    case Architecture::kLlama:
      return "LlamaForCausalLM";
    case Architecture::kQwen2:
      return "Qwen2ForCausalLM";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json, absl::string_view file) {
  const Json root = Json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": the top level must be an object"));
  }
  const Fields top(root, file);
  ModelConfig config;

  if (!top.Has("architectures")) return top.Invalid("architectures", "is missing");
  const Json& architectures = root.at("architectures");
  if (!architectures.is_array() || architectures.size() != 1 || !architectures[0].is_string()) {
    return top.Invalid("architectures", "must be a list of exactly one string");
  }
  const std::string architecture = architectures[0].get<std::string>();
  if (architecture == "LlamaForCausalLM") {
    config.architecture = Architecture::kLlama;
  } else if (architecture == "Qwen2ForCausalLM") {
    config.architecture = Architecture::kQwen2;
    config.qkv_bias = true;
  } else {
    return top.Unsupported("architectures", absl::StrCat("'", architecture,
                                                         "' is not supported (LlamaForCausalLM, "
                                                         "Qwen2ForCausalLM)"));
  }
  const bool llama = config.architecture == Architecture::kLlama;

  ANCHOR_ASSIGN_OR_RETURN(int64_t layers, top.Int("num_hidden_layers", 1, kMaxLayers));
  ANCHOR_ASSIGN_OR_RETURN(int64_t hidden, top.Int("hidden_size", 1, kMaxDim));
  ANCHOR_ASSIGN_OR_RETURN(int64_t intermediate, top.Int("intermediate_size", 1, kMaxDim));
  ANCHOR_ASSIGN_OR_RETURN(int64_t heads, top.Int("num_attention_heads", 1, kMaxDim));
  ANCHOR_ASSIGN_OR_RETURN(int64_t kv_heads, top.Int("num_key_value_heads", 1, kMaxDim, heads));
  if (heads % kv_heads != 0) {
    return top.Invalid(
        "num_key_value_heads",
        absl::StrCat("(", kv_heads, ") must divide num_attention_heads (", heads, ")"));
  }
  int64_t head_dim = 0;
  if (top.Has("head_dim")) {
    ANCHOR_ASSIGN_OR_RETURN(head_dim, top.Int("head_dim", 1, kMaxDim));
  } else {
    if (hidden % heads != 0) {
      return top.Invalid("hidden_size",
                         absl::StrCat("(", hidden, ") must be a multiple of num_attention_heads (",
                                      heads, ") when head_dim is absent"));
    }
    head_dim = hidden / heads;
  }
  if (head_dim % 2 != 0) {
    return top.Invalid("head_dim", absl::StrCat("must be even for RoPE, got ", head_dim));
  }
  if (head_dim > kMaxHeadDim) {
    return top.Unsupported("head_dim",
                           absl::StrCat("must be at most ", kMaxHeadDim, ", got ", head_dim));
  }
  ANCHOR_ASSIGN_OR_RETURN(config.vocab_size, top.Int("vocab_size", 1, kMaxVocab));
  ANCHOR_ASSIGN_OR_RETURN(config.max_position_embeddings,
                          top.Int("max_position_embeddings", 1, std::numeric_limits<int32_t>::max(),
                                  llama ? 2048 : 32768));
  ANCHOR_ASSIGN_OR_RETURN(config.rms_norm_eps, top.Number("rms_norm_eps", 1e-6));
  if (config.rms_norm_eps <= 0) return top.Invalid("rms_norm_eps", "must be positive");
  ANCHOR_ASSIGN_OR_RETURN(config.tie_word_embeddings, top.Bool("tie_word_embeddings", false));

  ANCHOR_ASSIGN_OR_RETURN(std::optional<std::string> act, top.String("hidden_act"));
  if (act.has_value() && *act != "silu") {
    return top.Unsupported("hidden_act", absl::StrCat("'", *act, "' is not supported (silu)"));
  }
  if (llama) {
    ANCHOR_ASSIGN_OR_RETURN(bool attention_bias, top.Bool("attention_bias", false));
    if (attention_bias) return top.Unsupported("attention_bias", "must be false");
    ANCHOR_ASSIGN_OR_RETURN(bool mlp_bias, top.Bool("mlp_bias", false));
    if (mlp_bias) return top.Unsupported("mlp_bias", "must be false");
  }
  ANCHOR_ASSIGN_OR_RETURN(bool sliding, top.Bool("use_sliding_window", false));
  if (sliding) {
    return top.Unsupported("use_sliding_window",
                           "is true; sliding-window attention is not "
                           "supported");
  }
  if (top.Has("layer_types")) {
    const Json& types = root.at("layer_types");
    if (!types.is_array()) return top.Invalid("layer_types", "must be a list");
    for (const Json& type : types) {
      if (!type.is_string() || type.get<std::string>() != "full_attention") {
        return top.Unsupported("layer_types", "may only list 'full_attention'");
      }
    }
  }
  for (const char* field : kMoeFields) {
    if (!top.Has(field)) continue;
    const Json& value = root.at(field);
    if (value.is_number() && value.get<double>() == 0) continue;
    return top.Unsupported(field, "is set; mixture-of-experts models are not supported");
  }
  ANCHOR_ASSIGN_OR_RETURN(config.rope, ParseRope(root, file));
  ANCHOR_ASSIGN_OR_RETURN(config.declared_dtype, ParseDType(top));

  config.num_layers = static_cast<int>(layers);
  config.hidden_size = static_cast<int>(hidden);
  config.intermediate_size = static_cast<int>(intermediate);
  config.num_heads = static_cast<int>(heads);
  config.num_kv_heads = static_cast<int>(kv_heads);
  config.head_dim = static_cast<int>(head_dim);
  return config;
}

}  // namespace anchorserve
