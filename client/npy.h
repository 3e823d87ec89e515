// Reading and writing NumPy .npy files holding one 3-D attention tensor.
//
// Supported: format versions 1.0, 2.0 and 3.0; C order; little-endian element types
//   '<f4' -> fp32, '<f2' -> fp16, '<u2' -> bf16 (convention: NumPy has no bfloat16, so bf16
//   tensors are stored as their raw 16-bit patterns in uint16;
//   `np.load(f).view(ml_dtypes.bfloat16)` or
//   `torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)` reads them back).
// The file carries no layout: the caller says whether the shape is token- or head-major.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "client/host_tensor.h"
#include "kernels/dtype.h"

namespace anchorserve {

struct NpyArray {
  DType dtype = DType::kFp32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // product(shape) elements, little-endian, C order
};

// Parses a whole .npy file image; `source` names it in error messages.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view file_bytes, absl::string_view source = "npy");

// The header (magic, version, length, dict, padding) for an array; data follows it directly.
absl::StatusOr<std::string> MakeNpyHeader(DType dtype, absl::Span<const int64_t> shape);

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path);
absl::Status WriteNpyFile(const std::string& path, DType dtype, absl::Span<const int64_t> shape,
                          absl::Span<const uint8_t> data);

// A 3-D tensor file whose shape is ordered as `layout` says.
absl::StatusOr<HostTensor> ReadTensorNpy(const std::string& path, Layout layout);
absl::Status WriteTensorNpy(const std::string& path, const HostTensor& tensor);

}  // namespace anchorserve
