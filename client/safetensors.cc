#include "client/safetensors.h"

#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace anchorserve {
namespace {

constexpr size_t kHeaderAlign = 8;
constexpr char kMetadataKey[] = "__metadata__";

// A JSON string literal: quotes, backslashes and control characters escaped; other bytes
// (UTF-8) as they are.
std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (byte < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", byte);
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
  return out;
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF): JSON text must be UTF-8,
// and the readers (the model loader's parser, Python's safetensors) reject anything else.
bool IsValidUtf8(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    int length = 0;
    uint32_t code = 0;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xe0) == 0xc0) {
      length = 2;
      code = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3;
      code = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4;
      code = lead & 0x07;
    } else {
      return false;
    }
    if (text.size() - i < static_cast<size_t>(length)) return false;
    for (int k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xc0) != 0x80) return false;
      code = (code << 6) | (next & 0x3f);
    }
    constexpr uint32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < kSmallest[length] || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) {
      return false;
    }
    i += static_cast<size_t>(length);
  }
  return true;
}

std::string ErrnoText() { return std::strerror(errno); }

}  // namespace

absl::StatusOr<int64_t> SafetensorsEntryBytes(const SafetensorsEntry& entry) {
  int64_t elements = 1;
  for (size_t i = 0; i < entry.shape.size(); ++i) {
    const int64_t dim = entry.shape[i];
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors entry '", entry.name, "': shape[",
                                                     i, "] is negative (", dim, ")"));
    }
    if (dim != 0 && elements > std::numeric_limits<int64_t>::max() / 8 / dim) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors entry '", entry.name,
                                                     "': shape [", absl::StrJoin(entry.shape, ", "),
                                                     "] is too large"));
    }
    elements *= dim;
  }
  return elements * static_cast<int64_t>(ElementSize(entry.dtype));
}

absl::StatusOr<std::string> MakeSafetensorsHeader(
    absl::Span<const SafetensorsEntry> entries,
    const std::map<std::string, std::string>& metadata) {
  for (const auto& [key, value] : metadata) {
    if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors metadata '", absl::CHexEscape(key), "' is not valid UTF-8 (key or value)"));
    }
  }
  for (const SafetensorsEntry& entry : entries) {
    if (!IsValidUtf8(entry.name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors entry name '", absl::CHexEscape(entry.name), "' is not valid UTF-8"));
    }
  }
  std::string json = "{";
  bool first = true;
  if (!metadata.empty()) {
    json += JsonString(kMetadataKey);
    json += ":{";
    bool first_item = true;
    for (const auto& [key, value] : metadata) {
      if (!first_item) json += ",";
      first_item = false;
      absl::StrAppend(&json, JsonString(key), ":", JsonString(value));
    }
    json += "}";
    first = false;
  }
  std::set<std::string> names;
  int64_t offset = 0;
  for (const SafetensorsEntry& entry : entries) {
    if (entry.name.empty() || entry.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors entry name '", entry.name, "' is not allowed"));
    }
    if (!names.insert(entry.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors entry name '", entry.name, "' appears twice"));
    }
    absl::StatusOr<int64_t> bytes = SafetensorsEntryBytes(entry);
    if (!bytes.ok()) return bytes.status();
    if (*bytes > std::numeric_limits<int64_t>::max() - offset) {
      return absl::InvalidArgumentError("safetensors entries are too large in total");
    }
    if (!first) json += ",";
    first = false;
    absl::StrAppend(&json, JsonString(entry.name), ":{\"dtype\":\"",
                    SafetensorsDTypeName(entry.dtype), "\",\"shape\":[",
                    absl::StrJoin(entry.shape, ","), "],\"data_offsets\":[", offset, ",",
                    offset + *bytes, "]}");
    offset += *bytes;
  }
  json += "}";
  // Spaces after the JSON so the data starts 8-byte aligned (8-byte prefix + padded JSON).
  json.append((kHeaderAlign - json.size() % kHeaderAlign) % kHeaderAlign, ' ');
  std::string header;
  header.reserve(8 + json.size());
  const uint64_t length = json.size();
  for (int i = 0; i < 8; ++i) header.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
  header += json;
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    std::string path, std::vector<SafetensorsEntry> entries,
    const std::map<std::string, std::string>& metadata) {
  if (path.empty()) return absl::InvalidArgumentError("safetensors path must not be empty");
  absl::StatusOr<std::string> header = MakeSafetensorsHeader(entries, metadata);
  if (!header.ok()) return header.status();
  std::vector<int64_t> sizes;
  sizes.reserve(entries.size());
  for (const SafetensorsEntry& entry : entries) sizes.push_back(*SafetensorsEntryBytes(entry));
  std::unique_ptr<SafetensorsWriter> writer(
      new SafetensorsWriter(std::move(path), std::move(entries), std::move(sizes)));
  writer->file_ = std::fopen(writer->partial_path_.c_str(), "wb");
  if (writer->file_ == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create ", writer->partial_path_, ": ", ErrnoText()));
  }
  if (std::fwrite(header->data(), 1, header->size(), writer->file_) != header->size()) {
    return absl::InternalError(
        absl::StrCat("writing the header of ", writer->partial_path_, " failed: ", ErrnoText()));
  }
  writer->header_bytes_ = static_cast<int64_t>(header->size());
  return writer;
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<SafetensorsEntry> entries,
                                     std::vector<int64_t> sizes)
    : path_(std::move(path)),
      partial_path_(path_ + ".partial"),
      entries_(std::move(entries)),
      sizes_(std::move(sizes)) {
  while (current_ < sizes_.size() && sizes_[current_] == 0) ++current_;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_ != nullptr) std::fclose(file_);
  if (!finished_) std::remove(partial_path_.c_str());
}

