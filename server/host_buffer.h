// Host memory for tensor bytes (request inputs, outputs, KV copies). Large buffers are mapped
// from the kernel directly rather than taken from malloc's arenas: their pages become resident
// only as they are written (a declared-but-unsent upload costs nothing) and go back to the system
// the moment the buffer is freed, so the process's memory follows the memory budget's count
// instead of the arenas' high-water mark.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace anchorserve {

class HostBufferDeleter {
 public:
  HostBufferDeleter() = default;
  explicit HostBufferDeleter(size_t bytes) : bytes_(bytes) {}
  void operator()(char* data) const;

 private:
  size_t bytes_ = 0;
};

using HostBuffer = std::unique_ptr<char[], HostBufferDeleter>;

// Not zero-filled; null when the allocation fails.
HostBuffer AllocateBytes(int64_t bytes);

}  // namespace anchorserve
