// The CPU engine against transformers' own fp32 forward pass: per-layer K/V of its cache and the
// last logits, written by scripts/transformers_golden.py into
// tests/data/golden/<preset>.safetensors. Skipped only when that folder does not exist; a missing
// or malformed file fails.
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "model/cpu/cpu_prefill_engine.h"
#include "model/safetensors.h"
#include "tests/model/engine_test_util.h"
#include "tests/model/tiny_models.h"

namespace anchorserve {
namespace {

namespace fs = std::filesystem;

// `name` as doubles, after checking dtype F32 and `shape`.
std::vector<double> GoldenTensor(const SafetensorsFile& file, const std::string& name,
                                 const std::vector<int64_t>& shape) {
  const StoredTensor* view = file.Find(name);
  if (view == nullptr) {
    ADD_FAILURE() << file.path() << ": no tensor '" << name << "'";
    return {};
  }
  if (view->dtype != DType::kFp32 || view->shape != shape) {
    ADD_FAILURE() << file.path() << ": tensor '" << name << "' is "
                  << std::string(SafetensorsDTypeName(view->dtype)) << " " << view->ShapeString()
                  << ", expected F32 [" << absl::StrJoin(shape, ", ") << "]";
    return {};
  }
  std::vector<float> values(static_cast<size_t>(view->NumElements()));
  ConvertToFloat(view->data, DType::kFp32, values.size(), values.data());
  return std::vector<double>(values.begin(), values.end());
}

class TransformersGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TransformersGoldenTest, DenseEngineMatchesTransformers) {
  const fs::path folder = ANCHOR_GOLDEN_DIR;
  if (!fs::is_directory(folder)) {
    GTEST_SKIP() << folder.string()
                 << " does not exist: generate it with scripts/transformers_golden.py "
                    "--out=tests/data/golden on a machine with torch and transformers";
  }
  const std::string preset = GetParam();
  const fs::path path = folder / (preset + ".safetensors");
  ASSERT_TRUE(fs::exists(path)) << path.string() << " is missing from the golden folder";
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> golden =
      SafetensorsFile::Open(path.string());
  ASSERT_TRUE(golden.ok()) << golden.status();
  const std::map<std::string, std::string>& meta = (*golden)->metadata();
  for (const char* key :
       {"preset", "fingerprint", "prompt_ids", "transformers_version", "torch_version"}) {
    ASSERT_TRUE(meta.count(key)) << path.string() << ": metadata '" << key << "' is missing";
  }
  EXPECT_EQ(meta.at("preset"), preset);
  RecordProperty("transformers_version", meta.at("transformers_version"));
  RecordProperty("torch_version", meta.at("torch_version"));
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(meta.at("prompt_ids"), ',')) {
    int32_t id = 0;
    ASSERT_TRUE(absl::SimpleAtoi(part, &id)) << "prompt_ids: '" << part << "'";
    ids.push_back(id);
  }
  ASSERT_FALSE(ids.empty());

  // The same generator must have produced the same checkpoint.
  const absl::StatusOr<std::string> dir = testing::TinyModelDir(preset);
  ASSERT_TRUE(dir.ok()) << dir.status();
  const Model& model = testing::CachedModel(*dir);
  ASSERT_EQ(model.fingerprint(), meta.at("fingerprint"))
      << "scripts/make_tiny_model.py now writes a different " << preset
      << " than the one the goldens came from: regenerate them";
  const ModelConfig& c = model.config();
  const int64_t n = static_cast<int64_t>(ids.size());

  const absl::StatusOr<std::unique_ptr<PrefillEngine>> engine = CreateCpuPrefillEngine(model, 2);
  ASSERT_TRUE(engine.ok()) << engine.status();
  PrefillTask task;
  task.token_ids = ids;
  task.config.mode = AttentionMode::kDense;
  task.kv_layer_end = c.num_layers;
  task.kv_dtype = DType::kFp32;
  task.kv_layout = Layout::kHeadMajor;
  testing::RecordingSink sink;
  const absl::StatusOr<PrefillResult> result = (*engine)->Run(task, &sink);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(static_cast<int>(sink.layers.size()), c.num_layers);

  // Both sides are fp32 computations with independent rounding errors of the reference's scale,
  // so their difference has sqrt(2) times that scale; transformers alone must match the fp64
  // reference within one scale.
  const ReferenceForward& ref = testing::CachedReference(*dir, ids);
  const std::vector<int64_t> kv_shape = {c.num_kv_heads, n, c.head_dim};
  for (int layer = 0; layer < c.num_layers; ++layer) {
    for (const bool is_k : {true, false}) {
      const std::string name = absl::StrCat("layers.", layer, is_k ? ".k" : ".v");
      const std::vector<double> expected = GoldenTensor(**golden, name, kv_shape);
      ASSERT_FALSE(expected.empty());
      const std::vector<double>& sigma = is_k ? ref.k_sigma[layer] : ref.v_sigma[layer];
      const std::vector<char>& bytes = is_k ? sink.layers[layer].k : sink.layers[layer].v;
      const testing::Comparison engine_vs_hf =
          testing::CompareKv(bytes, DType::kFp32, Layout::kHeadMajor, n, c.num_kv_heads, c.head_dim,
                             expected, sigma, /*sigma_scale=*/M_SQRT2);
      EXPECT_TRUE(engine_vs_hf.ok()) << name << ": " << engine_vs_hf.ToString();
      std::vector<float> hf(expected.begin(), expected.end());
      const testing::Comparison hf_vs_exact =
          testing::CompareValues(hf, is_k ? ref.k[layer] : ref.v[layer], sigma);
      EXPECT_TRUE(hf_vs_exact.ok())
          << name << " (transformers vs fp64): " << hf_vs_exact.ToString();
    }
  }
  const std::vector<double> logits = GoldenTensor(**golden, "logits", {c.vocab_size});
  ASSERT_FALSE(logits.empty());
  const testing::Comparison logits_check =
      testing::CompareValues(result->last_logits, logits, ref.logits_sigma, M_SQRT2);
  EXPECT_TRUE(logits_check.ok()) << "logits: " << logits_check.ToString();
  EXPECT_EQ(testing::ArgMax(result->last_logits), testing::ArgMax(logits));
}

INSTANTIATE_TEST_SUITE_P(Presets, TransformersGoldenTest,
                         ::testing::ValuesIn(testing::TinyPresets()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

}  // namespace
}  // namespace anchorserve
