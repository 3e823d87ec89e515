// Read-only access to .safetensors checkpoints: one memory-mapped file, or a sharded set described
// by model.safetensors.index.json. Headers are bounds-checked before any tensor is handed out.
//
// File layout: 8-byte little-endian header length L, L bytes of JSON
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
// data area. Offsets are relative to the data area; the tensors must tile it exactly (no overlap,
// no holes, nothing after the last one), as the format requires.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"

namespace anchorserve {

// Largest header accepted (the format's reference parser uses the same cap).
inline constexpr int64_t kMaxSafetensorsHeaderBytes = int64_t{100} << 20;

struct StoredTensor {
  std::string name;
  DType dtype = DType::kFp32;
  std::vector<int64_t> shape;
  const char* data = nullptr;  // inside the file mapping, little-endian row-major
  int64_t num_bytes = 0;
  const std::string* file = nullptr;  // path of the file that holds it

  int64_t NumElements() const { return num_bytes / static_cast<int64_t>(ElementSize(dtype)); }
  std::string ShapeString() const;  // "[a, b]"
};

// One memory-mapped .safetensors file. Tensor data stays valid while the object lives.
class SafetensorsFile {
 public:
  // INVALID_ARGUMENT naming the file (and the tensor) when the header is malformed or points
  // outside the file; NOT_FOUND / INTERNAL from the file system.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // The same checks over bytes in memory (not copied: they must outlive the object); `name`
  // stands in for the path in messages. For tests and the fuzz target.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string name,
                                                                    absl::Span<const char> bytes);
  ~SafetensorsFile();

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Sorted by name.
  const std::map<std::string, StoredTensor>& tensors() const { return tensors_; }
  const StoredTensor* Find(absl::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The whole mapping (header included).
  absl::Span<const char> bytes() const { return {base_, size_}; }

  // Tells the kernel that the pages behind `view` are no longer needed (they are dropped from
  // this process's resident set and re-read from the file if touched again).
  void Release(const StoredTensor& view) const;

 private:
  SafetensorsFile() = default;
  absl::Status Parse();

  std::string path_;
  const char* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;  // base_ is our mmap (Open), not the caller's bytes (FromBytes)
  std::map<std::string, StoredTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: model.safetensors if present, else the shards listed by
// model.safetensors.index.json (only tensors named in its weight_map, each looked up in its
// shard).
class TensorStore {
 public:
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // Sorted by name; pointers stay valid while the store lives.
  const std::map<std::string, const StoredTensor*>& tensors() const { return tensors_; }
  const StoredTensor* Find(absl::string_view name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  void Release(const StoredTensor& view) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const StoredTensor*> tensors_;
  std::map<const std::string*, const SafetensorsFile*> file_of_path_;
};

}  // namespace anchorserve
