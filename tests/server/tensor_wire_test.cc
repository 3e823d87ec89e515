#include "proto/anchorserve/v1/tensor_wire.h"

#include <malloc.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "anchorserve/v1/anchorserve.pb.h"
#include "gtest/gtest.h"
#include "tests/test_util/sanitizers.h"

namespace anchorserve {
namespace {

constexpr int kQField = 2;
constexpr int kKField = 3;
constexpr int kVField = 4;

std::string RandomBytes(size_t size, std::mt19937_64& rng) {
  std::string bytes(size, '\0');
  for (char& byte : bytes) byte = static_cast<char>(rng() & 0xff);
  return bytes;
}

// A request with everything but data; q [5, 3, 7], k and v [5, 1, 7], bf16.
v1::AttendRequest Head() {
  v1::AttendRequest head;
  head.set_request_id("wire-test");
  for (auto [tensor, heads] : {std::pair{head.mutable_q(), 3}, std::pair{head.mutable_k(), 1},
                               std::pair{head.mutable_v(), 1}}) {
    tensor->set_dtype(v1::DATA_TYPE_BF16);
    tensor->set_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
    tensor->add_shape(5);
    tensor->add_shape(heads);
    tensor->add_shape(7);
  }
  head.mutable_config()->set_theta(12.5);
  head.mutable_config()->set_block_size(16);
  head.mutable_options()->set_metrics_only(true);
  return head;
}

// The bytes of `buffer` in one string.
std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string flat;
  for (const grpc::Slice& slice : slices) {
    flat.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return flat;
}

// `bytes` cut into slices of `piece` bytes (the last may be shorter).
grpc::ByteBuffer Chop(const std::string& bytes, size_t piece) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += piece) {
    slices.emplace_back(bytes.data() + at, std::min(piece, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::string Join(const SegmentedBytes& data) {
  std::string joined(data.size, '\0');
  data.CopyTo(joined.data());
  return joined;
}

class TensorWireTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    q_ = RandomBytes(5 * 3 * 7 * 2, rng_);
    k_ = RandomBytes(5 * 1 * 7 * 2, rng_);
    v_ = RandomBytes(5 * 1 * 7 * 2, rng_);
    full_ = Head();
    full_.mutable_q()->set_data(q_);
    full_.mutable_k()->set_data(k_);
    full_.mutable_v()->set_data(v_);
  }

  void TearDown() override {
    if (HasFailure())
      std::printf("tensor bytes seed: %llu\n", static_cast<unsigned long long>(seed_));
  }

  // The head through protobuf, then the data appended as extra occurrences.
  grpc::ByteBuffer Appended() {
    std::vector<grpc::Slice> slices;
    slices.emplace_back(Head().SerializeAsString());
    AppendTensorData(kQField, grpc::Slice(q_), &slices);
    AppendTensorData(kKField, grpc::Slice(k_), &slices);
    AppendTensorData(kVField, grpc::Slice(v_), &slices);
    return grpc::ByteBuffer(slices.data(), slices.size());
  }

  void ExpectSplitMatches(const grpc::ByteBuffer& buffer) {
    absl::StatusOr<SplitMessage> split = SplitTensorData(buffer, {kQField, kKField, kVField});
    ASSERT_TRUE(split.ok()) << split.status();
    v1::AttendRequest rest;
    ASSERT_TRUE(rest.ParseFromString(split->rest));
    EXPECT_EQ(rest.SerializeAsString(), Head().SerializeAsString());
    ASSERT_EQ(split->data.size(), 3u);
    EXPECT_EQ(Join(split->data.at(kQField)), q_);
    EXPECT_EQ(Join(split->data.at(kKField)), k_);
    EXPECT_EQ(Join(split->data.at(kVField)), v_);
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::string q_, k_, v_;
  v1::AttendRequest full_;
};

TEST_F(TensorWireTest, AppendedDataParsesAsTheFullMessage) {
  v1::AttendRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(Appended())));
  EXPECT_EQ(parsed.SerializeAsString(), full_.SerializeAsString());
}

TEST_F(TensorWireTest, SplitsAppendedMessages) { ExpectSplitMatches(Appended()); }

TEST_F(TensorWireTest, SplitsProtobufSerializedMessages) {
  ExpectSplitMatches(Chop(full_.SerializeAsString(), 1 << 20));
}

TEST_F(TensorWireTest, SplitsAcrossAnySliceBoundaries) {
  const std::string flat = Flatten(Appended());
  for (size_t piece : {1, 2, 3, 7, 64}) {
    SCOPED_TRACE(piece);
    ExpectSplitMatches(Chop(flat, piece));
  }
}

TEST_F(TensorWireTest, LastDataOccurrenceWinsAsInProtobuf) {
  std::vector<grpc::Slice> slices;
  slices.emplace_back(full_.SerializeAsString());
  const std::string replacement = RandomBytes(q_.size(), rng_);
  AppendTensorData(kQField, grpc::Slice(replacement), &slices);
  const grpc::ByteBuffer buffer(slices.data(), slices.size());
  v1::AttendRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(buffer)));
  absl::StatusOr<SplitMessage> split = SplitTensorData(buffer, {kQField, kKField, kVField});
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_EQ(Join(split->data.at(kQField)), parsed.q().data());
  EXPECT_EQ(Join(split->data.at(kQField)), replacement);
}

