#include "tests/model/tiny_models.h"

#include <stdio.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"

namespace anchorserve::testing {
namespace {

namespace fs = std::filesystem;

std::string VariantName(absl::string_view preset, DType dtype, int shards) {
  return absl::StrCat(preset, "_", std::string(DTypeName(dtype)), "_s", shards);
}

std::vector<std::string>& TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return *dirs;
}

void RemoveTempDirs() {
  for (const std::string& dir : TempDirs()) {
    std::error_code error;
    fs::remove_all(dir, error);
  }
}

}  // namespace

std::string MakeTempDir() {
  std::string pattern = (fs::temp_directory_path() / "anchor_model_test_XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) return "";
  if (TempDirs().empty()) std::atexit(RemoveTempDirs);
  TempDirs().push_back(pattern);
  return pattern;
}

// The build machine's paths, unless the environment names others: a test binary carried to a GPU
// host finds neither the source tree nor that Python there (scripts/gpu.sh sets both).
std::string FromEnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != 0 ? std::string(value) : fallback;
}

absl::StatusOr<std::string> RunTinyModelScript(const std::string& args) {
  const std::string python = FromEnvOr("ANCHOR_PYTHON", ANCHOR_PYTHON_EXECUTABLE);
  const std::string script = FromEnvOr(
      "ANCHOR_TINY_MODEL_SCRIPT", absl::StrCat(ANCHOR_SOURCE_DIR, "/scripts/make_tiny_model.py"));
  const std::string command = absl::StrCat("'", python, "' '", script, "' ", args);
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return absl::InternalError("popen failed: " + command);
  std::string out;
  char buffer[4096];
  size_t got;
  while ((got = fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, got);
  const int status = ::pclose(pipe);
  if (status != 0) {
    return absl::InternalError(absl::StrCat("command failed (status ", status, "): ", command));
  }
  return out;
}

absl::StatusOr<std::string> TinyModelDir(absl::string_view preset, DType dtype, int shards) {
  static std::mutex mutex;
  static auto* generated = new std::map<std::string, std::string>();
  std::lock_guard<std::mutex> lock(mutex);
  const std::string name = VariantName(preset, dtype, shards);
  if (const char* root = std::getenv("ANCHOR_TINY_MODELS_DIR"); root != nullptr && *root != 0) {
    const fs::path dir = fs::path(root) / name;
    if (fs::exists(dir / "config.json")) return dir.string();
  }
  auto it = generated->find(name);
  if (it != generated->end()) return it->second;
  const std::string base = MakeTempDir();
  if (base.empty()) return absl::InternalError("cannot create a temporary directory");
  const std::string dir = (fs::path(base) / name).string();
  const absl::StatusOr<std::string> out = RunTinyModelScript(
      absl::StrCat("--preset=", preset, " --dtype=", std::string(DTypeName(dtype)),
                   " --shards=", shards, " --out='", dir, "'"));
  if (!out.ok()) return out.status();
  generated->emplace(name, dir);
  return dir;
}

std::vector<int32_t> TestIds(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 engine(seed);  // fully specified by the standard: same ids everywhere
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& id : ids) id = static_cast<int32_t>(engine() % static_cast<uint32_t>(vocab));
  return ids;
}

}  // namespace anchorserve::testing
