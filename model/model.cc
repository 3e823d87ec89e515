#include "model/model.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/status_macros.h"
#include "model/sha256.h"

namespace anchorserve {

int64_t Model::KvBytesPerToken(DType kv_dtype) const {
  return 2 * int64_t{config_.num_layers} * config_.KvDim() *
         static_cast<int64_t>(ElementSize(kv_dtype));
}

std::string FingerprintInput(absl::string_view config_json, const TensorStore& store) {
  std::string input = absl::StrCat("anchorserve-model-fingerprint-v1\nconfig.json ",
                                   config_json.size(), "\n", config_json, "\n");
  for (const auto& [name, view] : store.tensors()) {
    absl::StrAppend(&input, name, " ", SafetensorsDTypeName(view->dtype), " ",
                    absl::StrJoin(view->shape, ","), "\n");
  }
  return input;
}

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, int threads) {
  const auto start = std::chrono::steady_clock::now();
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  std::ifstream in(config_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(config_path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(config_path, ": read failed"));
  const std::string config_json = text.str();

  std::unique_ptr<Model> model(new Model());
  model->dir_ = dir;
  ANCHOR_ASSIGN_OR_RETURN(model->config_, ParseModelConfig(config_json, config_path));
  ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::Open(dir));
  model->fingerprint_ = Sha256Hex(FingerprintInput(config_json, *store));
  ANCHOR_ASSIGN_OR_RETURN(model->weights_,
                          Weights::Load(model->config_, std::move(store), threads));
  model->load_seconds_ =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return model;
}

}  // namespace anchorserve
