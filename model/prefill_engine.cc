#include "model/prefill_engine.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

namespace anchorserve {

absl::Status ValidatePrefillTask(const ModelConfig& config, const PrefillTask& task,
                                 const KvSink* sink, int64_t max_tokens, absl::string_view engine) {
  const int64_t n = static_cast<int64_t>(task.token_ids.size());
  if (n == 0) return absl::InvalidArgumentError("token_ids is empty");
  if (n > max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids has ", n, " tokens, more than the ",
                                                   engine, " engine's limit of ", max_tokens));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = task.token_ids[i];
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  if (task.kv_layer_begin < 0 || task.kv_layer_begin > task.kv_layer_end ||
      task.kv_layer_end > config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_layer_begin/kv_layer_end must satisfy 0 <= begin <= end <= ", config.num_layers,
        " (num_layers), got [", task.kv_layer_begin, ", ", task.kv_layer_end, ")"));
  }
  if (task.kv_dtype != DType::kBf16 && task.kv_dtype != DType::kFp16 &&
      task.kv_dtype != DType::kFp32) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_dtype ", static_cast<int>(task.kv_dtype), " is not a DType"));
  }
  if (task.kv_layout != Layout::kHeadMajor && task.kv_layout != Layout::kTokenMajor) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_layout ", static_cast<int>(task.kv_layout), " is not a Layout"));
  }
  if (task.kv_layer_end > task.kv_layer_begin && sink == nullptr) {
    return absl::InvalidArgumentError("sink is null but kv_layer_begin < kv_layer_end");
  }
  ANCHOR_RETURN_IF_ERROR(ValidateAnchorConfig(task.config));
  if (task.config.mode == AttentionMode::kAuto) {
    return absl::InvalidArgumentError(
        "config.mode auto must be resolved (ResolveMode) before an engine runs the prefill");
  }
  // The model fixes the softmax scale; a caller's explicit value must agree with it.
  const float model_scale = 1.0f / std::sqrt(static_cast<float>(config.head_dim));
  if (task.config.softmax_scale != 0.0f && task.config.softmax_scale != model_scale) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.softmax_scale must be 0 (the model's 1/sqrt(head_dim) = ", model_scale,
                     "), got ", task.config.softmax_scale));
  }
  return absl::OkStatus();
}

}  // namespace anchorserve
