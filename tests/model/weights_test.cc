// The weight table (names and shapes against the config), LoadModel, the fingerprint and SHA-256.
#include "model/weights.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/model.h"
#include "model/sha256.h"
#include "nlohmann/json.hpp"
#include "tests/model/tiny_models.h"

namespace anchorserve {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

ModelConfig SmallConfig(Architecture architecture, bool tied) {
  ModelConfig c;
  c.architecture = architecture;
  c.qkv_bias = architecture == Architecture::kQwen2;
  c.num_layers = 2;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 10;
  c.tie_word_embeddings = tied;
  return c;
}

// Writes `specs` as fp32 zeros into dir/model.safetensors.
void WriteCheckpoint(const std::string& dir, const std::vector<WeightSpec>& specs) {
  Json header;
  int64_t offset = 0;
  for (const WeightSpec& spec : specs) {
    int64_t count = 1;
    for (int64_t s : spec.shape) count *= s;
    header[spec.name] = {
        {"dtype", "F32"}, {"shape", spec.shape}, {"data_offsets", {offset, offset + 4 * count}}};
    offset += 4 * count;
  }
  const std::string text = header.dump();
  std::ofstream out((fs::path(dir) / "model.safetensors").string(), std::ios::binary);
  const uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(length >> (8 * i)));
  out << text << std::string(static_cast<size_t>(offset), '\0');
}

absl::Status CheckTable(const ModelConfig& config, const std::vector<WeightSpec>& specs) {
  const std::string dir = testing::MakeTempDir();
  WriteCheckpoint(dir, specs);
  auto store = TensorStore::Open(dir);
  if (!store.ok()) return store.status();
  return CheckWeightTable(config, **store);
}

TEST(WeightTableTest, ExpectedNamesAndShapes) {
  const std::vector<WeightSpec> llama = ExpectedWeights(SmallConfig(Architecture::kLlama, false));
  EXPECT_EQ(llama.size(), 1u + 2 * 9 + 2);
  EXPECT_EQ(llama.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(llama.front().shape, (std::vector<int64_t>{10, 8}));
  EXPECT_EQ(llama.back().name, "lm_head.weight");
  std::set<std::string> names;
  for (const WeightSpec& spec : llama) names.insert(spec.name);
  EXPECT_TRUE(names.count("model.layers.1.self_attn.o_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.down_proj.weight"));
  EXPECT_FALSE(names.count("model.layers.0.self_attn.q_proj.bias"));
  for (const WeightSpec& spec : llama) {
    if (spec.name == "model.layers.0.self_attn.k_proj.weight") {
      EXPECT_EQ(spec.shape, (std::vector<int64_t>{8, 8}));  // [Hkv * d, H]
    }
    if (spec.name == "model.layers.0.mlp.down_proj.weight") {
      EXPECT_EQ(spec.shape, (std::vector<int64_t>{8, 12}));  // [H, I]
    }
  }
  const std::vector<WeightSpec> qwen = ExpectedWeights(SmallConfig(Architecture::kQwen2, true));
  EXPECT_EQ(qwen.size(), 1u + 2 * 12 + 1);  // biases, no lm_head
}

TEST(WeightTableTest, CompleteTablePasses) {
  for (bool tied : {false, true}) {
    for (Architecture a : {Architecture::kLlama, Architecture::kQwen2}) {
      const ModelConfig config = SmallConfig(a, tied);
      EXPECT_TRUE(CheckTable(config, ExpectedWeights(config)).ok());
    }
  }
}

TEST(WeightTableTest, MissingTensorIsNamed) {
  const ModelConfig config = SmallConfig(Architecture::kQwen2, false);
  for (const std::string name : {"model.layers.1.self_attn.v_proj.bias", "lm_head.weight",
                                 "model.norm.weight", "model.layers.0.mlp.up_proj.weight"}) {
    std::vector<WeightSpec> specs;
    for (const WeightSpec& spec : ExpectedWeights(config)) {
      if (spec.name != name) specs.push_back(spec);
    }
    const absl::Status status = CheckTable(config, specs);
    ASSERT_FALSE(status.ok()) << name;
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(status.message().find("'" + name + "'"), absl::string_view::npos) << status;
    EXPECT_NE(status.message().find("missing"), absl::string_view::npos) << status;
  }
}

TEST(WeightTableTest, MisShapedTensorIsNamedWithBothShapes) {
  const ModelConfig config = SmallConfig(Architecture::kLlama, false);
  std::vector<WeightSpec> specs = ExpectedWeights(config);
  for (WeightSpec& spec : specs) {
    if (spec.name == "model.layers.1.self_attn.q_proj.weight") spec.shape = {8, 16};
  }
  const absl::Status status = CheckTable(config, specs);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("'model.layers.1.self_attn.q_proj.weight'"),
            absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("[8, 16]"), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find("[16, 8]"), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find("model.safetensors"), absl::string_view::npos) << status;
}

TEST(WeightTableTest, LayerBeyondTheConfigIsAnError) {
  const ModelConfig config = SmallConfig(Architecture::kLlama, false);
  std::vector<WeightSpec> specs = ExpectedWeights(config);
  specs.push_back({"model.layers.2.input_layernorm.weight", {8}});
  const absl::Status status = CheckTable(config, specs);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("model.layers.2.input_layernorm.weight"), absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("num_hidden_layers"), absl::string_view::npos) << status;
}

