#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/status_macros.h"
#include "nlohmann/json.hpp"

namespace anchorserve {
namespace {

using Json = nlohmann::json;

absl::Status FileError(const std::string& path, absl::string_view what) {
  const int error = errno;
  const std::string message = absl::StrCat(path, ": ", what, ": ", std::strerror(error));
  return error == ENOENT ? absl::NotFoundError(message) : absl::InternalError(message);
}

std::optional<DType> ParseDType(absl::string_view name) {
  if (name == "BF16") return DType::kBf16;
  if (name == "F16") return DType::kFp16;
  if (name == "F32") return DType::kFp32;
  return std::nullopt;
}

// A non-negative JSON integer, or nullopt.
std::optional<int64_t> NonNegativeInt(const Json& value) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) {
    const int64_t i = value.get<int64_t>();
    if (i < 0) return std::nullopt;
    return i;
  }
  return std::nullopt;
}

bool MultiplyOverflows(int64_t a, int64_t b, int64_t* product) {
  return __builtin_mul_overflow(a, b, product);
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    errno = errno == 0 ? ENOENT : errno;
    return FileError(path, "cannot open");
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return FileError(path, "read failed");
  return contents.str();
}

}  // namespace

std::string StoredTensor::ShapeString() const {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  errno = 0;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return FileError(path, "cannot open");
  struct stat info;
  if (::fstat(fd, &info) != 0) {
    const absl::Status status = FileError(path, "cannot stat");
    ::close(fd);
    return status;
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  if (info.st_size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", info.st_size, " bytes, too short for a safetensors header"));
  }
  void* mapping = ::mmap(nullptr, static_cast<size_t>(info.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  const absl::Status map_status =
      mapping == MAP_FAILED ? FileError(path, "mmap failed") : absl::OkStatus();
  ::close(fd);  // the mapping keeps the file alive
  ANCHOR_RETURN_IF_ERROR(map_status);
  file->base_ = static_cast<const char*>(mapping);
  file->size_ = static_cast<size_t>(info.st_size);
  file->mapped_ = true;
  ANCHOR_RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    std::string name, absl::Span<const char> bytes) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::move(name);
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(absl::StrCat(file->path_, ": ", bytes.size(),
                                                   " bytes, too short for a safetensors header"));
  }
  file->base_ = bytes.data();
  file->size_ = bytes.size();
  ANCHOR_RETURN_IF_ERROR(file->Parse());
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapped_) ::munmap(const_cast<char*>(base_), size_);
}

absl::Status SafetensorsFile::Parse() {
  const int64_t file_size = static_cast<int64_t>(size_);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) {  // little-endian on every host
    header_length = (header_length << 8) | static_cast<uint8_t>(base_[i]);
  }
  if (header_length > static_cast<uint64_t>(kMaxSafetensorsHeaderBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": header length ", header_length,
                                                   " exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (static_cast<int64_t>(header_length) > file_size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": header length ", header_length,
                                                   " runs past the end of the file (", file_size,
                                                   " bytes)"));
  }
  const char* header = base_ + 8;
  const Json root =
      Json::parse(header, header + header_length, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": header is not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": header must be a JSON object"));
  }
  const char* data = header + header_length;
  const int64_t data_size = file_size - 8 - static_cast<int64_t>(header_length);

  struct Extent {
    int64_t begin, end;
    const std::string* name;
  };
  std::vector<Extent> extents;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const Json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path_, ": __metadata__ must be an object of strings"));
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path_, ": __metadata__ value of '", m.key(), "' is not a string"));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto invalid = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", name, "': ", what));
    };
    if (!entry.is_object()) return invalid("entry must be an object");
    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) return invalid("dtype missing");
    const std::string dtype_name = dtype_it->get<std::string>();
    const std::optional<DType> dtype = ParseDType(dtype_name);
    if (!dtype.has_value()) {
      return invalid(absl::StrCat("dtype '", dtype_name, "' is not supported (BF16, F16, F32)"));
    }
    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) return invalid("shape missing");
    StoredTensor view;
    view.name = name;
    view.dtype = *dtype;
    view.file = &path_;
    int64_t elements = 1;
    for (const Json& dim : *shape_it) {
      const std::optional<int64_t> extent = NonNegativeInt(dim);
      if (!extent.has_value()) return invalid("shape entries must be non-negative integers");
      view.shape.push_back(*extent);
      if (MultiplyOverflows(elements, *extent, &elements)) return invalid("shape overflows");
    }
    int64_t expected_bytes = 0;
    if (MultiplyOverflows(elements, static_cast<int64_t>(ElementSize(*dtype)), &expected_bytes)) {
      return invalid("shape overflows");
    }
    auto offsets_it = entry.find("data_offsets");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return invalid("data_offsets must be [begin, end]");
    }
    const std::optional<int64_t> begin = NonNegativeInt((*offsets_it)[0]);
    const std::optional<int64_t> end = NonNegativeInt((*offsets_it)[1]);
    if (!begin.has_value() || !end.has_value()) {
      return invalid("data_offsets must be non-negative integers");
    }
    if (*end < *begin) {
      return invalid(absl::StrCat("data_offsets [", *begin, ", ", *end, "] end before begin"));
    }
    if (*end > data_size) {
      return invalid(absl::StrCat("data_offsets [", *begin, ", ", *end,
                                  "] lie outside the data area of ", data_size, " bytes"));
    }
    if (*end - *begin != expected_bytes) {
      return invalid(absl::StrCat("data_offsets [", *begin, ", ", *end, "] hold ", *end - *begin,
                                  " bytes but shape ", view.ShapeString(), " of ", dtype_name,
                                  " needs ", expected_bytes));
    }
    view.data = data + *begin;
    view.num_bytes = expected_bytes;
    auto [inserted, unused] = tensors_.emplace(name, std::move(view));
    extents.push_back({*begin, *end, &inserted->first});
  }

  // The tensors must tile the data area: sorted by offset, each starts where the previous ends.
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t covered = 0;
  const std::string* previous = nullptr;
  for (const Extent& extent : extents) {
    if (extent.begin < covered) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": tensors '", *previous, "' and '", *extent.name, "' overlap"));
    }
    if (extent.begin > covered) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": bytes [", covered, ", ",
                                                     extent.begin,
                                                     ") of the data area before "
                                                     "tensor '",
                                                     *extent.name, "' belong to no tensor"));
    }
    covered = extent.end;
    previous = extent.name;
  }
  if (covered != data_size) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", data_size - covered,
                                                   " bytes after the last tensor belong to no "
                                                   "tensor"));
  }
  return absl::OkStatus();
}

