#include "server/host_buffer.h"

#include <sys/mman.h>

#include <new>

namespace anchorserve {
namespace {

// Below this, malloc's arenas serve small buffers well (and faster).
constexpr size_t kMappedBytes = size_t{1} << 20;

}  // namespace

void HostBufferDeleter::operator()(char* data) const {
  if (data == nullptr) return;
  if (bytes_ >= kMappedBytes) {
    munmap(data, bytes_);
  } else {
    delete[] data;
  }
}

HostBuffer AllocateBytes(int64_t bytes) {
  const size_t size = static_cast<size_t>(bytes);
  if (size >= kMappedBytes) {
    void* mapped = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) return HostBuffer(nullptr, HostBufferDeleter(size));
    return HostBuffer(static_cast<char*>(mapped), HostBufferDeleter(size));
  }
  return HostBuffer(new (std::nothrow) char[size], HostBufferDeleter(size));
}

}  // namespace anchorserve