TEST_F(TensorWireTest, MissingDataIsAbsent) {
  const std::string head = Head().SerializeAsString();
  absl::StatusOr<SplitMessage> split =
      SplitTensorData(Chop(head, head.size()), {kQField, kKField, kVField});
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_TRUE(split->data.empty());
  v1::AttendRequest rest;
  ASSERT_TRUE(rest.ParseFromString(split->rest));
  EXPECT_TRUE(rest.has_q());
}

TEST_F(TensorWireTest, EmptyDataAppendsNothing) {
  std::vector<grpc::Slice> slices;
  AppendTensorData(kQField, grpc::Slice(), &slices);
  EXPECT_TRUE(slices.empty());
}

TEST_F(TensorWireTest, RejectsMalformedMessages) {
  const std::string flat = Flatten(Appended());
  // Cut anywhere inside the tensors' bytes.
  for (size_t cut : {flat.size() - 1, flat.size() - v_.size() / 2}) {
    absl::StatusOr<SplitMessage> split =
        SplitTensorData(Chop(flat.substr(0, cut), 5), {kQField, kKField, kVField});
    EXPECT_EQ(split.status().code(), absl::StatusCode::kInvalidArgument) << cut;
  }
  // A group (wire type 3), which proto3 never writes.
  EXPECT_EQ(SplitTensorData(Chop(std::string("\x0b", 1), 1), {kQField}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Field number 0.
  EXPECT_EQ(SplitTensorData(Chop(std::string("\x02\x00", 2), 2), {kQField}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A varint that never ends.
  EXPECT_EQ(SplitTensorData(Chop(std::string(11, '\xff'), 3), {kQField}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Tensor data longer than its tensor message: q of 3 bytes holding data of 5.
  const std::string bad("\x12\x03\x22\x05xyzab", 9);
  EXPECT_EQ(SplitTensorData(Chop(bad, 4), {kQField}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Frees 16 MiB of 64 KiB blocks (what gRPC's reads leave behind) and returns how much free
// memory the top of the heap still holds.
size_t TopOfHeapAfterReceiveBuffersAreFreed() {
  std::vector<char*> blocks;
  blocks.reserve(256);  // before the blocks: nothing of its own between them and the top
  for (int i = 0; i < 256; ++i) {
    blocks.push_back(static_cast<char*>(std::malloc(64 << 10)));
    blocks.back()[0] = 1;
  }
  for (auto block = blocks.rbegin(); block != blocks.rend(); ++block) std::free(*block);
  return mallinfo2().keepcost;
}

// In a fresh process (threadsafe death tests re-run the binary), so that the heap is this
// thread's alone and the blocks land at its top; glibc's default threshold set explicitly.
class ReceiveBufferHeapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kUnderSanitizer) GTEST_SKIP() << "the sanitizers' allocators ignore mallopt";
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
};

TEST_F(ReceiveBufferHeapTest, FreedBuffersStayMappedAfterKeepReceiveBuffersResident) {
  EXPECT_EXIT(
      {
        unsetenv("MALLOC_TRIM_THRESHOLD_");
        unsetenv("GLIBC_TUNABLES");
        mallopt(M_TRIM_THRESHOLD, 128 << 10);
        const size_t by_default = TopOfHeapAfterReceiveBuffersAreFreed();
        KeepReceiveBuffersResident();
        const size_t kept = TopOfHeapAfterReceiveBuffersAreFreed();
        std::fprintf(stderr, "top of heap %zu by default, %zu kept\n", by_default, kept);
        std::exit(by_default < (1 << 20) && kept >= (16 << 20) ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST_F(ReceiveBufferHeapTest, AThresholdTheUserSetIsLeftAlone) {
  EXPECT_EXIT(
      {
        setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072", 1);
        mallopt(M_TRIM_THRESHOLD, 128 << 10);
        KeepReceiveBuffersResident();
        const size_t top = TopOfHeapAfterReceiveBuffersAreFreed();
        std::fprintf(stderr, "top of heap %zu\n", top);
        std::exit(top < (1 << 20) ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace anchorserve
