// The safetensors readers and writer: model/safetensors.cc parses arbitrary file bytes (never
// reading outside them, every tensor it hands out inside the file); the bytes also describe
// entries for client/safetensors.cc's header writer, whose output the reader must accept.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "client/safetensors.h"
#include "model/safetensors.h"

namespace {

void ParseFile(const char* bytes, size_t size) {
  absl::StatusOr<std::unique_ptr<anchorserve::SafetensorsFile>> file =
      anchorserve::SafetensorsFile::FromBytes("fuzz.safetensors", {bytes, size});
  if (!file.ok()) return;
  for (const auto& [name, tensor] : (*file)->tensors()) {
    if (tensor.data < bytes || tensor.num_bytes < 0 ||
        tensor.data + tensor.num_bytes > bytes + size) {
      std::abort();
    }
  }
}

// Entries from the input: [dtype byte, rank byte, dims (1 byte each), name length, name]...
void RoundTrip(const uint8_t* data, size_t size) {
  std::vector<anchorserve::SafetensorsEntry> entries;
  size_t at = 0;
  while (at + 2 <= size && entries.size() < 8) {
    anchorserve::SafetensorsEntry entry;
    entry.dtype = static_cast<anchorserve::DType>(data[at] % 3);
    const int rank = data[at + 1] % 4;
    at += 2;
    for (int i = 0; i < rank && at < size; ++i) entry.shape.push_back(data[at++] % 5);
    if (at >= size) break;
    const size_t name_length = data[at++] % 12;
    if (at + name_length > size) break;
    entry.name.assign(reinterpret_cast<const char*>(data + at), name_length);
    at += name_length;
    entries.push_back(std::move(entry));
  }
  absl::StatusOr<std::string> header = anchorserve::MakeSafetensorsHeader(entries);
  if (!header.ok()) return;
  std::string file = *header;
  int64_t data_bytes = 0;
  for (const anchorserve::SafetensorsEntry& entry : entries) {
    data_bytes += *anchorserve::SafetensorsEntryBytes(entry);
  }
  file.append(static_cast<size_t>(data_bytes), '\0');
  absl::StatusOr<std::unique_ptr<anchorserve::SafetensorsFile>> parsed =
      anchorserve::SafetensorsFile::FromBytes("written.safetensors", {file.data(), file.size()});
  if (!parsed.ok() || (*parsed)->tensors().size() != entries.size()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ParseFile(reinterpret_cast<const char*>(data), size);
  RoundTrip(data, size);
  return 0;
}