TEST(WeightTableTest, UnrelatedExtraTensorsAreIgnored) {
  const ModelConfig config = SmallConfig(Architecture::kLlama, true);
  std::vector<WeightSpec> specs = ExpectedWeights(config);
  specs.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {2}});
  specs.push_back({"lm_head.weight", {10, 8}});  // tied: the embedding is used
  EXPECT_TRUE(CheckTable(config, specs).ok());
}

TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces that straddle the 64-byte blocks.
  Sha256 million;
  const std::string chunk(200, 'a');
  size_t fed = 0;
  for (size_t i = 0; fed < 1000000; ++i) {
    const size_t piece = std::min<size_t>(1 + (i * 37) % 200, 1000000 - fed);
    million.Update(chunk.data(), piece);
    fed += piece;
  }
  EXPECT_EQ(million.FinishHex(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(LoadModelTest, LoadsEveryPreset) {
  for (const std::string& preset : testing::TinyPresets()) {
    SCOPED_TRACE(preset);
    const auto dir = testing::TinyModelDir(preset);
    ASSERT_TRUE(dir.ok()) << dir.status();
    const auto model = LoadModel(*dir);
    ASSERT_TRUE(model.ok()) << model.status();
    const ModelConfig& c = (*model)->config();
    int64_t expected_parameters = 0;
    for (const WeightSpec& spec : ExpectedWeights(c)) {
      int64_t count = 1;
      for (int64_t s : spec.shape) count *= s;
      expected_parameters += count;
    }
    EXPECT_EQ((*model)->num_parameters(), expected_parameters);
    EXPECT_EQ((*model)->weight_dtype(), DType::kBf16);
    EXPECT_EQ((*model)->fingerprint().size(), 64u);
    EXPECT_GT((*model)->load_seconds(), 0.0);
    EXPECT_EQ((*model)->KvBytesPerToken(DType::kBf16), 2 * c.num_layers * c.KvDim() * 2);
    EXPECT_EQ((*model)->KvBytesPerToken(DType::kFp32), 2 * c.num_layers * c.KvDim() * 4);
    const ModelWeights& w = (*model)->weights();
    ASSERT_EQ(static_cast<int>(w.layers.size()), c.num_layers);
    EXPECT_EQ(w.lm_head == w.embed_tokens, c.tie_word_embeddings);
    EXPECT_EQ(w.layers[0].q_bias != nullptr, c.qkv_bias);
    // The converted embedding equals the file's bf16 values.
    const StoredTensor* embed =
        (*model)->weight_storage().store().Find("model.embed_tokens.weight");
    ASSERT_NE(embed, nullptr);
    uint16_t bits;
    std::memcpy(&bits, embed->data + 2 * 77, 2);
    EXPECT_EQ(w.embed_tokens[77], Bf16ToFloat(bits));
  }
}

TEST(LoadModelTest, FingerprintIdentifiesConfigAndTensorsNotSharding) {
  const auto a = testing::TinyModelDir("qwen2-tiny", DType::kFp32, 1);
  const auto b = testing::TinyModelDir("qwen2-tiny", DType::kFp32, 3);
  const auto c = testing::TinyModelDir("qwen2-tiny", DType::kBf16, 1);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  const auto single = LoadModel(*a);
  const auto sharded = LoadModel(*b, /*threads=*/1);
  const auto bf16 = LoadModel(*c);
  ASSERT_TRUE(single.ok()) << single.status();
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*single)->fingerprint(), (*sharded)->fingerprint());
  EXPECT_NE((*single)->fingerprint(), (*bf16)->fingerprint());
  EXPECT_EQ((*sharded)->weight_storage().store().files().size(), 3u);
  EXPECT_EQ((*single)->weight_dtype(), DType::kFp32);
  // fp32 weights are used in place; bf16 ones are converted.
  EXPECT_EQ((*single)->weight_storage().converted_bytes(), 0);
  EXPECT_GT((*bf16)->weight_storage().converted_bytes(), 0);
  const ModelWeights& x = (*single)->weights();
  const ModelWeights& y = (*sharded)->weights();
  const int64_t count = 64 * 64;
  for (int64_t i = 0; i < count; ++i) ASSERT_EQ(x.layers[1].o_proj[i], y.layers[1].o_proj[i]);

  // The documented byte stream.
  const std::string input = FingerprintInput("{}", (*single)->weight_storage().store());
  EXPECT_EQ(input.rfind("anchorserve-model-fingerprint-v1\nconfig.json 2\n{}\n", 0), 0u);
  EXPECT_NE(input.find("\nmodel.layers.0.self_attn.q_proj.bias F32 64\n"), std::string::npos);
  EXPECT_NE(input.find("\nmodel.embed_tokens.weight F32 544,64\n"), std::string::npos);
}

TEST(LoadModelTest, ErrorsNameTheProblem) {
  const std::string empty = testing::MakeTempDir();
  auto model = LoadModel(empty);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(model.status().message().find("config.json"), absl::string_view::npos);

  // A config that disagrees with the weights: one layer more than the file has.
  const auto dir = testing::TinyModelDir("llama-tiny");
  ASSERT_TRUE(dir.ok());
  const std::string copy = testing::MakeTempDir();
  fs::copy(*dir, copy, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  Json config;
  std::ifstream((fs::path(copy) / "config.json").string()) >> config;
  config["num_hidden_layers"] = 3;
  std::ofstream((fs::path(copy) / "config.json").string()) << config.dump();
  model = LoadModel(copy);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(model.status().message().find("model.layers.2."), absl::string_view::npos)
      << model.status();
}

}  // namespace
}  // namespace anchorserve
