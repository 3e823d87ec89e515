// Writing safetensors files tensor by tensor, without holding the tensors in memory.
//
// Layout of a safetensors file: an 8-byte little-endian header length, the JSON header (padded
// with spaces to a multiple of 8 bytes), then the tensors' bytes back to back. The header maps
// each tensor name to {"dtype": "BF16"|"F16"|"F32", "shape": [...], "data_offsets": [begin, end]}
// (offsets relative to the first data byte) and may hold "__metadata__", a string-to-string map.
// Since every tensor's size is known up front, the header is written first and the data follows
// as it arrives.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"

namespace anchorserve {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kFp32;
  std::vector<int64_t> shape;
};

// Bytes of one entry's data; fails when a dim is negative or the size overflows.
absl::StatusOr<int64_t> SafetensorsEntryBytes(const SafetensorsEntry& entry);

// The header (length prefix + padded JSON) of a file holding `entries` back to back in order.
// Names must be unique, non-empty, not "__metadata__" and valid UTF-8 (so must the metadata): a
// JSON header with other bytes is rejected by every reader.
absl::StatusOr<std::string> MakeSafetensorsHeader(
    absl::Span<const SafetensorsEntry> entries,
    const std::map<std::string, std::string>& metadata = {});

// Writes a file whose entries arrive in order, each from its first byte to its last in
// contiguous pieces. The file is built as PATH.partial and renamed to PATH by Finish(); a writer
// destroyed before a successful Finish() removes the partial file.
class SafetensorsWriter {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      std::string path, std::vector<SafetensorsEntry> entries,
      const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Appends `data` to entry `index` at byte `offset` of that entry. FAILED_PRECONDITION when the
  // piece is not the next one expected (another entry, a gap, an overlap, or past the entry's
  // end); errors name the entry.
  absl::Status Write(size_t index, int64_t offset, absl::string_view data);

  // Checks that every entry is complete, flushes, closes and renames the file into place.
  absl::Status Finish();

  const std::string& path() const { return path_; }
  int64_t file_bytes() const { return header_bytes_ + data_bytes_; }

 private:
  SafetensorsWriter(std::string path, std::vector<SafetensorsEntry> entries,
                    std::vector<int64_t> sizes);

  std::string path_;
  std::string partial_path_;
  std::vector<SafetensorsEntry> entries_;
  std::vector<int64_t> sizes_;
  std::FILE* file_ = nullptr;
  int64_t header_bytes_ = 0;
  int64_t data_bytes_ = 0;
  size_t current_ = 0;           // entry being written
  int64_t current_written_ = 0;  // its bytes written so far
  bool finished_ = false;
};

}  // namespace anchorserve
