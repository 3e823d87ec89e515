// Host memory for tensor bytes (request inputs, outputs, KV copies). Large buffers are mapped
// from the kernel directly rather than taken from malloc's arenas: their pages become resident
// only as they are written (a declared-but-unsent upload costs nothing) and go back to the system
// the moment the buffer is freed, so the process's memory follows the memory budget's count
// instead of the arenas' high-water mark.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/backend.h"

namespace anchorserve {

class HostBufferDeleter {
 public:
  HostBufferDeleter() = default;
  HostBufferDeleter(size_t bytes, HostMemoryPool* pool) : bytes_(bytes), pool_(pool) {}
  void operator()(char* data) const;

 private:
  size_t bytes_ = 0;
  HostMemoryPool* pool_ = nullptr;  // the block goes back there
};

using HostBuffer = std::unique_ptr<char[], HostBufferDeleter>;

// Not zero-filled; null when the allocation fails. From `pool` (the backend's, e.g. page-locked
// memory the GPU copies at full rate) when it has a block, else mapped or heap memory.
HostBuffer AllocateBytes(int64_t bytes, HostMemoryPool* pool = nullptr);

}  // namespace anchorserve
