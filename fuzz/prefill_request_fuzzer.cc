// PrefillRequest validation (server/prefill_service.cc) against a small model's config, from
// arbitrary message bytes: never a crash; an accepted request's tokens are inside the vocab.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "anchorserve/v1/prefill.pb.h"
#include "fuzz/quiet_protobuf.h"
#include "model/model_config.h"
#include "server/prefill_service.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  anchorserve::fuzz::QuietProtobuf();
  static const anchorserve::ModelConfig* model_config = [] {
    auto* config = new anchorserve::ModelConfig();
    config->architecture = anchorserve::Architecture::kLlama;
    config->vocab_size = 512;
    config->hidden_size = 64;
    config->intermediate_size = 128;
    config->num_layers = 3;
    config->num_heads = 4;
    config->num_kv_heads = 2;
    config->head_dim = 16;
    config->max_position_embeddings = 256;
    return config;
  }();
  static const anchorserve::ServerConfig server_config;
  anchorserve::v1::PrefillRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<anchorserve::PrefillSpec> spec = anchorserve::PrefillSpecFromRequest(
      request, *model_config, "0123456789abcdef", "/models/fuzz", server_config);
  if (!spec.ok()) return 0;
  for (int32_t id : spec->token_ids) {
    if (id < 0 || id >= model_config->vocab_size) std::abort();
  }
  if (spec->kv_layer_begin < 0 || spec->kv_layer_end > model_config->num_layers) std::abort();
  return 0;
}
