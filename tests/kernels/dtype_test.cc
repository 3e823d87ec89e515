// bf16 / fp16 <-> fp32 conversions of kernels/dtype.h, checked exhaustively where possible.
#include "kernels/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace anchorserve {
namespace {

uint32_t Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float FromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(ElementSize(DType::kBf16), 2u);
  EXPECT_EQ(ElementSize(DType::kFp16), 2u);
  EXPECT_EQ(ElementSize(DType::kFp32), 4u);
  EXPECT_EQ(DTypeName(DType::kBf16), "bf16");
  EXPECT_EQ(DTypeName(DType::kFp16), "fp16");
  EXPECT_EQ(DTypeName(DType::kFp32), "fp32");
  EXPECT_EQ(SafetensorsDTypeName(DType::kBf16), "BF16");
  EXPECT_EQ(SafetensorsDTypeName(DType::kFp16), "F16");
  EXPECT_EQ(SafetensorsDTypeName(DType::kFp32), "F32");
}

TEST(Bf16Test, EveryPatternRoundTrips) {
  for (uint32_t pattern = 0; pattern <= 0xffff; ++pattern) {
    const uint16_t bits = static_cast<uint16_t>(pattern);
    const float value = Bf16ToFloat(bits);
    EXPECT_EQ(Bits(value), uint32_t{bits} << 16);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(value)))) << std::hex << pattern;
    } else {
      EXPECT_EQ(FloatToBf16(value), bits) << std::hex << pattern;
    }
  }
}

// Between two neighbouring bf16 values a < b: the exact midpoint goes to the one with an even
// mantissa, anything above it to b, anything below to a.
TEST(Bf16Test, RoundsToNearestEven) {
  for (uint32_t pattern = 0; pattern < 0x7f7f; ++pattern) {  // positive finite, b finite
    const uint16_t a_bits = static_cast<uint16_t>(pattern);
    const uint16_t b_bits = static_cast<uint16_t>(pattern + 1);
    const float a = Bf16ToFloat(a_bits);
    const float b = Bf16ToFloat(b_bits);
    const float mid = FromBits((Bits(a) + Bits(b)) / 2);  // exact: one more mantissa bit
    ASSERT_GT(mid, a);
    ASSERT_LT(mid, b);
    EXPECT_EQ(FloatToBf16(mid), (a_bits & 1) ? b_bits : a_bits) << std::hex << pattern;
    EXPECT_EQ(FloatToBf16(std::nextafter(mid, b)), b_bits) << std::hex << pattern;
    EXPECT_EQ(FloatToBf16(std::nextafter(mid, a)), a_bits) << std::hex << pattern;
    EXPECT_EQ(FloatToBf16(-mid), ((a_bits & 1) ? b_bits : a_bits) | 0x8000u);
  }
}

TEST(Bf16Test, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToBf16(inf), 0x7f80);
  EXPECT_EQ(FloatToBf16(-inf), 0xff80);
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // FLT_MAX lies above the midpoint between the largest bf16 and 2^128: rounds to inf.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
  // A signalling NaN whose payload sits in the dropped low bits must stay NaN (not become inf).
  const uint16_t from_snan = FloatToBf16(FromBits(0x7f800001u));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(from_snan)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  // fp32 subnormals keep bf16 precision (bf16 has the fp32 exponent range).
  const float subnormal = FromBits(0x00012345u);
  EXPECT_EQ(FloatToBf16(subnormal), 0x0001);
  EXPECT_EQ(Bf16ToFloat(0x0001), FromBits(0x00010000u));
}

TEST(Fp16Test, EveryPatternRoundTrips) {
  for (uint32_t pattern = 0; pattern <= 0xffff; ++pattern) {
    const uint16_t bits = static_cast<uint16_t>(pattern);
    const float value = Fp16ToFloat(bits);
    const bool is_nan = (bits & 0x7c00u) == 0x7c00u && (bits & 0x03ffu) != 0;
    EXPECT_EQ(std::isnan(value), is_nan) << std::hex << pattern;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(value))));
    } else {
      EXPECT_EQ(FloatToFp16(value), bits) << std::hex << pattern;
    }
  }
}

