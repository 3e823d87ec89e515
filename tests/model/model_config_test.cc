// config.json parsing: both dialects, defaults, and every rejection naming the file and field.
#include "model/model_config.h"

#include <functional>
#include <ostream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace anchorserve {
namespace {

using Json = nlohmann::json;

Json LlamaJson() {
  return Json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": null, "hidden_act": "silu", "tie_word_embeddings": false,
    "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16"})");
}

Json QwenJson() {
  Json j = LlamaJson();
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["model_type"] = "qwen2";
  j.erase("attention_bias");
  j.erase("mlp_bias");
  j["use_sliding_window"] = false;
  j["sliding_window"] = 4096;
  j["max_window_layers"] = 2;
  j["layer_types"] = {"full_attention", "full_attention"};
  return j;
}

absl::StatusOr<ModelConfig> Parse(const Json& j) {
  return ParseModelConfig(j.dump(), "/models/x/config.json");
}

TEST(ModelConfigTest, LlamaDefaultsAndDerivedShapes) {
  Json j = LlamaJson();
  j.erase("num_key_value_heads");
  j.erase("rms_norm_eps");
  j.erase("rope_theta");
  j.erase("tie_word_embeddings");
  j.erase("torch_dtype");
  j.erase("hidden_act");
  j.erase("max_position_embeddings");
  const absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, Architecture::kLlama);
  EXPECT_EQ(config->num_layers, 2);
  EXPECT_EQ(config->hidden_size, 64);
  EXPECT_EQ(config->intermediate_size, 176);
  EXPECT_EQ(config->num_heads, 4);
  EXPECT_EQ(config->num_kv_heads, 4);  // defaults to the head count
  EXPECT_EQ(config->head_dim, 16);     // hidden / heads
  EXPECT_EQ(config->vocab_size, 512);
  EXPECT_EQ(config->max_position_embeddings, 2048);
  EXPECT_EQ(config->rope.type, RopeType::kDefault);
  EXPECT_EQ(config->rope.theta, 10000.0);
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_FALSE(config->qkv_bias);
  EXPECT_FALSE(config->declared_dtype.has_value());
  EXPECT_EQ(config->QDim(), 64);
  EXPECT_EQ(config->KvDim(), 64);
}

TEST(ModelConfigTest, Llama31WithScalingTiedAndExplicitHeadDim) {
  Json j = LlamaJson();
  j["head_dim"] = 32;
  j["tie_word_embeddings"] = true;
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = Json::parse(R"({"rope_type": "llama3", "factor": 8.0,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})");
  const absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->head_dim, 32);
  EXPECT_EQ(config->QDim(), 128);
  EXPECT_EQ(config->KvDim(), 64);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_EQ(config->rope.type, RopeType::kLlama3);
  EXPECT_EQ(config->rope.theta, 500000.0);
  EXPECT_EQ(config->rope.factor, 8.0);
  EXPECT_EQ(config->rope.low_freq_factor, 1.0);
  EXPECT_EQ(config->rope.high_freq_factor, 4.0);
  EXPECT_EQ(config->rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(config->declared_dtype, DType::kBf16);
}

TEST(ModelConfigTest, OldScalingKeyTypeAndDefaultType) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json::parse(R"({"type": "default"})");
  const absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->rope.type, RopeType::kDefault);
}

TEST(ModelConfigTest, Transformers5Dialect) {
  Json j = LlamaJson();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j.erase("torch_dtype");
  j["dtype"] = "float32";
  j["rope_parameters"] = Json::parse(R"({"rope_type": "llama3", "rope_theta": 500000.0,
      "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})");
  const absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->rope.type, RopeType::kLlama3);
  EXPECT_EQ(config->rope.theta, 500000.0);
  EXPECT_EQ(config->rope.factor, 32.0);
  EXPECT_EQ(config->declared_dtype, DType::kFp32);

  j["rope_parameters"] = Json::parse(R"({"rope_type": "default", "rope_theta": 1000000.0})");
  const absl::StatusOr<ModelConfig> plain = Parse(j);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->rope.type, RopeType::kDefault);
  EXPECT_EQ(plain->rope.theta, 1000000.0);
}

