// Zero-filled buffers prepared on a helper thread. Writing a fresh buffer's pages for the first
// time is what makes the kernel map them; done inside a receive loop it stalls the download, so
// the clients fill the buffers that the next bytes will land in while they wait for the server.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace anchorserve {

// Buffers at least this large are worth a helper thread.
inline constexpr int64_t kBackgroundFillMinBytes = int64_t{8} << 20;

// One buffer of `bytes` zeros, filled on its own thread from construction. A buffer that is
// never taken stops filling at the next 8 MiB step when destroyed.
class BackgroundZeroedBuffer {
 public:
  explicit BackgroundZeroedBuffer(size_t bytes)
      : thread_([this, bytes] {
          constexpr size_t kStep = size_t{8} << 20;
          buffer_.reserve(bytes);
          while (buffer_.size() < bytes && !stop_.load(std::memory_order_relaxed)) {
            buffer_.resize(std::min(bytes, buffer_.size() + kStep));
          }
        }) {}
  ~BackgroundZeroedBuffer() {
    stop_.store(true, std::memory_order_relaxed);
    if (thread_.joinable()) thread_.join();
  }
  BackgroundZeroedBuffer(const BackgroundZeroedBuffer&) = delete;
  BackgroundZeroedBuffer& operator=(const BackgroundZeroedBuffer&) = delete;

  // Waits for the whole fill; call once.
  std::vector<uint8_t> Take() {
    thread_.join();
    return std::move(buffer_);
  }

 private:
  std::vector<uint8_t> buffer_;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: starts once buffer_ and stop_ exist
};

}  // namespace anchorserve
