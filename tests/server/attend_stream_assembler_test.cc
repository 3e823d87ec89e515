// AttendStreamAssembler: the AttendStream input protocol without gRPC (the reactor's and the fuzz
// target's view), including the inputs the fuzz target was written for.
#include "server/attend_stream_assembler.h"

#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

v1::AttendStreamRequest Header(int64_t seq_len) {
  v1::AttendStreamRequest message;
  v1::StreamHeader* header = message.mutable_header();
  for (v1::TensorSpec* spec : {header->mutable_q(), header->mutable_k(), header->mutable_v()}) {
    spec->set_dtype(v1::DATA_TYPE_BF16);
    spec->set_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
    spec->add_shape(seq_len);
    spec->add_shape(1);
    spec->add_shape(4);
  }
  header->set_request_id("r1");
  return message;
}

v1::AttendStreamRequest Chunk(v1::TensorName tensor, int64_t offset, std::string data) {
  v1::AttendStreamRequest message;
  message.mutable_chunk()->set_tensor(tensor);
  message.mutable_chunk()->set_offset(offset);
  message.mutable_chunk()->set_data(std::move(data));
  return message;
}

TEST(AttendStreamAssemblerTest, AssemblesTensorsFromChunksInAnyInterleaving) {
  ConvertOptions options;
  AttendStreamAssembler assembler(&options);
  EXPECT_EQ(assembler.EndedEarlyMessage(), "stream ended before a header arrived");
  ASSERT_TRUE(assembler.Add(Header(2)).ok());  // 2 * 1 * 4 bf16 = 16 bytes each
  EXPECT_EQ(assembler.requested_id(), "r1");
  EXPECT_EQ(assembler.spec().q_bytes, 16);
  ASSERT_TRUE(assembler.Add(Chunk(v1::TENSOR_NAME_V, 0, std::string(16, 'v'))).ok());
  ASSERT_TRUE(assembler.Add(Chunk(v1::TENSOR_NAME_Q, 0, std::string(10, 'q'))).ok());
  ASSERT_TRUE(assembler.Add(Chunk(v1::TENSOR_NAME_K, 0, std::string(16, 'k'))).ok());
  EXPECT_FALSE(assembler.complete());
  EXPECT_THAT(assembler.EndedEarlyMessage(), HasSubstr("q is missing 6 of 16 bytes"));
  ASSERT_TRUE(assembler.Add(Chunk(v1::TENSOR_NAME_Q, 10, std::string(6, 'Q'))).ok());
  EXPECT_TRUE(assembler.complete());
  EXPECT_EQ(std::string(assembler.data(0), 16), std::string(10, 'q') + std::string(6, 'Q'));
  EXPECT_EQ(std::string(assembler.data(2), 16), std::string(16, 'v'));

  absl::Status more = assembler.Add(Chunk(v1::TENSOR_NAME_K, 16, "x"));
  EXPECT_THAT(more.message(), HasSubstr("after all tensor data arrived"));
  assembler.ReleaseData();
  EXPECT_EQ(assembler.data(0), nullptr);
  EXPECT_THAT(assembler.Add(Header(2)).message(), HasSubstr("second header"));
}

TEST(AttendStreamAssemblerTest, RejectsProtocolErrorsNamingTheRule) {
  ConvertOptions options;
  struct Case {
    std::vector<v1::AttendStreamRequest> messages;
    absl::StatusCode code;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {{Chunk(v1::TENSOR_NAME_Q, 0, "ab")},
       absl::StatusCode::kInvalidArgument,
       "got a chunk before any header"},
      {{v1::AttendStreamRequest()}, absl::StatusCode::kInvalidArgument, "neither header nor chunk"},
      {{Header(2), Chunk(v1::TENSOR_NAME_Q, 4, "ab")},
       absl::StatusCode::kInvalidArgument,
       "chunk.offset of q is 4, expected 0"},
      {{Header(2), Chunk(v1::TENSOR_NAME_K, 0, std::string(17, 'k'))},
       absl::StatusCode::kInvalidArgument,
       "beyond the 16 bytes"},
      {{Header(2), Chunk(v1::TENSOR_NAME_OUTPUT, 0, "ab")},
       absl::StatusCode::kInvalidArgument,
       "got TENSOR_NAME_OUTPUT"},
      {{Header(2), Chunk(static_cast<v1::TensorName>(99), 0, "ab")},
       absl::StatusCode::kInvalidArgument,
       "unknown value 99"},
      {{Header(0)}, absl::StatusCode::kInvalidArgument, "must be positive"},
  };
  for (const Case& c : cases) {
    AttendStreamAssembler assembler(&options);
    absl::Status status;
    for (const v1::AttendStreamRequest& message : c.messages) {
      status = assembler.Add(message);
      if (!status.ok()) break;
    }
    EXPECT_EQ(status.code(), c.code) << status;
    EXPECT_THAT(status.message(), HasSubstr(c.fragment));
  }
}

TEST(AttendStreamAssemblerTest, SizesOverTheLimitAreRefusedBeforeAllocating) {
  ConvertOptions options;
  options.max_request_bytes = 40;  // q + k + v of Header(2) hold 48 bytes
  AttendStreamAssembler assembler(&options);
  absl::Status status = assembler.Add(Header(2));
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(assembler.header_received());
  EXPECT_EQ(assembler.data(0), nullptr);
}

}  // namespace
}  // namespace anchorserve
