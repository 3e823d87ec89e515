// The safetensors reader against hand-built files: good, truncated, out of bounds, overlapping,
// inconsistent and malformed headers, and sharded checkpoints.
#include "model/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/tiny_models.h"

namespace anchorserve {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A file from a header and a data area, with the length prefix computed (or forced).
std::string FileBytes(const std::string& header, const std::string& data,
                      int64_t forced_length = -1) {
  const uint64_t length = forced_length >= 0 ? static_cast<uint64_t>(forced_length)
                                             : static_cast<uint64_t>(header.size());
  return LittleEndian64(length) + header + data;
}

std::string Floats(const std::vector<float>& values) {
  std::string bytes(values.size() * 4, '\0');
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir(); }

  std::string Write(const std::string& name, const std::string& bytes) {
    const std::string path = (fs::path(dir_) / name).string();
    std::ofstream out(path, std::ios::binary);
    out << bytes;
    return path;
  }

  // Opens a file made of `header` (JSON) and `data`; expects INVALID_ARGUMENT whose message
  // names the file and contains every one of `parts`.
  void ExpectInvalid(const std::string& header, const std::string& data,
                     const std::vector<std::string>& parts, int64_t forced_length = -1) {
    const std::string path = Write("bad.safetensors", FileBytes(header, data, forced_length));
    const auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << header;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_NE(file.status().message().find(path), absl::string_view::npos) << file.status();
    for (const std::string& part : parts) {
      EXPECT_NE(file.status().message().find(part), absl::string_view::npos)
          << "'" << part << "' not in: " << file.status();
    }
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, ReadsTensorsAndMetadata) {
  Json header;
  header["__metadata__"] = {{"format", "pt"}};
  header["a"] = {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}};
  header["b"] = {{"dtype", "BF16"}, {"shape", {3}}, {"data_offsets", {16, 22}}};
  header["c"] = {{"dtype", "F16"}, {"shape", Json::array()}, {"data_offsets", {22, 24}}};
  header["empty"] = {{"dtype", "F32"}, {"shape", {0, 4}}, {"data_offsets", {24, 24}}};
  std::string data = Floats({1, 2, 3, 4});
  const uint16_t bf16[3] = {0x3f80, 0x4000, 0xc040};  // 1, 2, -3
  data.append(reinterpret_cast<const char*>(bf16), 6);
  const uint16_t fp16 = 0x3c00;  // 1
  data.append(reinterpret_cast<const char*>(&fp16), 2);
  const std::string path = Write("good.safetensors", FileBytes(header.dump() + "   ", data));

  const auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), 4u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  const StoredTensor* a = (*file)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kFp32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(a->num_bytes, 16);
  EXPECT_EQ(a->NumElements(), 4);
  EXPECT_EQ(*a->file, path);
  float values[4];
  std::memcpy(values, a->data, 16);
  EXPECT_EQ(values[3], 4.0f);
  const StoredTensor* b = (*file)->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBf16);
  EXPECT_EQ(b->ShapeString(), "[3]");
  uint16_t bits;
  std::memcpy(&bits, b->data + 4, 2);
  EXPECT_EQ(Bf16ToFloat(bits), -3.0f);
  const StoredTensor* c = (*file)->Find("c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->dtype, DType::kFp16);
  EXPECT_TRUE(c->shape.empty());
  EXPECT_EQ(c->NumElements(), 1);
  EXPECT_EQ((*file)->Find("empty")->num_bytes, 0);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const auto file = SafetensorsFile::Open((fs::path(dir_) / "nope.safetensors").string());
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(file.status().message().find("nope.safetensors"), absl::string_view::npos);
}

TEST_F(SafetensorsTest, TooShortForTheLengthPrefix) {
  const std::string path = Write("short.safetensors", "abc");
  const auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find("too short"), absl::string_view::npos);
}

TEST_F(SafetensorsTest, HeaderLengthPastTheEnd) {
  ExpectInvalid("{}", "", {"runs past the end"}, /*forced_length=*/100);
}

TEST_F(SafetensorsTest, HeaderLengthOverTheCap) {
  ExpectInvalid("{}", "", {"exceeds the limit"}, kMaxSafetensorsHeaderBytes + 1);
}

TEST_F(SafetensorsTest, TruncatedData) {
  Json header;
  header["w"] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}};
  ExpectInvalid(header.dump(), Floats({1, 2}), {"'w'", "outside the data area"});
}

TEST_F(SafetensorsTest, OffsetsOutsideTheDataArea) {
  Json header;
  header["w"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {1000, 1004}}};
  ExpectInvalid(header.dump(), Floats({1}), {"'w'", "outside the data area"});
}

TEST_F(SafetensorsTest, EndBeforeBegin) {
  Json header;
  header["w"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 0}}};
  ExpectInvalid(header.dump(), Floats({1}), {"'w'", "end before begin"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  Json header;
  header["a"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
  header["b"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}};
  ExpectInvalid(header.dump(), Floats({1, 2, 3}), {"'a'", "'b'", "overlap"});
}

TEST_F(SafetensorsTest, HoleBetweenTensors) {
  Json header;
  header["a"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  header["b"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 12}}};
  ExpectInvalid(header.dump(), Floats({1, 2, 3}), {"'b'", "belong to no tensor"});
}

