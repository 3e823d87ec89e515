// Element types of the service and host-side conversions between them and fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/strings/string_view.h"

namespace anchorserve {

enum class DType { kBf16, kFp16, kFp32 };

constexpr size_t ElementSize(DType dtype) { return dtype == DType::kFp32 ? 4 : 2; }
std::string_view DTypeName(DType dtype);
// The safetensors format's name of the element type: "BF16", "F16" or "F32" (the model loader
// reads it, the client's KV writer writes it).
absl::string_view SafetensorsDTypeName(DType dtype);

// bf16: upper half of an fp32; rounding to nearest even, NaN kept quiet.
inline float Bf16ToFloat(uint16_t bits) {
  uint32_t wide = uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float Fp16ToFloat(uint16_t bits);
uint16_t FloatToFp16(float value);  // round to nearest even, overflow to inf

// Converts `count` elements; `src`/`dst` hold elements of `dtype`.
void ConvertToFloat(const void* src, DType dtype, size_t count, float* dst);
void ConvertFromFloat(const float* src, size_t count, DType dtype, void* dst);

// Rounds fp32 values through `dtype` and back (what storing them in that dtype does).
void RoundThrough(DType dtype, float* values, size_t count);

// Index of the first NaN or infinity among `count` elements of `dtype` at `data` (any
// alignment), or -1 when all are finite. A branch-free pass over the exponent bits that the
// compiler vectorizes: a few GB/s on one core.
int64_t FirstNonFinite(const void* data, DType dtype, int64_t count);

}  // namespace anchorserve
