#include "server/chunked_tensor_writer.h"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace anchorserve {
namespace {

using ::testing::ElementsAre;

// A stand-in for a response message: either a whole message or one chunk.
struct Message {
  std::string text;  // whole messages
  int tag = -1;      // chunks
  int64_t offset = -1;
  std::string data;
};

Message Whole(const std::string& text) {
  Message message;
  message.text = text;
  return message;
}

HostBuffer Bytes(const std::string& text) {
  HostBuffer bytes = AllocateBytes(static_cast<int64_t>(text.size()));
  std::memcpy(bytes.get(), text.data(), text.size());
  return bytes;
}

ChunkedTensorWriter<Message> MakeWriter(int64_t chunk_bytes) {
  return ChunkedTensorWriter<Message>(
      chunk_bytes, [](int tag, int64_t offset, absl::string_view bytes, Message* out) {
        out->text.clear();
        out->tag = tag;
        out->offset = offset;
        out->data.assign(bytes.data(), bytes.size());
      });
}

std::vector<std::string> Drain(ChunkedTensorWriter<Message>& writer) {
  std::vector<std::string> written;
  Message message;
  while (writer.Next(&message)) {
    written.push_back(message.tag < 0 ? message.text
                                      : std::to_string(message.tag) + "@" +
                                            std::to_string(message.offset) + ":" + message.data);
    message = Message{};
  }
  return written;
}

TEST(ChunkedTensorWriterTest, MessagesAndChunksInQueueOrder) {
  ChunkedTensorWriter<Message> writer = MakeWriter(4);
  writer.PushMessage(Whole("header"));
  writer.PushTensor(7, Bytes("abcdefghij"), 10);
  writer.PushTensor(8, Bytes("xyz"), 3);
  writer.PushMessage(Whole("metrics"));
  EXPECT_EQ(writer.pending_bytes(), 13);
  EXPECT_THAT(Drain(writer),
              ElementsAre("header", "7@0:abcd", "7@4:efgh", "7@8:ij", "8@0:xyz", "metrics"));
  EXPECT_TRUE(writer.empty());
  EXPECT_EQ(writer.pending_bytes(), 0);
}

TEST(ChunkedTensorWriterTest, PendingBytesShrinkAsChunksAreTaken) {
  ChunkedTensorWriter<Message> writer = MakeWriter(3);
  writer.PushTensor(1, Bytes("abcdefg"), 7);
  Message message;
  ASSERT_TRUE(writer.Next(&message));
  EXPECT_EQ(writer.pending_bytes(), 4);
  ASSERT_TRUE(writer.Next(&message));
  EXPECT_EQ(writer.pending_bytes(), 1);
  ASSERT_TRUE(writer.Next(&message));
  EXPECT_EQ(message.data, "g");
  EXPECT_FALSE(writer.Next(&message));
}

TEST(ChunkedTensorWriterTest, EmptyTensorSendsNoChunkAndClearDropsEverything) {
  ChunkedTensorWriter<Message> writer = MakeWriter(3);
  writer.PushTensor(1, nullptr, 0);
  writer.PushMessage(Whole("after"));
  EXPECT_THAT(Drain(writer), ElementsAre("after"));
  writer.PushTensor(2, Bytes("abc"), 3);
  writer.Clear();
  EXPECT_TRUE(writer.empty());
  EXPECT_EQ(writer.pending_bytes(), 0);
  Message message;
  EXPECT_FALSE(writer.Next(&message));
}

}  // namespace
}  // namespace anchorserve
