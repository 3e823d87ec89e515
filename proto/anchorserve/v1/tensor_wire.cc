#include "proto/anchorserve/v1/tensor_wire.h"

#include <malloc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace anchorserve {
namespace {

// Wire types of the protobuf encoding (groups, 3 and 4, are not used by proto3 messages).
constexpr int kWireVarint = 0;
constexpr int kWireFixed64 = 1;
constexpr int kWireLengthDelimited = 2;
constexpr int kWireFixed32 = 5;

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

uint64_t Tag(int field, int wire_type) {
  return (static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire_type);
}

absl::Status Malformed(absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("malformed message: ", why));
}

// Reads forward over a list of byte pieces as if they were one buffer.
class PieceReader {
 public:
  explicit PieceReader(const std::vector<absl::string_view>& pieces) : pieces_(pieces) {
    SkipEmpty();
  }

  uint64_t position() const { return position_; }
  bool AtEnd() const { return index_ == pieces_.size(); }

  absl::Status ReadVarint(uint64_t* value) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (AtEnd()) return Malformed("varint runs past the end");
      const auto byte = static_cast<uint8_t>(pieces_[index_][offset_]);
      Advance(1);
      result |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) {
        *value = result;
        return absl::OkStatus();
      }
    }
    return Malformed("varint longer than 10 bytes");
  }

  // Moves past `size` bytes, appending the pieces they occupy to `out` when it is not null.
  absl::Status Take(uint64_t size, std::vector<absl::string_view>* out) {
    while (size > 0) {
      if (AtEnd()) return Malformed("length-delimited field runs past the end");
      const absl::string_view piece = pieces_[index_];
      const uint64_t available = piece.size() - offset_;
      const uint64_t n = std::min(size, available);
      if (out != nullptr) out->push_back(piece.substr(offset_, n));
      Advance(n);
      size -= n;
    }
    return absl::OkStatus();
  }

  // Appends the next `size` bytes to `out`.
  absl::Status AppendTo(uint64_t size, std::string* out) {
    std::vector<absl::string_view> taken;
    if (absl::Status status = Take(size, &taken); !status.ok()) return status;
    for (absl::string_view piece : taken) out->append(piece.data(), piece.size());
    return absl::OkStatus();
  }

 private:
  void Advance(uint64_t n) {
    offset_ += n;
    position_ += n;
    if (offset_ == pieces_[index_].size()) {
      ++index_;
      offset_ = 0;
      SkipEmpty();
    }
  }
  void SkipEmpty() {
    while (index_ < pieces_.size() && pieces_[index_].empty()) ++index_;
  }

  const std::vector<absl::string_view>& pieces_;
  size_t index_ = 0;
  uint64_t offset_ = 0;
  uint64_t position_ = 0;
};

// Reads one field's tag; rejects field number 0 and group wire types.
absl::Status ReadTag(PieceReader& reader, int* field, int* wire_type) {
  uint64_t tag = 0;
  if (absl::Status status = reader.ReadVarint(&tag); !status.ok()) return status;
  *field = static_cast<int>(tag >> 3);
  *wire_type = static_cast<int>(tag & 7);
  if ((tag >> 3) == 0 || (tag >> 3) > 536870911) return Malformed("invalid field number");
  if (*wire_type != kWireVarint && *wire_type != kWireFixed64 &&
      *wire_type != kWireLengthDelimited && *wire_type != kWireFixed32) {
    return Malformed(absl::StrCat("unsupported wire type ", *wire_type));
  }
  return absl::OkStatus();
}

// Re-encodes the value of a field whose tag was just read (and written to `out`).
absl::Status CopyValue(PieceReader& reader, int wire_type, std::string* out) {
  switch (wire_type) {
    case kWireVarint: {
      uint64_t value = 0;
      if (absl::Status status = reader.ReadVarint(&value); !status.ok()) return status;
      AppendVarint(value, out);
      return absl::OkStatus();
    }
    case kWireFixed64:
      return reader.AppendTo(8, out);
    case kWireFixed32:
      return reader.AppendTo(4, out);
    default: {
      uint64_t size = 0;
      if (absl::Status status = reader.ReadVarint(&size); !status.ok()) return status;
      AppendVarint(size, out);
      return reader.AppendTo(size, out);
    }
  }
}