TEST_F(SafetensorsTest, TrailingBytes) {
  Json header;
  header["a"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  ExpectInvalid(header.dump(), Floats({1, 2}), {"4 bytes after the last tensor"});
}

TEST_F(SafetensorsTest, ByteCountDisagreesWithShapeAndDtype) {
  Json header;
  header["w"] = {{"dtype", "BF16"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}};
  ExpectInvalid(header.dump(), Floats({1, 2, 3, 4}), {"'w'", "[2, 2]", "needs 8"});
}

TEST_F(SafetensorsTest, UnsupportedDtype) {
  Json header;
  header["ids"] = {{"dtype", "I64"}, {"shape", {1}}, {"data_offsets", {0, 8}}};
  ExpectInvalid(header.dump(), Floats({1, 2}), {"'ids'", "I64"});
}

TEST_F(SafetensorsTest, ShapeOverflow) {
  Json header;
  header["w"] = {
      {"dtype", "F32"}, {"shape", {int64_t{1} << 40, int64_t{1} << 40}}, {"data_offsets", {0, 4}}};
  ExpectInvalid(header.dump(), Floats({1}), {"'w'", "overflows"});
}

TEST_F(SafetensorsTest, MalformedHeaders) {
  ExpectInvalid("{\"w\": {", "", {"not valid JSON"});
  ExpectInvalid("[1, 2]", "", {"JSON object"});
  ExpectInvalid(R"({"w": 5})", "", {"'w'", "object"});
  ExpectInvalid(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", Floats({1}), {"'w'", "dtype"});
  ExpectInvalid(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", Floats({1}),
                {"'w'", "shape"});
  ExpectInvalid(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", Floats({1}),
                {"'w'", "shape"});
  ExpectInvalid(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", Floats({1}),
                {"'w'", "data_offsets"});
  ExpectInvalid(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}})", Floats({1}),
                {"'w'", "data_offsets"});
  ExpectInvalid(R"({"__metadata__": {"format": 1}})", "", {"__metadata__"});
}

// Two shards and an index as transformers writes them.
class ShardedStoreTest : public SafetensorsTest {
 protected:
  void WriteShards() {
    Json a;
    a["x"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
    Write("model-00001-of-00002.safetensors", FileBytes(a.dump(), Floats({1, 2})));
    Json b;
    b["y"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
    b["unlisted"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}};
    Write("model-00002-of-00002.safetensors", FileBytes(b.dump(), Floats({3, 4})));
  }
  void WriteIndex(const Json& weight_map) {
    Json index;
    index["metadata"] = {{"total_size", 12}};
    index["weight_map"] = weight_map;
    Write("model.safetensors.index.json", index.dump());
  }
};

TEST_F(ShardedStoreTest, OpensListedTensors) {
  WriteShards();
  WriteIndex(
      {{"x", "model-00001-of-00002.safetensors"}, {"y", "model-00002-of-00002.safetensors"}});
  const auto store = TensorStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->files().size(), 2u);
  ASSERT_EQ((*store)->tensors().size(), 2u);  // "unlisted" is not in the weight_map
  const StoredTensor* y = (*store)->Find("y");
  ASSERT_NE(y, nullptr);
  float value;
  std::memcpy(&value, y->data, 4);
  EXPECT_EQ(value, 3.0f);
  EXPECT_EQ((*store)->Find("unlisted"), nullptr);
}

TEST_F(ShardedStoreTest, TensorMissingFromItsShard) {
  WriteShards();
  WriteIndex(
      {{"x", "model-00001-of-00002.safetensors"}, {"z", "model-00002-of-00002.safetensors"}});
  const auto store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(store.status().message().find("'z'"), absl::string_view::npos) << store.status();
  EXPECT_NE(store.status().message().find("model-00002-of-00002"), absl::string_view::npos);
}

TEST_F(ShardedStoreTest, ShardOutsideTheFolder) {
  WriteShards();
  WriteIndex({{"x", "../model-00001-of-00002.safetensors"}});
  const auto store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("'x'"), absl::string_view::npos) << store.status();
}

TEST_F(ShardedStoreTest, MissingShardFile) {
  WriteIndex({{"x", "model-00009-of-00009.safetensors"}});
  const auto store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kNotFound) << store.status();
  EXPECT_NE(store.status().message().find("model-00009-of-00009"), absl::string_view::npos);
}

TEST_F(ShardedStoreTest, BadIndex) {
  Write("model.safetensors.index.json", "{\"weight_map\": ");
  auto store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("model.safetensors.index.json"), absl::string_view::npos);
  Write("model.safetensors.index.json", "{\"metadata\": {}}");
  store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("weight_map"), absl::string_view::npos);
}

TEST_F(ShardedStoreTest, EmptyFolderIsNotFound) {
  const auto store = TensorStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace anchorserve