absl::Status SafetensorsWriter::Write(size_t index, int64_t offset, absl::string_view data) {
  if (finished_ || file_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(path_, " is already closed"));
  }
  if (index >= entries_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, " has ", entries_.size(), " entries; there is no entry ", index));
  }
  const std::string& name = entries_[index].name;
  if (index != current_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bytes of '", name, "' arrived while ",
        current_ < entries_.size() ? absl::StrCat("'", entries_[current_].name, "' is incomplete")
                                   : std::string("every entry is complete"),
        " (entries are written in order)"));
  }
  if (offset != current_written_) {
    return absl::FailedPreconditionError(
        absl::StrCat("bytes of '", name, "' at offset ", offset, ", expected ", current_written_));
  }
  const auto size = static_cast<int64_t>(data.size());
  if (size > sizes_[index] - current_written_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bytes of '", name, "' run to ", offset + size, ", past its size of ", sizes_[index]));
  }
  if (!data.empty() && std::fwrite(data.data(), 1, data.size(), file_) != data.size()) {
    return absl::InternalError(absl::StrCat("writing ", partial_path_, " failed: ", ErrnoText()));
  }
  current_written_ += size;
  data_bytes_ += size;
  if (current_written_ == sizes_[index]) {
    current_written_ = 0;
    ++current_;
    while (current_ < sizes_.size() && sizes_[current_] == 0) ++current_;
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (finished_) return absl::OkStatus();
  if (file_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(path_, " is already closed"));
  }
  if (current_ < entries_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, " is incomplete: '", entries_[current_].name, "' has ",
                     current_written_, " of ", sizes_[current_], " bytes"));
  }
  const bool flushed = std::fflush(file_) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!flushed || !closed) {
    return absl::InternalError(absl::StrCat("writing ", partial_path_, " failed: ", ErrnoText()));
  }
  if (std::rename(partial_path_.c_str(), path_.c_str()) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot rename ", partial_path_, " to ", path_, ": ", ErrnoText()));
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace anchorserve