TEST(Fp16Test, DecodesKnownValues) {
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(Fp16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(Fp16ToFloat(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(Fp16ToFloat(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(Fp16ToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(Fp16ToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(Fp16ToFloat(0x8000)));
}

TEST(Fp16Test, RoundsToNearestEvenIncludingSubnormals) {
  for (uint32_t pattern = 0; pattern < 0x7bff; ++pattern) {  // positive finite, b finite
    const uint16_t a_bits = static_cast<uint16_t>(pattern);
    const uint16_t b_bits = static_cast<uint16_t>(pattern + 1);
    const float a = Fp16ToFloat(a_bits);
    const float b = Fp16ToFloat(b_bits);
    const float mid = 0.5f * (a + b);  // exact in fp32
    ASSERT_GT(mid, a);
    ASSERT_LT(mid, b);
    EXPECT_EQ(FloatToFp16(mid), (a_bits & 1) ? b_bits : a_bits) << std::hex << pattern;
    EXPECT_EQ(FloatToFp16(std::nextafter(mid, b)), b_bits) << std::hex << pattern;
    EXPECT_EQ(FloatToFp16(std::nextafter(mid, a)), a_bits) << std::hex << pattern;
  }
}

TEST(Fp16Test, OverflowUnderflowAndSpecials) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(65519.99f), 0x7bff);  // below the midpoint to 65536
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);   // the midpoint rounds to even: inf
  EXPECT_EQ(FloatToFp16(1e10f), 0x7c00);
  EXPECT_EQ(FloatToFp16(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToFp16(inf), 0x7c00);
  EXPECT_EQ(FloatToFp16(-inf), 0xfc00);
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -25)), 0x0000);         // midpoint 0 / 2^-24: even
  EXPECT_EQ(FloatToFp16(std::ldexp(1.5f, -25)), 0x0001);         // above it
  EXPECT_EQ(FloatToFp16(std::ldexp(3.0f, -25)), 0x0002);         // midpoint 1 / 2: even
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -30)), 0x0000);         // far below: zero
  EXPECT_EQ(FloatToFp16(-std::ldexp(1.0f, -30)), 0x8000);        // signed zero
  EXPECT_EQ(FloatToFp16(std::ldexp(2047.0f, -25)), 0x0400);      // rounds up into the normals
  EXPECT_EQ(FloatToFp16(2.0f - std::ldexp(1.0f, -11)), 0x4000);  // mantissa carry
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(FromBits(0x7f800001u)))));
}

TEST(ConvertTest, ArraysAndRoundThrough) {
  const std::vector<float> values = {0.0f, 1.0f, -1.5f, 3.14159f, 1e-6f, 65504.0f, 1e5f};
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    std::vector<uint8_t> bytes(values.size() * ElementSize(dtype));
    ConvertFromFloat(values.data(), values.size(), dtype, bytes.data());
    std::vector<float> back(values.size());
    ConvertToFloat(bytes.data(), dtype, values.size(), back.data());
    std::vector<float> rounded = values;
    RoundThrough(dtype, rounded.data(), rounded.size());
    for (size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(back[i], rounded[i]) << DTypeName(dtype) << " " << values[i];
      if (dtype == DType::kFp32) {
        EXPECT_EQ(back[i], values[i]);
      } else if (dtype == DType::kBf16) {
        EXPECT_EQ(back[i], Bf16ToFloat(FloatToBf16(values[i])));
      } else {
        EXPECT_EQ(back[i], Fp16ToFloat(FloatToFp16(values[i])));
      }
    }
  }
  float pi = 3.14159265f;
  RoundThrough(DType::kBf16, &pi, 1);
  EXPECT_EQ(pi, 3.140625f);
}

// Every bf16 and fp16 pattern: FirstNonFinite flags exactly the NaNs and infinities, at any
// position within and across its scan blocks.
TEST(FirstNonFiniteTest, FlagsExactlyNanAndInfinityInEveryPattern) {
  for (DType dtype : {DType::kBf16, DType::kFp16}) {
    for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
      const uint16_t pattern = static_cast<uint16_t>(bits);
      const float value = dtype == DType::kBf16 ? Bf16ToFloat(pattern) : Fp16ToFloat(pattern);
      ASSERT_EQ(FirstNonFinite(&pattern, dtype, 1), std::isfinite(value) ? -1 : 0)
          << DTypeName(dtype) << " 0x" << std::hex << bits;
    }
  }
  for (float value :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(FirstNonFinite(&value, DType::kFp32, 1), 0);
  }
  const float largest = std::numeric_limits<float>::max();
  EXPECT_EQ(FirstNonFinite(&largest, DType::kFp32, 1), -1);
}

TEST(FirstNonFiniteTest, ReportsTheFirstIndexAtAnyAlignment) {
  for (int64_t position : {0, 1, 1023, 1024, 1025, 4999}) {
    std::vector<char> storage(5000 * 4 + 1, 0);
    float* values = reinterpret_cast<float*>(storage.data() + 1);  // unaligned on purpose
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(reinterpret_cast<char*>(values) + position * 4, &nan, 4);
    if (position + 7 < 5000) {
      std::memcpy(reinterpret_cast<char*>(values) + (position + 7) * 4, &nan, 4);
    }
    EXPECT_EQ(FirstNonFinite(values, DType::kFp32, 5000), position);
    EXPECT_EQ(FirstNonFinite(values, DType::kFp32, position), -1);
  }
  EXPECT_EQ(FirstNonFinite(nullptr, DType::kBf16, 0), -1);
}

}  // namespace
}  // namespace anchorserve
