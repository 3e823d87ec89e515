#include "client/npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace anchorserve {
namespace {

constexpr absl::string_view kMagic = "\x93NUMPY";
constexpr size_t kPreludeV1 = 10;  // magic(6) + version(2) + header_len(2)
constexpr size_t kPreludeV2 = 12;  // magic(6) + version(2) + header_len(4)

absl::string_view DescrFor(DType dtype) {
  switch (dtype) {
    case DType::kFp32:
      return "<f4";
    case DType::kFp16:
      return "<f2";
    case DType::kBf16:
      return "<u2";
  }
  return "";
}

absl::Status Malformed(absl::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": not a valid .npy file: ", what));
}

// Finds `'key':` in a Python dict literal and returns the text after the colon.
absl::StatusOr<absl::string_view> ValueAfterKey(absl::string_view dict, absl::string_view key,
                                                absl::string_view source) {
  for (const char quote : {'\'', '"'}) {
    const std::string quoted = absl::StrCat(std::string(1, quote), key, std::string(1, quote));
    const size_t at = dict.find(quoted);
    if (at == absl::string_view::npos) continue;
    absl::string_view rest = absl::StripLeadingAsciiWhitespace(dict.substr(at + quoted.size()));
    if (!absl::ConsumePrefix(&rest, ":")) break;
    return absl::StripLeadingAsciiWhitespace(rest);
  }
  return Malformed(source, absl::StrCat("header has no '", key, "' entry"));
}

absl::StatusOr<std::string> ParseQuotedString(absl::string_view text, absl::string_view source) {
  if (text.empty() || (text[0] != '\'' && text[0] != '"')) {
    return Malformed(source, "'descr' is not a string");
  }
  const size_t end = text.find(text[0], 1);
  if (end == absl::string_view::npos) return Malformed(source, "unterminated 'descr' string");
  return std::string(text.substr(1, end - 1));
}

absl::StatusOr<std::vector<int64_t>> ParseShapeTuple(absl::string_view text,
                                                     absl::string_view source) {
  if (!absl::ConsumePrefix(&text, "(")) return Malformed(source, "'shape' is not a tuple");
  const size_t close = text.find(')');
  if (close == absl::string_view::npos) return Malformed(source, "unterminated 'shape' tuple");
  std::vector<int64_t> shape;
  for (absl::string_view item : absl::StrSplit(text.substr(0, close), ',')) {
    item = absl::StripAsciiWhitespace(item);
    if (item.empty()) continue;       // "(5,)" and trailing commas
    absl::ConsumeSuffix(&item, "L");  // Python 2 longs
    int64_t dim = 0;
    if (!absl::SimpleAtoi(item, &dim) || dim < 0) {
      return Malformed(source, absl::StrCat("bad dimension '", item, "' in 'shape'"));
    }
    shape.push_back(dim);
  }
  return shape;
}

}  // namespace

absl::StatusOr<NpyArray> ParseNpy(absl::string_view file, absl::string_view source) {
  if (file.size() < kPreludeV1 || file.substr(0, kMagic.size()) != kMagic) {
    return Malformed(source, "missing the \\x93NUMPY magic");
  }
  const auto major = static_cast<uint8_t>(file[6]);
  size_t header_len = 0;
  size_t prelude = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(file[8]) | (size_t{static_cast<uint8_t>(file[9])} << 8);
    prelude = kPreludeV1;
  } else if (major == 2 || major == 3) {
    if (file.size() < kPreludeV2) return Malformed(source, "truncated header length");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= size_t{static_cast<uint8_t>(file[8 + i])} << (8 * i);
    prelude = kPreludeV2;
  } else {
    return Malformed(source, absl::StrCat("unsupported format version ", int{major}, ".",
                                          int{static_cast<uint8_t>(file[7])}));
  }
  if (header_len > file.size() - prelude) {
    return Malformed(source, absl::StrCat("header claims ", header_len, " bytes but the file has ",
                                          file.size() - prelude, " after the prelude"));
  }
  const absl::string_view dict = file.substr(prelude, header_len);

  absl::StatusOr<absl::string_view> descr_text = ValueAfterKey(dict, "descr", source);
  if (!descr_text.ok()) return descr_text.status();
  absl::StatusOr<std::string> descr = ParseQuotedString(*descr_text, source);
  if (!descr.ok()) return descr.status();
  absl::StatusOr<absl::string_view> fortran_text = ValueAfterKey(dict, "fortran_order", source);
  if (!fortran_text.ok()) return fortran_text.status();
  absl::StatusOr<absl::string_view> shape_text = ValueAfterKey(dict, "shape", source);
  if (!shape_text.ok()) return shape_text.status();
  absl::StatusOr<std::vector<int64_t>> shape = ParseShapeTuple(*shape_text, source);
  if (!shape.ok()) return shape.status();

  NpyArray array;
  if (*descr == "<f4") {
    array.dtype = DType::kFp32;
  } else if (*descr == "<f2") {
    array.dtype = DType::kFp16;
  } else if (*descr == "<u2") {
    array.dtype = DType::kBf16;
  } else if (*descr == ">f4" || *descr == ">f2" || *descr == ">u2") {
    return absl::InvalidArgumentError(absl::StrCat(source, ": big-endian data ('", *descr,
                                                   "') is not supported; save it little-endian"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": element type '", *descr,
        "' is not supported (expected '<f4' fp32, '<f2' fp16 or '<u2' raw bf16 bits)"));
  }
  if (absl::StartsWith(*fortran_text, "True")) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": Fortran-ordered arrays are not supported; save in C order"));
  }
  if (!absl::StartsWith(*fortran_text, "False")) {
    return Malformed(source, "'fortran_order' is neither True nor False");
  }

  uint64_t count = 1;
  for (int64_t dim : *shape) {
    if (dim != 0 &&
        count > std::numeric_limits<uint64_t>::max() / 16 / static_cast<uint64_t>(dim)) {
      return Malformed(source, "shape is too large");
    }
    count *= static_cast<uint64_t>(dim);
  }
  const uint64_t data_bytes = count * ElementSize(array.dtype);
  const size_t data_offset = prelude + header_len;
  if (file.size() - data_offset != data_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": holds ", file.size() - data_offset, " data bytes but shape (",
                     absl::StrJoin(*shape, ", "), ") of '", *descr, "' needs ", data_bytes));
  }
  array.shape = *std::move(shape);
  array.data.assign(file.begin() + data_offset, file.end());
  return array;
}