// One v1.Tensor of `size` bytes at the reader: everything but `data` re-encoded into `rest`,
// `data` (when present; the last occurrence) into `data`.
absl::Status SplitTensor(PieceReader& reader, uint64_t size, int data_field, std::string* rest,
                         SegmentedBytes* data, bool* has_data) {
  const uint64_t end = reader.position() + size;
  while (reader.position() < end) {
    int field = 0;
    int wire_type = 0;
    if (absl::Status status = ReadTag(reader, &field, &wire_type); !status.ok()) return status;
    if (field == data_field && wire_type == kWireLengthDelimited) {
      uint64_t data_size = 0;
      if (absl::Status status = reader.ReadVarint(&data_size); !status.ok()) return status;
      if (data_size > end - std::min(end, reader.position())) {
        return Malformed("tensor data runs past its message");
      }
      *data = SegmentedBytes{};
      data->size = data_size;
      if (absl::Status status = reader.Take(data_size, &data->pieces); !status.ok()) return status;
      *has_data = true;
      continue;
    }
    AppendVarint(Tag(field, wire_type), rest);
    if (absl::Status status = CopyValue(reader, wire_type, rest); !status.ok()) return status;
  }
  if (reader.position() != end) return Malformed("a field runs past its tensor message");
  return absl::OkStatus();
}

}  // namespace

void SegmentedBytes::CopyTo(char* dest) const {
  for (absl::string_view piece : pieces) {
    std::memcpy(dest, piece.data(), piece.size());
    dest += piece.size();
  }
}

absl::StatusOr<SplitMessage> SplitTensorData(const grpc::ByteBuffer& buffer,
                                             absl::Span<const int> tensor_fields, int data_field) {
  SplitMessage split;
  if (grpc::Status status = buffer.Dump(&split.slices); !status.ok()) {
    return absl::InternalError(absl::StrCat("cannot read the message: ", status.error_message()));
  }
  std::vector<absl::string_view> pieces;
  pieces.reserve(split.slices.size());
  for (const grpc::Slice& slice : split.slices) {
    pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  PieceReader reader(pieces);
  while (!reader.AtEnd()) {
    int field = 0;
    int wire_type = 0;
    if (absl::Status status = ReadTag(reader, &field, &wire_type); !status.ok()) return status;
    const bool is_tensor =
        wire_type == kWireLengthDelimited &&
        std::find(tensor_fields.begin(), tensor_fields.end(), field) != tensor_fields.end();
    if (!is_tensor) {
      AppendVarint(Tag(field, wire_type), &split.rest);
      if (absl::Status status = CopyValue(reader, wire_type, &split.rest); !status.ok()) {
        return status;
      }
      continue;
    }
    uint64_t size = 0;
    if (absl::Status status = reader.ReadVarint(&size); !status.ok()) return status;
    std::string tensor_rest;
    SegmentedBytes data;
    bool has_data = false;
    if (absl::Status status = SplitTensor(reader, size, data_field, &tensor_rest, &data, &has_data);
        !status.ok()) {
      return status;
    }
    // Keep the occurrence (protobuf merges it with earlier ones) even when it only held data, so
    // that the tensor counts as present.
    AppendVarint(Tag(field, kWireLengthDelimited), &split.rest);
    AppendVarint(tensor_rest.size(), &split.rest);
    split.rest += tensor_rest;
    if (has_data) split.data[field] = std::move(data);
  }
  return split;
}

void AppendTensorData(int tensor_field, grpc::Slice data, std::vector<grpc::Slice>* slices,
                      int data_field) {
  if (data.size() == 0) return;
  std::string header;
  std::string data_key;
  AppendVarint(Tag(data_field, kWireLengthDelimited), &data_key);
  AppendVarint(data.size(), &data_key);
  AppendVarint(Tag(tensor_field, kWireLengthDelimited), &header);
  AppendVarint(data_key.size() + data.size(), &header);
  header += data_key;
  slices->emplace_back(header);
  slices->push_back(std::move(data));
}

void KeepReceiveBuffersResident() {
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") != nullptr) return;
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "trim_threshold") != nullptr) return;
  mallopt(M_TRIM_THRESHOLD, kReceiveHeapTrimBytes);
}

}  // namespace anchorserve
