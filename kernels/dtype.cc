#include "kernels/dtype.h"

#include <algorithm>
#include <cmath>

namespace anchorserve {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return "bf16";
    case DType::kFp16:
      return "fp16";
    case DType::kFp32:
      return "fp32";
  }
  return "unknown";
}

absl::string_view SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return "BF16";
    case DType::kFp16:
      return "F16";
    case DType::kFp32:
      return "F32";
  }
  return "unknown";
}

float Fp16ToFloat(uint16_t bits) {
  const uint32_t sign = uint32_t{bits & 0x8000u} << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else {
    out = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &out, sizeof(value));
  return value;
}

uint16_t FloatToFp16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs_bits < 0x38800000u) {                        // below 2^-14: subnormal or zero
    const float magnitude = std::fabs(value);
    // nearbyint rounds half to even in the default rounding mode.
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));
  }
  const uint32_t mantissa = abs_bits & 0x7fffffu;
  uint32_t half = ((abs_bits >> 23) - 112) << 10 | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

void ConvertToFloat(const void* src, DType dtype, size_t count, float* dst) {
  switch (dtype) {
    case DType::kFp32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::kBf16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(in[i]);
      return;
    }
    case DType::kFp16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = Fp16ToFloat(in[i]);
      return;
    }
  }
}

void ConvertFromFloat(const float* src, size_t count, DType dtype, void* dst) {
  switch (dtype) {
    case DType::kFp32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::kBf16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = FloatToBf16(src[i]);
      return;
    }
    case DType::kFp16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = FloatToFp16(src[i]);
      return;
    }
  }
}

void RoundThrough(DType dtype, float* values, size_t count) {
  switch (dtype) {
    case DType::kFp32:
      return;
    case DType::kBf16:
      for (size_t i = 0; i < count; ++i) values[i] = Bf16ToFloat(FloatToBf16(values[i]));
      return;
    case DType::kFp16:
      for (size_t i = 0; i < count; ++i) values[i] = Fp16ToFloat(FloatToFp16(values[i]));
      return;
  }
}

namespace {

// Bits of `Word` that are all ones exactly in NaN and infinity; scanned in blocks so that the
// inner loop has no early exit (and vectorizes), the exact index is found in the block that hit.
template <typename Word, Word kExponentMask>
int64_t FirstNonFiniteOf(const void* data, int64_t count) {
  constexpr int64_t kBlock = 1024;
  const char* bytes = static_cast<const char*>(data);
  auto word_at = [bytes](int64_t i) {
    Word word;
    std::memcpy(&word, bytes + i * static_cast<int64_t>(sizeof(Word)), sizeof(Word));
    return word;
  };
  for (int64_t begin = 0; begin < count; begin += kBlock) {
    const int64_t end = std::min(count, begin + kBlock);
    // A sum rather than an early exit or a bool: the loop the compiler turns into vector code.
    uint32_t hits = 0;
    for (int64_t i = begin; i < end; ++i) hits += (word_at(i) & kExponentMask) == kExponentMask;
    if (hits == 0) continue;
    for (int64_t i = begin; i < end; ++i) {
      if ((word_at(i) & kExponentMask) == kExponentMask) return i;
    }
  }
  return -1;
}

}  // namespace

int64_t FirstNonFinite(const void* data, DType dtype, int64_t count) {
  switch (dtype) {
    case DType::kBf16:
      return FirstNonFiniteOf<uint16_t, 0x7f80u>(data, count);
    case DType::kFp16:
      return FirstNonFiniteOf<uint16_t, 0x7c00u>(data, count);
    case DType::kFp32:
      return FirstNonFiniteOf<uint32_t, 0x7f800000u>(data, count);
  }
  return -1;
}

}  // namespace anchorserve