TEST(ModelConfigTest, Qwen2HasQkvBiasAndIgnoresDisabledSlidingWindow) {
  const absl::StatusOr<ModelConfig> config = Parse(QwenJson());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, Architecture::kQwen2);
  EXPECT_TRUE(config->qkv_bias);
  EXPECT_EQ(ArchitectureName(config->architecture), "Qwen2ForCausalLM");
}

struct Rejection {
  std::string name;
  std::function<void(Json&)> mutate;
  absl::StatusCode code;
  std::string field;  // must appear in the message
  bool qwen = false;
};

void PrintTo(const Rejection& r, std::ostream* os) { *os << r.name; }

class ModelConfigRejectionTest : public ::testing::TestWithParam<Rejection> {};

TEST_P(ModelConfigRejectionTest, NamesFileAndField) {
  const Rejection& r = GetParam();
  Json j = r.qwen ? QwenJson() : LlamaJson();
  r.mutate(j);
  const absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), r.code) << config.status();
  EXPECT_NE(config.status().message().find("/models/x/config.json"), absl::string_view::npos)
      << config.status();
  EXPECT_NE(config.status().message().find(r.field), absl::string_view::npos) << config.status();
}

const absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
const absl::StatusCode kUnsupported = absl::StatusCode::kFailedPrecondition;