const StoredTensor* SafetensorsFile::Find(absl::string_view name) const {
  auto it = tensors_.find(std::string(name));
  return it == tensors_.end() ? nullptr : &it->second;
}

void SafetensorsFile::Release(const StoredTensor& view) const {
  if (!mapped_) return;  // the caller's bytes (FromBytes): not ours to drop
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(view.data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(view.data) + view.num_bytes) / page * page;
  // Advisory: a failure only leaves the pages resident.
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto store = std::make_unique<TensorStore>();
  store->dir_ = dir;
  const std::string single = (fs::path(dir) / "model.safetensors").string();
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::error_code error;
  if (fs::exists(single, error)) {
    ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single));
    for (const auto& [name, view] : file->tensors()) store->tensors_[name] = &view;
    store->file_of_path_[&file->path()] = file.get();
    store->files_.push_back(std::move(file));
    return store;
  }
  if (!fs::exists(index_path, error)) {
    return absl::NotFoundError(absl::StrCat(dir,
                                            ": neither model.safetensors nor "
                                            "model.safetensors.index.json exists"));
  }
  ANCHOR_ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
  const Json root = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
  }
  auto map_it = root.find("weight_map");
  if (map_it == root.end() || !map_it->is_object() || map_it->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": field 'weight_map' must be a non-empty object"));
  }
  std::map<std::string, SafetensorsFile*> shards;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": weight_map entry of '", it.key(), "' is not a string"));
    }
    const std::string shard = it.value().get<std::string>();
    // Shards are plain file names next to the index.
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry of '",
                                                     it.key(), "' names '", shard,
                                                     "', not a file in the same folder"));
    }
    auto shard_it = shards.find(shard);
    if (shard_it == shards.end()) {
      ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                              SafetensorsFile::Open((fs::path(dir) / shard).string()));
      shard_it = shards.emplace(shard, file.get()).first;
      store->file_of_path_[&file->path()] = file.get();
      store->files_.push_back(std::move(file));
    }
    const StoredTensor* view = shard_it->second->Find(it.key());
    if (view == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": tensor '", it.key(), "' is not in its shard ", shard_it->second->path()));
    }
    store->tensors_[it.key()] = view;
  }
  return store;
}

const StoredTensor* TensorStore::Find(absl::string_view name) const {
  auto it = tensors_.find(std::string(name));
  return it == tensors_.end() ? nullptr : it->second;
}

void TensorStore::Release(const StoredTensor& view) const {
  auto it = file_of_path_.find(view.file);
  if (it != file_of_path_.end()) it->second->Release(view);
}

}  // namespace anchorserve
