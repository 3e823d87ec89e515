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

using Writer = ChunkedTensorWriter<Message>;

Writer MakeWriter(int64_t chunk_bytes) {
  return Writer(chunk_bytes, [](int tag, int64_t offset, Message* out) {
    out->text.clear();
    out->tag = tag;
    out->offset = offset;
  });
}

// The next message with its chunk's bytes (which travel beside the message) put into `data`.
bool NextWithData(Writer& writer, Message* message) {
  Writer::ChunkBytes chunk;
  if (!writer.Next(message, &chunk)) return false;
  message->data = std::string(chunk.bytes);
  EXPECT_EQ(chunk.owner == nullptr, message->tag < 0);
  return true;
}

std::vector<std::string> Drain(Writer& writer) {
  std::vector<std::string> written;
  Message message;
  while (NextWithData(writer, &message)) {
    written.push_back(message.tag < 0 ? message.text
                                      : std::to_string(message.tag) + "@" +
                                            std::to_string(message.offset) + ":" + message.data);
    message = Message{};
  }
  return written;
}

TEST(ChunkedTensorWriterTest, MessagesAndChunksInQueueOrder) {
  Writer writer = MakeWriter(4);
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
  Writer writer = MakeWriter(3);
  writer.PushTensor(1, Bytes("abcdefg"), 7);
  Message message;
  ASSERT_TRUE(NextWithData(writer, &message));
  EXPECT_EQ(writer.pending_bytes(), 4);
  ASSERT_TRUE(NextWithData(writer, &message));
  EXPECT_EQ(writer.pending_bytes(), 1);
  ASSERT_TRUE(NextWithData(writer, &message));
  EXPECT_EQ(message.data, "g");
  EXPECT_FALSE(NextWithData(writer, &message));
}

// A chunk handed out keeps its tensor's buffer alive after the writer let go of it (the last
// chunk taken, or the call's queue cleared) until the chunk itself is dropped: gRPC sends the
// bytes from there after Next returns.
TEST(ChunkedTensorWriterTest, ChunkKeepsItsBufferAlive) {
  Writer writer = MakeWriter(4);
  writer.PushTensor(1, Bytes("abcdefgh"), 8);
  Message message;
  Writer::ChunkBytes first;
  ASSERT_TRUE(writer.Next(&message, &first));
  Writer::ChunkBytes last;
  ASSERT_TRUE(writer.Next(&message, &last));
  EXPECT_TRUE(writer.empty());
  writer.Clear();
  EXPECT_EQ(first.bytes, "abcd");
  EXPECT_EQ(last.bytes, "efgh");
  EXPECT_EQ(first.owner, last.owner);
  EXPECT_EQ(first.owner.use_count(), 2);
  first = Writer::ChunkBytes{};
  EXPECT_EQ(last.owner.use_count(), 1);
}

TEST(ChunkedTensorWriterTest, EmptyTensorSendsNoChunkAndClearDropsEverything) {
  Writer writer = MakeWriter(3);
  writer.PushTensor(1, nullptr, 0);
  writer.PushMessage(Whole("after"));
  EXPECT_THAT(Drain(writer), ElementsAre("after"));
  writer.PushTensor(2, Bytes("abc"), 3);
  writer.Clear();
  EXPECT_TRUE(writer.empty());
  EXPECT_EQ(writer.pending_bytes(), 0);
  Message message;
  EXPECT_FALSE(NextWithData(writer, &message));
}

}  // namespace
}  // namespace anchorserve