INSTANTIATE_TEST_SUITE_P(
    All, ModelConfigRejectionTest,
    ::testing::Values(
        Rejection{"ArchitecturesMissing", [](Json& j) { j.erase("architectures"); }, kInvalid,
                  "architectures"},
        Rejection{"ArchitecturesNotList", [](Json& j) { j["architectures"] = "Llama"; }, kInvalid,
                  "architectures"},
        Rejection{"TwoArchitectures",
                  [](Json& j) {
                    j["architectures"] = {"LlamaForCausalLM", "X"};
                  },
                  kInvalid, "architectures"},
        Rejection{"UnknownArchitecture",
                  [](Json& j) { j["architectures"] = {"MistralForCausalLM"}; }, kUnsupported,
                  "architectures"},
        Rejection{"LayersMissing", [](Json& j) { j.erase("num_hidden_layers"); }, kInvalid,
                  "num_hidden_layers"},
        Rejection{"LayersString", [](Json& j) { j["num_hidden_layers"] = "2"; }, kInvalid,
                  "num_hidden_layers"},
        Rejection{"LayersZero", [](Json& j) { j["num_hidden_layers"] = 0; }, kInvalid,
                  "num_hidden_layers"},
        Rejection{"HiddenFloat", [](Json& j) { j["hidden_size"] = 64.5; }, kInvalid, "hidden_size"},
        Rejection{"IntermediateNegative", [](Json& j) { j["intermediate_size"] = -1; }, kInvalid,
                  "intermediate_size"},
        Rejection{"VocabZero", [](Json& j) { j["vocab_size"] = 0; }, kInvalid, "vocab_size"},
        Rejection{"KvHeadsNotDividing", [](Json& j) { j["num_key_value_heads"] = 3; }, kInvalid,
                  "num_key_value_heads"},
        Rejection{"HiddenNotMultipleOfHeads", [](Json& j) { j["num_attention_heads"] = 6; },
                  kInvalid, "hidden_size"},
        Rejection{"HeadDimOdd", [](Json& j) { j["head_dim"] = 15; }, kInvalid, "head_dim"},
        Rejection{"HeadDimTooLarge", [](Json& j) { j["head_dim"] = 512; }, kUnsupported,
                  "head_dim"},
        Rejection{"ActivationGelu", [](Json& j) { j["hidden_act"] = "gelu"; }, kUnsupported,
                  "hidden_act"},
        Rejection{"LlamaAttentionBias", [](Json& j) { j["attention_bias"] = true; }, kUnsupported,
                  "attention_bias"},
        Rejection{"LlamaMlpBias", [](Json& j) { j["mlp_bias"] = true; }, kUnsupported, "mlp_bias"},
        Rejection{"SlidingWindow", [](Json& j) { j["use_sliding_window"] = true; }, kUnsupported,
                  "use_sliding_window", true},
        Rejection{"SlidingLayerTypes",
                  [](Json& j) {
                    j["layer_types"] = {"full_attention", "sliding_attention"};
                  },
                  kUnsupported, "layer_types", true},
        Rejection{"MoeExperts", [](Json& j) { j["num_experts"] = 8; }, kUnsupported, "num_experts"},
        Rejection{"MoeLocalExperts", [](Json& j) { j["num_local_experts"] = 8; }, kUnsupported,
                  "num_local_experts"},
        Rejection{"MoeExpertsPerToken", [](Json& j) { j["num_experts_per_tok"] = 2; }, kUnsupported,
                  "num_experts_per_tok"},
        Rejection{"RopeYarn",
                  [](Json& j) {
                    j["rope_scaling"] = Json::parse(R"({"rope_type": "yarn", "factor": 4.0})");
                  },
                  kUnsupported, "rope_scaling.rope_type"},
        Rejection{"RopeLinearOldKey",
                  [](Json& j) {
                    j["rope_scaling"] = Json::parse(R"({"type": "linear", "factor": 2.0})");
                  },
                  kUnsupported, "rope_scaling.type"},
        Rejection{"RopeParametersDynamic",
                  [](Json& j) {
                    j["rope_parameters"] = Json::parse(
                        R"({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})");
                  },
                  kUnsupported, "rope_parameters.rope_type"},
        Rejection{"Llama3MissingFactor",
                  [](Json& j) {
                    j["rope_scaling"] = Json::parse(
                        R"({"rope_type": "llama3", "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})");
                  },
                  kInvalid, "rope_scaling.factor"},
        Rejection{"Llama3FrequencyFactorsSwapped",
                  [](Json& j) {
                    j["rope_scaling"] = Json::parse(
                        R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})");
                  },
                  kInvalid, "rope_scaling.high_freq_factor"},
        Rejection{"RopeScalingNotObject", [](Json& j) { j["rope_scaling"] = 2.0; }, kInvalid,
                  "rope_scaling"},
        Rejection{"RopeThetaNegative", [](Json& j) { j["rope_theta"] = -1.0; }, kInvalid,
                  "rope_theta"},
        Rejection{"RopeThetaString", [](Json& j) { j["rope_theta"] = "1e4"; }, kInvalid,
                  "rope_theta"},
        Rejection{"PartialRotary",
                  [](Json& j) {
                    j["rope_scaling"] =
                        Json::parse(R"({"rope_type": "default", "partial_rotary_factor": 0.5})");
                  },
                  kUnsupported, "partial_rotary_factor"},
        Rejection{"EpsZero", [](Json& j) { j["rms_norm_eps"] = 0.0; }, kInvalid, "rms_norm_eps"},
        Rejection{"DtypeInt8", [](Json& j) { j["torch_dtype"] = "int8"; }, kUnsupported,
                  "torch_dtype"},
        Rejection{"DtypeNewKey", [](Json& j) { j["dtype"] = "float64"; }, kUnsupported, "dtype"},
        Rejection{"TieNotBool", [](Json& j) { j["tie_word_embeddings"] = "yes"; }, kInvalid,
                  "tie_word_embeddings"},
        Rejection{"MaxPositionsZero", [](Json& j) { j["max_position_embeddings"] = 0; }, kInvalid,
                  "max_position_embeddings"}),
    [](const ::testing::TestParamInfo<Rejection>& info) { return info.param.name; });

TEST(ModelConfigTest, RejectsBadJsonNamingTheFile) {
  for (const char* text : {"{", "[1, 2]", "", "{\"architectures\": [\"LlamaForCausalLM\"],}"}) {
    const absl::StatusOr<ModelConfig> config = ParseModelConfig(text, "/m/config.json");
    ASSERT_FALSE(config.ok()) << text;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(config.status().message().find("/m/config.json"), absl::string_view::npos);
  }
}

}  // namespace
}  // namespace anchorserve
