// Test checkpoints from scripts/make_tiny_model.py: the directories the CTest fixture generated
// (ANCHOR_TINY_MODELS_DIR), or generated on first use into a temporary directory when the test
// binary runs on its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"

namespace anchorserve::testing {

// The presets every engine test runs (default dtype bf16, one file).
inline const std::vector<std::string>& TinyPresets() {
  static const std::vector<std::string> presets = {"llama-tiny", "llama3-tiny", "qwen2-tiny"};
  return presets;
}

// Directory of `preset` written with weights in `dtype` in `shards` files. Variants the fixture
// does not provide are generated on demand.
absl::StatusOr<std::string> TinyModelDir(absl::string_view preset, DType dtype = DType::kBf16,
                                         int shards = 1);

// Runs make_tiny_model.py with `args`; returns its stdout.
absl::StatusOr<std::string> RunTinyModelScript(const std::string& args);

// A fresh empty temporary directory (removed at exit).
std::string MakeTempDir();

// n deterministic ids in [0, vocab).
std::vector<int32_t> TestIds(int64_t n, int64_t vocab, uint32_t seed);

}  // namespace anchorserve::testing
