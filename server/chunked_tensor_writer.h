// The output side of a server stream: whole messages and tensors queued by a producer, handed
// out one message at a time, each tensor as chunks of at most chunk_bytes in increasing offset
// order. AttendStream sends its output with it, Prefill each layer's K and V.
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
  // Writes one chunk into `out`: `bytes` at byte `offset` of the tensor queued with `tag`.
  using ChunkFiller =
      absl::AnyInvocable<void(int tag, int64_t offset, absl::string_view bytes, Response* out)>;

  ChunkedTensorWriter(int64_t chunk_bytes, ChunkFiller fill_chunk)
      : chunk_bytes_(chunk_bytes), fill_chunk_(std::move(fill_chunk)) {}

  void PushMessage(Response message) {
    Item item;
    item.message = std::move(message);
    items_.push_back(std::move(item));
  }

  // `bytes` ([size]) are freed once their last chunk has been handed out.
  void PushTensor(int tag, HostBuffer bytes, int64_t size) {
    Item item;
    item.tag = tag;
    item.bytes = std::move(bytes);
    item.size = size;
    pending_bytes_ += size;
    items_.push_back(std::move(item));
  }

  // Moves the next message into `out` (a chunk reuses out's storage); false when nothing is
  // queued.
  bool Next(Response* out) {
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
      fill_chunk_(item.tag, item.taken,
                  absl::string_view(item.bytes.get() + item.taken, static_cast<size_t>(bytes)),
                  out);
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
    HostBuffer bytes;
    int64_t size = 0;
    int64_t taken = 0;
  };

  const int64_t chunk_bytes_;
  ChunkFiller fill_chunk_;
  std::deque<Item> items_;
  int64_t pending_bytes_ = 0;
};

}  // namespace anchorserve
