// The streamed safetensors writer, read back with the independent reader of prefill_test_util.
#include "client/safetensors.h"

#include <unistd.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "tests/client/prefill_test_util.h"

namespace anchorserve {
namespace {

using ::anchorserve::testing::ParsedSafetensors;
using ::anchorserve::testing::ParseSafetensorsFile;
using ::anchorserve::testing::ReadFileBytes;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

std::string TempPath(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/anchor_safetensors_", getpid(), "_", name);
}

std::string Bytes(size_t size, int seed) {
  std::string bytes(size, '\0');
  for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<char>((i * 31 + seed * 7) & 0xff);
  return bytes;
}

TEST(SafetensorsTest, HeaderIsPaddedJsonWithMetadata) {
  const std::vector<SafetensorsEntry> entries = {{"a", DType::kFp32, {2, 3}},
                                                 {"b", DType::kBf16, {5}}};
  const std::map<std::string, std::string> metadata = {{"quote\"and\\slash", "tab\there\x01"}};
  absl::StatusOr<std::string> header = MakeSafetensorsHeader(entries, metadata);
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->size() % 8, 0u);
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t{static_cast<uint8_t>((*header)[i])} << (8 * i);
  EXPECT_EQ(length, header->size() - 8);
  const std::string json = header->substr(8);
  EXPECT_EQ(json.find_last_not_of(' '), json.find_last_of('}'));
  EXPECT_THAT(json, HasSubstr(R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})"));
  EXPECT_THAT(json, HasSubstr(R"("b":{"dtype":"BF16","shape":[5],"data_offsets":[24,34]})"));

  absl::StatusOr<ParsedSafetensors> parsed = ParseSafetensorsFile(*header + Bytes(34, 0));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->metadata, metadata);
  EXPECT_THAT(parsed->names_by_offset, ElementsAre("a", "b"));
}

TEST(SafetensorsTest, RejectsBadEntries) {
  EXPECT_THAT(MakeSafetensorsHeader({{"x", DType::kFp16, {1}}, {"x", DType::kFp16, {1}}})
                  .status()
                  .message(),
              HasSubstr("'x' appears twice"));
  EXPECT_THAT(MakeSafetensorsHeader({{"__metadata__", DType::kFp16, {1}}}).status().message(),
              HasSubstr("not allowed"));
  EXPECT_THAT(MakeSafetensorsHeader({{"n", DType::kFp16, {2, -1}}}).status().message(),
              HasSubstr("'n': shape[1] is negative"));
}

// Found by fuzz/safetensors_fuzzer: names (and metadata) that are not UTF-8 made a header that no
// reader accepts; they are refused. Any valid UTF-8, control characters and quotes included,
// round-trips through the model loader's parser.
TEST(SafetensorsTest, NamesMustBeUtf8AndAnyUtf8RoundTrips) {
  const std::string fuzz_found("\0\0\0\0\0\x80}\x20", 8);
  for (const std::string& bad : {fuzz_found, std::string("\xc0\xaf"), std::string("\xed\xa0\x80"),
                                 std::string("\xf4\x90\x80\x80"), std::string("ab\xe4\xb8")}) {
    EXPECT_THAT(MakeSafetensorsHeader({{bad, DType::kFp16, {1}}}).status().message(),
                HasSubstr("is not valid UTF-8"));
    EXPECT_FALSE(MakeSafetensorsHeader({{"x", DType::kFp16, {1}}}, {{"k", bad}}).ok());
  }
  const std::string name = "k\"\\\n\x01 \xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80";
  absl::StatusOr<std::string> header =
      MakeSafetensorsHeader({{name, DType::kFp16, {1, 2}}}, {{"model", "\xc3\xa9"}});
  ASSERT_TRUE(header.ok()) << header.status();
  const std::string file = *header + std::string(4, '\0');
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> parsed =
      SafetensorsFile::FromBytes("t.safetensors", {file.data(), file.size()});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_NE((*parsed)->Find(name), nullptr);
  EXPECT_EQ((*parsed)->Find(name)->num_bytes, 4);
  EXPECT_EQ((*parsed)->metadata().at("model"), "\xc3\xa9");
}

