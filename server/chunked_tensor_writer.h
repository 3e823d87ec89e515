// The output side of a server stream: whole messages and tensors queued by a producer, handed
// out one message at a time, each tensor as chunks of at most chunk_bytes in increasing offset
// order. AttendStream sends its output with it, Prefill each layer's K and V.
//
// A chunk comes out as a message with its metadata (tensor, offset) and, beside it, the chunk's
// bytes where they lie in the tensor's buffer, with shared ownership of that buffer: the reactor
// hands them to gRPC as a slice instead of copying them into the message (tensor_wire.h).
//
// Not thread-safe: the reactor that owns it guards it with its own mutex and keeps one write in
// flight, asking Next() for the following message when the previous write is done.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <utility>

#include "absl/functional/any_invocable.h"
#include "absl/strings/string_view.h"
#include "server/host_buffer.h"

namespace anchorserve {

template <typename Response>
class ChunkedTensorWriter {
 public:
  // Writes the metadata of one chunk into `out`: the chunk at byte `offset` of the tensor queued
  // with `tag` (its bytes travel beside the message, see ChunkBytes).
  using ChunkFiller = absl::AnyInvocable<void(int tag, int64_t offset, Response* out)>;

  // The bytes of a chunk, and a share of the buffer they lie in (kept alive while gRPC sends).
  struct ChunkBytes {
    std::shared_ptr<const HostBuffer> owner;
    absl::string_view bytes;
  };

  ChunkedTensorWriter(int64_t chunk_bytes, ChunkFiller fill_chunk)
      : chunk_bytes_(chunk_bytes), fill_chunk_(std::move(fill_chunk)) {}

  void PushMessage(Response message) {
    Item item;
    item.message = std::move(message);
    items_.push_back(std::move(item));
  }

  // `bytes` ([size]) are freed once their last chunk has been handed out and sent.
  void PushTensor(int tag, HostBuffer bytes, int64_t size) {
    Item item;
    item.tag = tag;
    item.bytes = std::make_shared<const HostBuffer>(std::move(bytes));
    item.size = size;
    pending_bytes_ += size;
    items_.push_back(std::move(item));
  }

  // Moves the next message into `out` (a chunk reuses out's storage) and, for a chunk, its bytes
  // into `chunk` (empty for a whole message); false when nothing is queued.
  bool Next(Response* out, ChunkBytes* chunk) {
    *chunk = ChunkBytes{};
    while (!items_.empty()) {
      Item& item = items_.front();
      if (item.message.has_value()) {
        *out = *std::move(item.message);
        items_.pop_front();
        return true;
      }
      if (item.taken == item.size) {  // an empty tensor sends no chunk
        items_.pop_front();
        continue;
      }
      const int64_t bytes = std::min(chunk_bytes_, item.size - item.taken);
      fill_chunk_(item.tag, item.taken, out);
      chunk->owner = item.bytes;
      chunk->bytes = absl::string_view(item.bytes->get() + item.taken, static_cast<size_t>(bytes));
      item.taken += bytes;
      pending_bytes_ -= bytes;
      if (item.taken == item.size) items_.pop_front();
      return true;
    }
    return false;
  }

  bool empty() const { return items_.empty(); }
  // Tensor bytes queued and not yet handed out: what backpressure looks at.
  int64_t pending_bytes() const { return pending_bytes_; }

  // Drops everything queued (the call ended).
  void Clear() {
    items_.clear();
    pending_bytes_ = 0;
  }

 private:
  struct Item {
    std::optional<Response> message;
    int tag = 0;
    std::shared_ptr<const HostBuffer> bytes;
    int64_t size = 0;
    int64_t taken = 0;
  };

  const int64_t chunk_bytes_;
  ChunkFiller fill_chunk_;
  std::deque<Item> items_;
  int64_t pending_bytes_ = 0;
};

}  // namespace anchorserve