absl::StatusOr<std::string> MakeNpyHeader(DType dtype, absl::Span<const int64_t> shape) {
  std::string shape_text = absl::StrJoin(shape, ", ");
  if (shape.size() == 1) shape_text += ",";
  std::string dict = absl::StrCat("{'descr': '", DescrFor(dtype),
                                  "', 'fortran_order': False, 'shape': (", shape_text, "), }");
  // NumPy pads with spaces and a final newline so the data starts 64-byte aligned.
  constexpr size_t kAlign = 64;
  size_t prelude = kPreludeV1;
  size_t total = prelude + dict.size() + 1;
  size_t padded = (total + kAlign - 1) / kAlign * kAlign;
  uint8_t major = 1;
  if (padded - prelude > 0xffff) {
    major = 2;
    prelude = kPreludeV2;
    total = prelude + dict.size() + 1;
    padded = (total + kAlign - 1) / kAlign * kAlign;
  }
  dict.append(padded - total, ' ');
  dict.push_back('\n');
  const size_t header_len = dict.size();
  std::string header(kMagic);
  header.push_back(static_cast<char>(major));
  header.push_back(0);
  const int length_bytes = major == 1 ? 2 : 4;
  for (int i = 0; i < length_bytes; ++i) {
    header.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  }
  header += dict;
  return header;
}

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) return absl::InternalError(absl::StrCat("cannot read the size of ", path));
  in.seekg(0, std::ios::beg);
  std::string bytes(static_cast<size_t>(size), '\0');
  if (!in.read(bytes.data(), size)) {
    return absl::InternalError(absl::StrCat("cannot read ", path));
  }
  return ParseNpy(bytes, path);
}

absl::Status WriteNpyFile(const std::string& path, DType dtype, absl::Span<const int64_t> shape,
                          absl::Span<const uint8_t> data) {
  uint64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return absl::InvalidArgumentError("npy shape dims must be non-negative");
    count *= static_cast<uint64_t>(dim);
  }
  if (count * ElementSize(dtype) != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "npy data has ", data.size(), " bytes, shape needs ", count * ElementSize(dtype)));
  }
  absl::StatusOr<std::string> header = MakeNpyHeader(dtype, shape);
  if (!header.ok()) return header.status();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  }
  out.write(header->data(), static_cast<std::streamsize>(header->size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("writing ", path, " failed"));
  return absl::OkStatus();
}

absl::StatusOr<HostTensor> ReadTensorNpy(const std::string& path, Layout layout) {
  absl::StatusOr<NpyArray> array = ReadNpyFile(path);
  if (!array.ok()) return array.status();
  if (array->shape.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": expected a 3-D array ([seq_len, heads, head_dim] or [heads, seq_len, head_dim]), "
        "got shape (",
        absl::StrJoin(array->shape, ", "), ")"));
  }
  HostTensor tensor;
  tensor.dtype = array->dtype;
  tensor.layout = layout;
  for (int i = 0; i < 3; ++i) {
    if (array->shape[i] == 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": dimension ", i, " is 0"));
    }
    tensor.shape[i] = array->shape[i];
  }
  tensor.bytes = std::move(array->data);
  return tensor;
}

absl::Status WriteTensorNpy(const std::string& path, const HostTensor& tensor) {
  return WriteNpyFile(path, tensor.dtype, tensor.shape, tensor.bytes);
}

}  // namespace anchorserve