TEST(SafetensorsTest, StreamedWriteRoundTrips) {
  const std::string path = TempPath("round_trip.safetensors");
  const std::vector<SafetensorsEntry> entries = {
      {"layers.0.k", DType::kBf16, {2, 3, 4}},
      {"layers.0.v", DType::kBf16, {2, 3, 4}},
      {"empty", DType::kFp32, {0, 4}},
      {"layers.1.k", DType::kFp16, {3, 2, 4}},
      {"last", DType::kFp32, {7}},
  };
  std::vector<std::string> data;
  for (size_t i = 0; i < entries.size(); ++i) {
    data.push_back(
        Bytes(static_cast<size_t>(*SafetensorsEntryBytes(entries[i])), static_cast<int>(i)));
  }
  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer =
      SafetensorsWriter::Create(path, entries, {{"anchorserve.num_tokens", "3"}});
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (size_t i = 0; i < entries.size(); ++i) {
    // Pieces of 5 bytes: uneven against every entry size.
    for (size_t offset = 0; offset < data[i].size(); offset += 5) {
      ASSERT_TRUE(
          (*writer)->Write(i, static_cast<int64_t>(offset), data[i].substr(offset, 5)).ok());
    }
  }
  EXPECT_FALSE(Exists(path)) << "the file appears only when finished";
  ASSERT_TRUE((*writer)->Finish().ok());
  EXPECT_TRUE(Exists(path));
  EXPECT_FALSE(Exists(path + ".partial"));

  const std::string file = ReadFileBytes(path);
  EXPECT_EQ(static_cast<int64_t>(file.size()), (*writer)->file_bytes());
  absl::StatusOr<ParsedSafetensors> parsed = ParseSafetensorsFile(file);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->header_length % 8, 0u);
  EXPECT_EQ(parsed->metadata.at("anchorserve.num_tokens"), "3");
  EXPECT_THAT(parsed->names_by_offset,
              ElementsAre("layers.0.k", "layers.0.v", "empty", "layers.1.k", "last"));
  const std::map<std::string, std::string> dtype_names = {{"layers.0.k", "BF16"},
                                                          {"layers.0.v", "BF16"},
                                                          {"empty", "F32"},
                                                          {"layers.1.k", "F16"},
                                                          {"last", "F32"}};
  for (size_t i = 0; i < entries.size(); ++i) {
    const testing::ParsedTensor& tensor = parsed->tensors.at(entries[i].name);
    EXPECT_EQ(tensor.dtype, dtype_names.at(entries[i].name));
    EXPECT_EQ(tensor.shape, entries[i].shape);
    EXPECT_EQ(tensor.data, data[i]) << entries[i].name;
  }
  std::remove(path.c_str());
}

TEST(SafetensorsTest, WritesOutOfOrderFailAndLeaveNoFile) {
  const std::string path = TempPath("bad.safetensors");
  {
    absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer =
        SafetensorsWriter::Create(path, {{"a", DType::kFp32, {4}}, {"b", DType::kFp32, {2}}});
    ASSERT_TRUE(writer.ok()) << writer.status();
    SafetensorsWriter& w = **writer;
    EXPECT_THAT(w.Write(1, 0, "12345678").message(),
                HasSubstr("bytes of 'b' arrived while 'a' is incomplete"));
    ASSERT_TRUE(w.Write(0, 0, "12345678").ok());
    EXPECT_THAT(w.Write(0, 4, "abcd").message(), HasSubstr("bytes of 'a' at offset 4, expected 8"));
    EXPECT_THAT(w.Write(0, 8, std::string(9, 'x')).message(),
                HasSubstr("bytes of 'a' run to 17, past its size of 16"));
    EXPECT_THAT(w.Write(2, 0, "x").message(), HasSubstr("there is no entry 2"));
    const absl::Status early = w.Finish();
    EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(early.message(), HasSubstr("is incomplete: 'a' has 8 of 16 bytes"));
    EXPECT_TRUE(Exists(path + ".partial"));
  }
  EXPECT_FALSE(Exists(path + ".partial")) << "an unfinished writer removes its file";
  EXPECT_FALSE(Exists(path));

  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> unwritable =
      SafetensorsWriter::Create("/nonexistent-dir/x.safetensors", {{"a", DType::kFp32, {1}}});
  EXPECT_FALSE(unwritable.ok());
  EXPECT_THAT(unwritable.status().message(), HasSubstr("cannot create /nonexistent-dir/"));
}

}  // namespace
}  // namespace anchorserve
