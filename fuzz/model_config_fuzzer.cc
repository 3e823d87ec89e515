// config.json parsing (model/model_config.cc) over arbitrary text: never a crash, and a config it
// accepts has the positive sizes the engines divide by.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<anchorserve::ModelConfig> config =
      anchorserve::ParseModelConfig({reinterpret_cast<const char*>(data), size}, "config.json");
  if (!config.ok()) return 0;
  if (config->num_heads <= 0 || config->num_kv_heads <= 0 || config->head_dim <= 0 ||
      config->num_layers <= 0 || config->vocab_size <= 0 ||
      config->num_heads % config->num_kv_heads != 0) {
    std::abort();
  }
  return 0;
}
