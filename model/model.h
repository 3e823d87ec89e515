// A loaded Llama/Qwen2-family checkpoint: config, fp32 weights and identity.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"
#include "model/model_config.h"
#include "model/weights.h"

namespace anchorserve {

class Model {
 public:
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_->get(); }
  const Weights& weight_storage() const { return *weights_; }
  const std::string& dir() const { return dir_; }

  // SHA-256 (hex) over config.json's bytes and every checkpoint tensor's name, dtype and shape
  // (not the weight bytes, so it is cheap). The exact byte stream is FingerprintInput().
  const std::string& fingerprint() const { return fingerprint_; }
  int64_t num_parameters() const { return weights_->num_parameters(); }
  double load_seconds() const { return load_seconds_; }
  // K and V of every layer for one token: 2 * layers * Hkv * d * ElementSize(kv_dtype).
  int64_t KvBytesPerToken(DType kv_dtype) const;
  // The checkpoint's dtype on disk (that of model.embed_tokens.weight).
  DType weight_dtype() const { return weights_->disk_dtype(); }

 private:
  friend absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, int threads);
  Model() = default;

  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Weights> weights_;
  std::string fingerprint_;
  double load_seconds_ = 0;
};

// Loads `dir`/config.json and the safetensors checkpoint next to it (see TensorStore). `threads`
// converts the weights (0 = all hardware threads). Errors name the file, field or tensor.
absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, int threads);
inline absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir) {
  return LoadModel(dir, 0);
}

// The bytes Model::fingerprint() hashes:
//   "anchorserve-model-fingerprint-v1\n"
//   "config.json <byte count>\n" <config.json bytes> "\n"
//   then per tensor, sorted by name: <name> " " <BF16|F16|F32> " " <dims joined by ","> "\n"
// (a scalar has an empty dims field). Documented so that other tools can recompute it.
std::string FingerprintInput(absl::string_view config_json, const TensorStore& store);

}  // namespace anchorserve
