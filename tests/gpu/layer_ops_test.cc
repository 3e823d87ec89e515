// The prefill engine's building blocks against fp64 host references written here (not the
// kernels' code): the elementwise kernels of kernels/cuda/layer_ops.h and the cuBLASLt GemmRunner
// of kernels/cuda/gemm.h.
//
// Every output is poisoned with NaN (all bytes 0xFF: bf16/fp16 0xFFFF, fp32 0xFFFFFFFF) before
// the run and every element is checked (NaN fails); guard elements before and after each tensor
// must come back unchanged. Each op also runs on tensors shifted by one element, which takes the
// scalar (unvectorized) paths. Tolerances: the fp32 arithmetic's error bound plus half an ulp of
// the output type at the exact (fp64) result. The kernel tests skip without a CUDA device; the
// argument checks need none.
#include "kernels/cuda/layer_ops.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/gemm.h"
#include "kernels/dtype.h"

namespace anchorserve::cuda {
namespace {

#define SKIP_WITHOUT_CUDA_DEVICE()                                        \
  do {                                                                    \
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (false)

#define ASSERT_CUDA_OK(expr)                                           \
  do {                                                                 \
    const cudaError_t layer_ops_test_error_ = (expr);                  \
    ASSERT_EQ(layer_ops_test_error_, cudaSuccess)                      \
        << #expr << ": " << cudaGetErrorString(layer_ops_test_error_); \
  } while (false)

constexpr double kUnitFp32 = 0x1p-24;  // fp32 unit roundoff
constexpr int64_t kGuard = 64;         // guard elements after each tensor
constexpr int kOffsets[] = {0, 1};     // elements before each tensor (1: unaligned)

// ---------------------------------------------------------------------------------------------
// Host helpers.

float Bf16Value(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Round to nearest even to bf16, written independently of kernels/dtype.h: the two bf16
// neighbours of `value` and the nearer one (ties to the even bit pattern). Not for NaN.
uint16_t ReferenceBf16(float value) {
  const uint32_t bits = FloatBits(value);
  const auto lower = static_cast<uint16_t>(bits >> 16);  // toward zero
  if ((bits & 0xffffu) == 0) return lower;
  const auto upper = static_cast<uint16_t>(lower + 1);  // away from zero (0x7f80: infinity)
  const double magnitude = std::abs(static_cast<double>(value));
  const double low = std::abs(static_cast<double>(Bf16Value(lower)));
  const double high =
      (upper & 0x7fffu) == 0x7f80u ? std::ldexp(1.0, 128) : std::abs(double{Bf16Value(upper)});
  if (magnitude - low < high - magnitude) return lower;
  if (magnitude - low > high - magnitude) return upper;
  return (lower & 1u) == 0 ? lower : upper;
}

// Half the spacing of bf16 (8 significant bits) / fp32 (24) values in the binade of
// `magnitude`: the rounding error bound of a value of at most that magnitude.
double HalfUlpBf16(double magnitude) {
  if (!(magnitude >= 0x1p-126)) return 0x1p-134;  // subnormal spacing 2^-133
  int exponent = 0;
  std::frexp(magnitude, &exponent);
  return std::ldexp(1.0, exponent - 1 - 8);
}

double HalfUlpFp32(double magnitude) {
  if (!(magnitude >= 0x1p-126)) return 0x1p-150;
  int exponent = 0;
  std::frexp(magnitude, &exponent);
  return std::ldexp(1.0, exponent - 1 - 24);
}

// A bf16 result computed with an error of at most `pre_error` before its one rounding.
double Bf16Tolerance(double exact, double pre_error) {
  return pre_error + HalfUlpBf16(std::abs(exact) + pre_error);
}

std::vector<uint16_t> RandomBf16(size_t count, double lo, double hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<uint16_t> values(count);
  for (uint16_t& v : values) v = FloatToBf16(static_cast<float>(dist(rng)));
  return values;
}

// Checks elements one by one; reports the first few failures and the count. NaN fails.
class Checker {
 public:
  explicit Checker(std::string what) : what_(std::move(what)) {}
  Checker(const Checker&) = delete;
  Checker& operator=(const Checker&) = delete;
  ~Checker() {
    if (failures_ > 0) {
      ADD_FAILURE() << what_ << ": " << failures_ << " of " << checked_ << " elements wrong";
    }
  }

  void Near(double got, double want, double tolerance, int64_t index) {
    ++checked_;
    if (std::abs(got - want) <= tolerance) return;
    if (failures_++ < 8) {
      ADD_FAILURE() << std::setprecision(10) << what_ << " [" << index << "]: got " << got
                    << ", want " << want << " +- " << tolerance;
    }
  }

  void Bits(uint32_t got, uint32_t want, int64_t index) {
    ++checked_;
    if (got == want) return;
    if (failures_++ < 8) {
      ADD_FAILURE() << what_ << " [" << index << "]: got bits 0x" << std::hex << got << ", want 0x"
                    << want << std::dec;
    }
  }

  int64_t checked() const { return checked_; }

 private:
  std::string what_;
  int64_t checked_ = 0;
  int64_t failures_ = 0;
};

// A device buffer of `offset` leading elements, the tensor, and kGuard trailing elements.
template <typename T>
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  ~DeviceTensor() {
    if (base_ != nullptr) cudaFree(base_);
  }

  // The tensor holds `values`; the frame elements hold `frame`.
  cudaError_t Init(const std::vector<T>& values, int offset, T frame) {
    host_.assign(static_cast<size_t>(offset) + values.size() + kGuard, frame);
    std::copy(values.begin(), values.end(), host_.begin() + offset);
    return Alloc(offset, values.size());
  }

  // `count` elements, all bytes 0xFF (NaN poison), frame included.
  cudaError_t InitPoisoned(int64_t count, int offset) {
    host_.resize(static_cast<size_t>(offset + count + kGuard));
    std::memset(static_cast<void*>(host_.data()), 0xff, host_.size() * sizeof(T));
    return Alloc(offset, static_cast<size_t>(count));
  }

  // Writes the initial contents again (re-poisons an output).
  cudaError_t Reset() {
    return cudaMemcpy(base_, host_.data(), host_.size() * sizeof(T), cudaMemcpyHostToDevice);
  }

  T* get() const { return base_ + offset_; }
  const std::vector<T>& initial() const { return host_; }

  // The tensor's elements after a run; the frame must equal its initial contents.
  cudaError_t Read(std::vector<T>* values, bool* frame_intact) const {
    std::vector<T> all(host_.size());
    const cudaError_t error =
        cudaMemcpy(all.data(), base_, all.size() * sizeof(T), cudaMemcpyDeviceToHost);
    if (error != cudaSuccess) return error;
    values->assign(all.begin() + offset_, all.begin() + offset_ + count_);
    *frame_intact = std::memcmp(all.data(), host_.data(), offset_ * sizeof(T)) == 0 &&
                    std::memcmp(all.data() + offset_ + count_, host_.data() + offset_ + count_,
                                (all.size() - offset_ - count_) * sizeof(T)) == 0;
    return cudaSuccess;
  }

 private:
  cudaError_t Alloc(int offset, size_t count) {
    offset_ = static_cast<size_t>(offset);
    count_ = count;
    void* base = nullptr;
    const cudaError_t error = cudaMalloc(&base, host_.size() * sizeof(T));
    if (error != cudaSuccess) return error;
    base_ = static_cast<T*>(base);
    return Reset();
  }

  T* base_ = nullptr;
  size_t offset_ = 0;
  size_t count_ = 0;
  std::vector<T> host_;
};

// Reads `tensor` into `values` and expects its frame unchanged.
template <typename T>
void ReadBack(const DeviceTensor<T>& tensor, std::vector<T>* values) {
  bool frame_intact = false;
  ASSERT_CUDA_OK(tensor.Read(values, &frame_intact));
  EXPECT_TRUE(frame_intact) << "elements before or after the tensor were written";
}

std::string RowsName(const testing::TestParamInfo<std::tuple<int64_t, int>>& info) {
  return absl::StrCat("n", std::get<0>(info.param), "_h", std::get<1>(info.param));
}

// (n, h): h = 4096 and 100 vectorize with 4 but 100 not with 8; 13 with nothing.
class RowOpsTest : public testing::TestWithParam<std::tuple<int64_t, int>> {};

INSTANTIATE_TEST_SUITE_P(Shapes, RowOpsTest,
                         testing::Combine(testing::Values(int64_t{1}, int64_t{37}),
                                          testing::Values(4096, 100, 13)),
                         RowsName);

// ---------------------------------------------------------------------------------------------
// Embedding gather: exact.

TEST_P(RowOpsTest, EmbeddingGather) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto [n, h] = GetParam();
  std::mt19937_64 rng(101 + n * 131 + h);
  constexpr int kVocab = 257;
  const std::vector<uint16_t> table = RandomBf16(size_t{kVocab} * h, -2.0, 2.0, rng);
  std::uniform_int_distribution<int32_t> pick(0, kVocab - 1);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = pick(rng);
  ids[0] = kVocab - 1;
  if (n > 2) ids[n - 1] = 0;
  if (n > 3) ids[1] = ids[2];  // a repeated token

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<uint16_t> d_table;
    DeviceTensor<int32_t> d_ids;
    DeviceTensor<float> d_x;
    ASSERT_CUDA_OK(d_table.Init(table, offset, 0));
    ASSERT_CUDA_OK(d_ids.Init(ids, offset, -1));
    ASSERT_CUDA_OK(d_x.InitPoisoned(n * h, offset));
    ASSERT_CUDA_OK(LaunchEmbeddingGather(d_ids.get(), n, d_table.get(), h, d_x.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> x;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_x, &x));
    Checker check("embedding");
    for (int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < h; ++j) {
        check.Bits(FloatBits(x[t * h + j]), FloatBits(Bf16Value(table[int64_t{ids[t]} * h + j])),
                   t * h + j);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = bf16(w * bf16(x * r)), r = 1 / sqrt(mean(x^2) + eps).

constexpr float kRmsEps = 1e-6f;

// Rows of different magnitudes, values in (-1, 1) times 10^[-2, 2].
std::vector<float> RandomRows(int64_t n, int h, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  std::uniform_real_distribution<double> log_scale(-2.0, 2.0);
  std::vector<float> x(static_cast<size_t>(n) * h);
  for (int64_t t = 0; t < n; ++t) {
    const double scale = std::pow(10.0, log_scale(rng));
    for (int j = 0; j < h; ++j) x[t * h + j] = static_cast<float>(unit(rng) * scale);
  }
  return x;
}

// Checks y against an fp64 RMSNorm of x (kRmsEps) with the weight w.
void CheckRmsNorm(const std::vector<float>& x, int64_t n, int h, const std::vector<uint16_t>& w,
                  const std::vector<uint16_t>& y, Checker* check) {
  // fp32: the sum of squares (<= (h + 1) u relative, positive terms), the mean, + eps, sqrt and
  // the division give r within (h + 8) u; x * r one more u.
  const double r_error = (h + 8) * kUnitFp32;
  for (int64_t t = 0; t < n; ++t) {
    double sum = 0;
    for (int j = 0; j < h; ++j) sum += double{x[t * h + j]} * x[t * h + j];
    const double r = 1.0 / std::sqrt(sum / h + double{kRmsEps});
    for (int j = 0; j < h; ++j) {
      const double z = x[t * h + j] * r;
      const double weight = Bf16Value(w[j]);
      const double z_error = std::abs(z) * (r_error + 2 * kUnitFp32);
      // bf16(z) then the exact product with the weight, rounded once.
      const double pre_error = std::abs(weight) * (z_error + HalfUlpBf16(std::abs(z) + z_error));
      check->Near(Bf16Value(y[t * h + j]), weight * z, Bf16Tolerance(weight * z, pre_error),
                  t * h + j);
    }
  }
}

TEST_P(RowOpsTest, RmsNorm) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto [n, h] = GetParam();
  std::mt19937_64 rng(202 + n * 131 + h);
  const std::vector<float> x = RandomRows(n, h, rng);
  const std::vector<uint16_t> w = RandomBf16(h, -1.5, 1.5, rng);
  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<float> d_x;
    DeviceTensor<uint16_t> d_w;
    DeviceTensor<uint16_t> d_y;
    ASSERT_CUDA_OK(d_x.Init(x, offset, 0.0f));
    ASSERT_CUDA_OK(d_w.Init(w, offset, 0));
    ASSERT_CUDA_OK(d_y.InitPoisoned(n * h, offset));
    ASSERT_CUDA_OK(LaunchRmsNorm(d_x.get(), n, h, d_w.get(), kRmsEps, d_y.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> y;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_y, &y));
    Checker check("rmsnorm");
    CheckRmsNorm(x, n, h, w, y, &check);
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add fused with the RMSNorm after it: x += add (fp32), y = RMSNorm(x); the bits of the
// two launches it replaces.

TEST_P(RowOpsTest, ResidualAddRmsNorm) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto [n, h] = GetParam();
  std::mt19937_64 rng(252 + n * 131 + h);
  const std::vector<float> x = RandomRows(n, h, rng);
  const std::vector<uint16_t> add = RandomBf16(x.size(), -4.0, 4.0, rng);
  const std::vector<uint16_t> w = RandomBf16(h, -1.5, 1.5, rng);
  // fp32 addition is correctly rounded on both sides.
  std::vector<float> sum(x.size());
  for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + static_cast<float>(Bf16Value(add[i]));

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<float> d_x, d_x_unfused;
    DeviceTensor<uint16_t> d_add, d_w, d_y, d_y_unfused;
    ASSERT_CUDA_OK(d_x.Init(x, offset, 12345.0f));
    ASSERT_CUDA_OK(d_x_unfused.Init(x, offset, 12345.0f));
    ASSERT_CUDA_OK(d_add.Init(add, offset, 0x3f80));
    ASSERT_CUDA_OK(d_w.Init(w, offset, 0));
    ASSERT_CUDA_OK(d_y.InitPoisoned(n * h, offset));
    ASSERT_CUDA_OK(d_y_unfused.InitPoisoned(n * h, offset));
    ASSERT_CUDA_OK(LaunchResidualAddRmsNorm(d_x.get(), d_add.get(), n, h, d_w.get(), kRmsEps,
                                            d_y.get(), nullptr));
    ASSERT_CUDA_OK(LaunchResidualAdd(d_x_unfused.get(), d_add.get(), n, h, nullptr));
    ASSERT_CUDA_OK(
        LaunchRmsNorm(d_x_unfused.get(), n, h, d_w.get(), kRmsEps, d_y_unfused.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> got_x, unfused_x;
    std::vector<uint16_t> y, unfused_y;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_x, &got_x));
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_y, &y));
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_x_unfused, &unfused_x));
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_y_unfused, &unfused_y));
    Checker check_x("fused residual add"), check_y("fused rmsnorm");
    Checker same_x("fused vs unfused x"), same_y("fused vs unfused y");
    for (size_t i = 0; i < x.size(); ++i) {
      const auto index = static_cast<int64_t>(i);
      check_x.Bits(FloatBits(got_x[i]), FloatBits(sum[i]), index);
      same_x.Bits(FloatBits(got_x[i]), FloatBits(unfused_x[i]), index);
      same_y.Bits(y[i], unfused_y[i], index);
    }
    CheckRmsNorm(sum, n, h, w, y, &check_y);
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add: x += y in fp32.

TEST_P(RowOpsTest, ResidualAdd) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto [n, h] = GetParam();
  std::mt19937_64 rng(303 + n * 131 + h);
  std::uniform_real_distribution<double> dist(-4.0, 4.0);
  std::vector<float> x(static_cast<size_t>(n) * h);
  for (float& v : x) v = static_cast<float>(dist(rng));
  const std::vector<uint16_t> y = RandomBf16(x.size(), -4.0, 4.0, rng);
  x[0] = -Bf16Value(y[0]);  // exact cancellation

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<float> d_x;
    DeviceTensor<uint16_t> d_y;
    ASSERT_CUDA_OK(d_x.Init(x, offset, 12345.0f));
    ASSERT_CUDA_OK(d_y.Init(y, offset, 0x3f80));
    ASSERT_CUDA_OK(LaunchResidualAdd(d_x.get(), d_y.get(), n, h, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_x, &got));
    Checker check("residual add");
    for (size_t i = 0; i < x.size(); ++i) {
      const double exact = double{x[i]} + Bf16Value(y[i]);
      check.Near(got[i], exact, HalfUlpFp32(std::abs(exact)), static_cast<int64_t>(i));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU-and-multiply (h is `inter`).

TEST_P(RowOpsTest, SiluMul) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto [n, inter] = GetParam();
  std::mt19937_64 rng(404 + n * 131 + inter);
  std::vector<uint16_t> gate_up(static_cast<size_t>(n) * 2 * inter);
  std::uniform_real_distribution<double> gate(-8.0, 8.0);
  std::uniform_real_distribution<double> up(-3.0, 3.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < inter; ++j) {
      gate_up[t * 2 * inter + j] = FloatToBf16(static_cast<float>(gate(rng)));
      gate_up[t * 2 * inter + inter + j] = FloatToBf16(static_cast<float>(up(rng)));
    }
  }
  // expf overflows (silu -> -0), exp(-g) underflows (silu -> g), g = 0.
  const float specials[] = {-100.0f, 100.0f, 0.0f, -87.0f, 20.0f};
  for (int j = 0; j < std::min<int>(inter, 5); ++j) gate_up[j] = FloatToBf16(specials[j]);

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<uint16_t> d_in;
    DeviceTensor<uint16_t> d_out;
    ASSERT_CUDA_OK(d_in.Init(gate_up, offset, 0));
    ASSERT_CUDA_OK(d_out.InitPoisoned(n * inter, offset));
    ASSERT_CUDA_OK(LaunchSiluMul(d_in.get(), n, inter, d_out.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> out;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_out, &out));
    Checker check("silu mul");
    for (int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < inter; ++j) {
        const double g = Bf16Value(gate_up[t * 2 * inter + j]);
        const double u = Bf16Value(gate_up[t * 2 * inter + inter + j]);
        const double exact = g / (1.0 + std::exp(-g)) * u;
        // expf (2 ulp), 1 + e, the division and the product: within 10 u relative.
        check.Near(Bf16Value(out[t * inter + j]), exact,
                   Bf16Tolerance(exact, 10 * kUnitFp32 * std::abs(exact)), t * inter + j);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE against fp64 cos/sin of the fp32 angle.

struct RopeCase {
  int64_t n;
  int num_heads;
  int head_dim;
  double theta;
};

class RopeTest : public testing::TestWithParam<RopeCase> {};

INSTANTIATE_TEST_SUITE_P(Shapes, RopeTest,
                         testing::Values(RopeCase{37, 4, 128, 1e6}, RopeCase{1, 2, 64, 1e4},
                                         RopeCase{3000, 2, 64, 1e4},  // angles up to ~3000 rad
                                         RopeCase{37, 3, 6, 1e4},     // d/2 odd: scalar path
                                         RopeCase{37, 2, 4, 1e4}, RopeCase{5, 1, 2, 1e4}),
                         [](const testing::TestParamInfo<RopeCase>& info) {
                           return absl::StrCat("n", info.param.n, "_heads", info.param.num_heads,
                                               "_d", info.param.head_dim);
                         });

TEST_P(RopeTest, MatchesFp64WithFp32Angle) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const RopeCase c = GetParam();
  const int half = c.head_dim / 2;
  // The buffer holds two more heads (untouched, like K and V after Q) and 6 padding elements.
  const int64_t row_stride = int64_t{c.num_heads + 2} * c.head_dim + 6;
  std::mt19937_64 rng(505 + c.n * 131 + c.head_dim);
  const std::vector<uint16_t> data = RandomBf16(c.n * row_stride, -2.0, 2.0, rng);
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = static_cast<float>(1.0 / std::pow(c.theta, 2.0 * i / c.head_dim));
  }

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<uint16_t> d_data;
    DeviceTensor<float> d_inv_freq;
    ASSERT_CUDA_OK(d_data.Init(data, offset, 0x7fc1));
    ASSERT_CUDA_OK(d_inv_freq.Init(inv_freq, 0, 0.0f));
    ASSERT_CUDA_OK(LaunchRope(d_data.get(), c.n, row_stride, c.num_heads, c.head_dim,
                              d_inv_freq.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> got;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_data, &got));
    Checker check("rope");
    Checker untouched("rope: elements outside heads [0, num_heads)");
    for (int64_t t = 0; t < c.n; ++t) {
      const int64_t row = t * row_stride;
      for (int head = 0; head < c.num_heads; ++head) {
        for (int i = 0; i < half; ++i) {
          const float angle = static_cast<float>(t) * inv_freq[i];  // fp32, as transformers
          const double cos_a = std::cos(static_cast<double>(angle));
          const double sin_a = std::sin(static_cast<double>(angle));
          const int64_t i1 = row + int64_t{head} * c.head_dim + i;
          const int64_t i2 = i1 + half;
          const double x1 = Bf16Value(data[i1]);
          const double x2 = Bf16Value(data[i2]);
          const double y1 = x1 * cos_a - x2 * sin_a;
          const double y2 = x2 * cos_a + x1 * sin_a;
          // cosf/sinf within 2 ulp (<= 2^-22 absolute), then two products and a sum.
          const double pre_error = (std::abs(x1) + std::abs(x2)) * 0x1p-21;
          check.Near(Bf16Value(got[i1]), y1, Bf16Tolerance(y1, pre_error), i1);
          check.Near(Bf16Value(got[i2]), y2, Bf16Tolerance(y2, pre_error), i2);
        }
      }
      for (int64_t e = int64_t{c.num_heads} * c.head_dim; e < row_stride; ++e) {
        untouched.Bits(got[row + e], data[row + e], row + e);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// K/V extraction: exact (fp16: round to nearest even of the bf16 value).

struct KvCase {
  int64_t n;
  int num_kv_heads;
  int head_dim;
  int num_q_heads;
  int pad;  // elements after q, k, v in a row
};

class ExtractKvTest : public testing::TestWithParam<KvCase> {};

INSTANTIATE_TEST_SUITE_P(Shapes, ExtractKvTest,
                         testing::Values(KvCase{37, 2, 128, 4, 0}, KvCase{1, 3, 64, 6, 8},
                                         KvCase{37, 2, 6, 4, 0}, KvCase{37, 1, 8, 2, 3}),
                         [](const testing::TestParamInfo<KvCase>& info) {
                           return absl::StrCat("n", info.param.n, "_kv", info.param.num_kv_heads,
                                               "_d", info.param.head_dim, "_pad", info.param.pad);
                         });

TEST_P(ExtractKvTest, CopiesEveryLayout) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const KvCase c = GetParam();
  const int64_t row_stride = int64_t{c.num_q_heads + 2 * c.num_kv_heads} * c.head_dim + c.pad;
  std::mt19937_64 rng(606 + c.n * 131 + c.head_dim);
  std::vector<uint16_t> qkv = RandomBf16(c.n * row_stride, -4.0, 4.0, rng);
  for (size_t i = 0; i < qkv.size(); ++i) {
    if (i % 17 == 0) qkv[i] = FloatToBf16(3e-6f);      // fp16 subnormal
    if (i % 29 == 0) qkv[i] = FloatToBf16(-70000.0f);  // fp16 overflow
    if (i % 31 == 0) qkv[i] = 0x8000;                  // -0
  }
  const int64_t count = c.n * c.num_kv_heads * c.head_dim;

  for (const int offset : kOffsets) {
    DeviceTensor<uint16_t> d_qkv;
    ASSERT_CUDA_OK(d_qkv.Init(qkv, offset, 0));
    for (const int which : {0, 1}) {  // K, V
      const int64_t first = int64_t{c.num_q_heads + which * c.num_kv_heads} * c.head_dim;
      for (const int dtype : {kLayerOpsBf16, kLayerOpsFp16, kLayerOpsFp32}) {
        const size_t element_size = ElementSize(static_cast<DType>(dtype));
        for (const bool head_major : {false, true}) {
          const std::string what =
              absl::StrCat("extract ", which == 0 ? "K" : "V", " to ",
                           std::string(DTypeName(static_cast<DType>(dtype))),
                           head_major ? " head-major" : " token-major", " offset ", offset);
          SCOPED_TRACE(what);
          DeviceTensor<uint8_t> d_out;  // bytes; offset and guard in elements
          ASSERT_CUDA_OK(d_out.InitPoisoned(count * static_cast<int64_t>(element_size),
                                            offset * static_cast<int>(element_size)));
          ASSERT_CUDA_OK(LaunchExtractKv(d_qkv.get() + first, c.n, row_stride, c.num_kv_heads,
                                         c.head_dim, dtype, head_major, d_out.get(), nullptr));
          ASSERT_CUDA_OK(cudaDeviceSynchronize());
          std::vector<uint8_t> out;
          ASSERT_NO_FATAL_FAILURE(ReadBack(d_out, &out));
          Checker check(what);
          for (int64_t t = 0; t < c.n; ++t) {
            for (int head = 0; head < c.num_kv_heads; ++head) {
              for (int i = 0; i < c.head_dim; ++i) {
                const uint16_t src = qkv[t * row_stride + first + int64_t{head} * c.head_dim + i];
                const int64_t index = head_major ? (int64_t{head} * c.n + t) * c.head_dim + i
                                                 : (t * c.num_kv_heads + head) * c.head_dim + i;
                uint32_t got = 0;
                std::memcpy(&got, out.data() + index * element_size, element_size);
                uint32_t want = src;
                if (dtype == kLayerOpsFp16) want = FloatToFp16(Bf16Value(src));
                if (dtype == kLayerOpsFp32) want = FloatBits(Bf16Value(src));
                check.Bits(got, want, index);
              }
            }
          }
          EXPECT_EQ(check.checked(), count);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 -> bf16: round to nearest even, bit-exact.

class FloatToBf16Test : public testing::TestWithParam<int64_t> {};

INSTANTIATE_TEST_SUITE_P(Counts, FloatToBf16Test,
                         testing::Values(int64_t{1}, int64_t{37}, int64_t{4099},
                                         (int64_t{1} << 20) + 3));

TEST_P(FloatToBf16Test, RoundsToNearestEven) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t count = GetParam();
  std::mt19937_64 rng(707 + count);
  std::vector<float> src(count);
  for (float& v : src) {
    // Random sign, exponent (normal and subnormal) and mantissa; no NaN / inf here.
    uint32_t bits = static_cast<uint32_t>(rng());
    const uint32_t exponent = static_cast<uint32_t>(rng() % 255);  // 0 .. 254
    bits = (bits & 0x807fffffu) | (exponent << 23);
    std::memcpy(&v, &bits, sizeof(v));
  }
  const float specials[] = {1.0f + 0x1p-8f,      // tie: down to even 1.0
                            1.0f + 3 * 0x1p-8f,  // tie: up to even
                            -(1.0f + 0x1p-8f),
                            0.0f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::max(),  // rounds to inf
                            -std::numeric_limits<float>::max(),
                            1e-40f,  // subnormal
                            std::numeric_limits<float>::quiet_NaN()};
  for (size_t i = 0; i < std::size(specials) && i < src.size(); ++i) src[i] = specials[i];

  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    DeviceTensor<float> d_src;
    DeviceTensor<uint16_t> d_dst;
    ASSERT_CUDA_OK(d_src.Init(src, offset, 0.0f));
    ASSERT_CUDA_OK(d_dst.InitPoisoned(count, offset));
    ASSERT_CUDA_OK(LaunchFloatToBf16(d_src.get(), count, d_dst.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> dst;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_dst, &dst));
    Checker check("float to bf16");
    for (int64_t i = 0; i < count; ++i) {
      if (std::isnan(src[i])) {
        // Any NaN but the poison (0xffff): the input is a positive NaN.
        const bool nan = (dst[i] & 0x7fffu) > 0x7f80u && dst[i] != 0xffffu;
        check.Bits(nan ? 1 : 0, 1, i);
      } else {
        check.Bits(dst[i], ReferenceBf16(src[i]), i);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (no device needed: nothing is launched).

TEST(LayerOpsArgumentsTest, BadSizesAreInvalidValueAndEmptyIsSuccess) {
  float f = 0;
  uint16_t b = 0;
  int32_t id = 0;
  EXPECT_EQ(LaunchEmbeddingGather(&id, -1, &b, 4, &f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchEmbeddingGather(&id, 1, &b, 0, &f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchEmbeddingGather(nullptr, 1, &b, 4, &f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchEmbeddingGather(nullptr, 0, nullptr, 4, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchRmsNorm(&f, 1, 4, &b, -1.0f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRmsNorm(&f, 1, 4, &b, std::nanf(""), &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRmsNorm(&f, 1, 0, &b, 1e-6f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRmsNorm(&f, 1, 4, nullptr, 1e-6f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRmsNorm(nullptr, 0, 4, nullptr, 1e-6f, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchRope(&b, 1, 128, 1, 7, &f, nullptr), cudaErrorInvalidValue);    // odd d
  EXPECT_EQ(LaunchRope(&b, 1, 100, 1, 128, &f, nullptr), cudaErrorInvalidValue);  // stride
  EXPECT_EQ(LaunchRope(&b, 1, 128, 0, 128, &f, nullptr), cudaErrorInvalidValue);  // heads
  EXPECT_EQ(LaunchRope(&b, 1, 128, 1, 128, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRope(nullptr, 0, 128, 1, 128, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchResidualAdd(&f, &b, -1, 4, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAdd(&f, nullptr, 1, 4, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAdd(nullptr, nullptr, 0, 4, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchResidualAddRmsNorm(&f, &b, -1, 4, &b, 1e-6f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAddRmsNorm(&f, &b, 1, 0, &b, 1e-6f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAddRmsNorm(&f, &b, 1, 4, &b, -1.0f, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAddRmsNorm(&f, nullptr, 1, 4, &b, 1e-6f, &b, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(LaunchResidualAddRmsNorm(nullptr, nullptr, 0, 4, nullptr, 1e-6f, nullptr, nullptr),
            cudaSuccess);
  EXPECT_EQ(LaunchSiluMul(&b, 1, 0, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchSiluMul(&b, 1, 4, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchSiluMul(nullptr, 0, 4, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchExtractKv(&b, 1, 128, 1, 128, 3, false, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchExtractKv(&b, 1, 100, 1, 128, 0, false, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchExtractKv(&b, 1, 128, 1, 128, 0, true, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchExtractKv(nullptr, 0, 128, 1, 128, 2, true, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(LaunchFloatToBf16(&f, -1, &b, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchFloatToBf16(&f, 1, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchFloatToBf16(nullptr, 0, nullptr, nullptr), cudaSuccess);
}

TEST(GemmRunnerArgumentsTest, NoSuchDeviceIsFailedPrecondition) {
  const absl::StatusOr<std::unique_ptr<GemmRunner>> runner = GemmRunner::Create(-1);
  EXPECT_EQ(runner.status().code(), absl::StatusCode::kFailedPrecondition);
  const absl::StatusOr<std::unique_ptr<GemmRunner>> beyond = GemmRunner::Create(CudaDeviceCount());
  EXPECT_EQ(beyond.status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// GEMM against an fp64 product.

// out[i, j] = sum_l a[i, l] w[j, l] in fp64, with sum_l |a[i, l] w[j, l]| (the error scale).
struct GemmReference {
  std::vector<double> dot;
  std::vector<double> abs_sum;
};

GemmReference ReferenceGemm(const std::vector<uint16_t>& a_bits,
                            const std::vector<uint16_t>& w_bits, int64_t m, int64_t n, int64_t k) {
  std::vector<float> a(a_bits.size());
  std::vector<float> w(w_bits.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = Bf16Value(a_bits[i]);
  for (size_t i = 0; i < w.size(); ++i) w[i] = Bf16Value(w_bits[i]);
  GemmReference ref;
  ref.dot.resize(static_cast<size_t>(m * n));
  ref.abs_sum.resize(static_cast<size_t>(m * n));
  constexpr int64_t kBlock = 8;  // rows of w per task, reused over all rows of a
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int thread = 0; thread < threads; ++thread) {
    pool.emplace_back([&, thread] {
      for (int64_t block = thread; block < blocks; block += threads) {
        for (int64_t i = 0; i < m; ++i) {
          const float* a_row = a.data() + i * k;
          for (int64_t j = block * kBlock; j < std::min(n, (block + 1) * kBlock); ++j) {
            const float* w_row = w.data() + j * k;
            double s[4] = {0, 0, 0, 0};
            double t[4] = {0, 0, 0, 0};
            int64_t l = 0;
            for (; l + 4 <= k; l += 4) {
              for (int q = 0; q < 4; ++q) {
                const double p = double{a_row[l + q]} * w_row[l + q];
                s[q] += p;
                t[q] += std::abs(p);
              }
            }
            for (; l < k; ++l) {
              const double p = double{a_row[l]} * w_row[l];
              s[0] += p;
              t[0] += std::abs(p);
            }
            ref.dot[i * n + j] = (s[0] + s[1]) + (s[2] + s[3]);
            ref.abs_sum[i * n + j] = (t[0] + t[1]) + (t[2] + t[3]);
          }
        }
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  return ref;
}

enum class GemmOut { kBf16, kBf16Bias, kFp32 };

std::string GemmOutName(GemmOut kind) {
  switch (kind) {
    case GemmOut::kBf16:
      return "bf16 out";
    case GemmOut::kBf16Bias:
      return "bf16 out + bias";
    case GemmOut::kFp32:
      return "fp32 out";
  }
  return "?";
}

// Device inputs of one GEMM shape.
struct GemmInputs {
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  std::vector<uint16_t> a;
  std::vector<uint16_t> w;
  std::vector<uint16_t> bias;
  DeviceTensor<uint16_t> d_a;
  DeviceTensor<uint16_t> d_w;
  DeviceTensor<uint16_t> d_bias;
};

// Runs one GEMM of `kind` into freshly poisoned outputs; returns the outputs as doubles.
void RunGemm(GemmRunner& runner, GemmInputs& in, GemmOut kind, int out_offset,
             std::vector<double>* out) {
  const int64_t count = in.m * in.n;
  out->assign(static_cast<size_t>(count), 0.0);
  if (kind == GemmOut::kFp32) {
    DeviceTensor<float> d_out;
    ASSERT_CUDA_OK(d_out.InitPoisoned(count, out_offset));
    const absl::Status status =
        runner.LinearF32(in.d_a.get(), in.m, in.k, in.d_w.get(), in.n, d_out.get(), nullptr);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> values;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_out, &values));
    for (int64_t i = 0; i < count; ++i) (*out)[i] = values[i];
  } else {
    DeviceTensor<uint16_t> d_out;
    ASSERT_CUDA_OK(d_out.InitPoisoned(count, out_offset));
    const uint16_t* bias = kind == GemmOut::kBf16Bias ? in.d_bias.get() : nullptr;
    const absl::Status status =
        runner.Linear(in.d_a.get(), in.m, in.k, in.d_w.get(), in.n, bias, d_out.get(), nullptr);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> values;
    ASSERT_NO_FATAL_FAILURE(ReadBack(d_out, &values));
    for (int64_t i = 0; i < count; ++i) (*out)[i] = Bf16Value(values[i]);
  }
}

// Checks `got` of `kind` against the reference: fp32 accumulation over k products (exact in
// fp32) and the bias add, within 2 (k + 2) u sum |a w| (the factor 2 covers tensor cores that
// truncate instead of rounding), then the output's rounding.
void CheckGemm(const GemmInputs& in, const GemmReference& ref, GemmOut kind,
               const std::vector<double>& got) {
  Checker check(GemmOutName(kind));
  for (int64_t i = 0; i < in.m; ++i) {
    for (int64_t j = 0; j < in.n; ++j) {
      const int64_t index = i * in.n + j;
      double exact = ref.dot[index];
      double scale = ref.abs_sum[index];
      if (kind == GemmOut::kBf16Bias) {
        const double bias = Bf16Value(in.bias[j]);
        exact += bias;
        scale += std::abs(bias);
      }
      const double accumulation = 2.0 * double(in.k + 2) * kUnitFp32 * scale;
      const double tolerance = kind == GemmOut::kFp32
                                   ? accumulation + HalfUlpFp32(std::abs(exact) + accumulation)
                                   : Bf16Tolerance(exact, accumulation);
      check.Near(got[index], exact, tolerance, index);
    }
  }
}

using GemmShape = std::tuple<int64_t, int64_t, int64_t>;  // m, k, n

class GemmTest : public testing::TestWithParam<GemmShape> {};

INSTANTIATE_TEST_SUITE_P(Shapes, GemmTest,
                         testing::Combine(testing::Values(int64_t{1}, int64_t{37}, int64_t{512}),
                                          testing::Values(int64_t{64}, int64_t{4096}),
                                          testing::Values(int64_t{128}, int64_t{6144})),
                         [](const testing::TestParamInfo<GemmShape>& info) {
                           return absl::StrCat("m", std::get<0>(info.param), "_k",
                                               std::get<1>(info.param), "_n",
                                               std::get<2>(info.param));
                         });

void UploadGemmInputs(GemmInputs& in) {
  ASSERT_CUDA_OK(in.d_a.Init(in.a, 0, 0));
  ASSERT_CUDA_OK(in.d_w.Init(in.w, 0, 0));
  ASSERT_CUDA_OK(in.d_bias.Init(in.bias, 0, 0));
}

TEST_P(GemmTest, MatchesFp64AndReusesPlans) {
  SKIP_WITHOUT_CUDA_DEVICE();
  GemmInputs in;
  std::tie(in.m, in.k, in.n) = GetParam();
  std::mt19937_64 rng(808 + in.m * 131 + in.k * 7 + in.n);
  in.a = RandomBf16(in.m * in.k, -1.0, 1.0, rng);
  in.w = RandomBf16(in.n * in.k, -1.0, 1.0, rng);
  in.bias = RandomBf16(in.n, -1.0, 1.0, rng);
  ASSERT_NO_FATAL_FAILURE(UploadGemmInputs(in));
  absl::StatusOr<std::unique_ptr<GemmRunner>> runner = GemmRunner::Create(0);
  ASSERT_TRUE(runner.ok()) << runner.status();
  const GemmReference ref = ReferenceGemm(in.a, in.w, in.m, in.n, in.k);

  int64_t plans = 0;
  for (const GemmOut kind : {GemmOut::kBf16, GemmOut::kBf16Bias, GemmOut::kFp32}) {
    for (int call = 0; call < 2; ++call) {  // the second call runs the cached plan
      SCOPED_TRACE(absl::StrCat(GemmOutName(kind), ", call ", call));
      std::vector<double> got;
      ASSERT_NO_FATAL_FAILURE(RunGemm(**runner, in, kind, 0, &got));
      CheckGemm(in, ref, kind, got);
      if (call == 0) ++plans;
      EXPECT_EQ((*runner)->CachedPlanCount(), plans);
    }
  }
}

// Inputs on a grid (multiples of 1/4 in [-1, 1], bias multiples of 1/4 in [-2, 2]): every
// partial sum is a multiple of 1/16 below 2^13, exact in fp32 in any order, so fp32 outputs must
// be exact and bf16 outputs the exact value rounded once (bias added before the rounding).
TEST(GemmExactTest, GridInputsGiveCorrectlyRoundedResults) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<GemmRunner>> runner = GemmRunner::Create(0);
  ASSERT_TRUE(runner.ok()) << runner.status();
  for (const auto& [m, k, n] : {GemmShape{1, 64, 128}, GemmShape{37, 4096, 6144},
                                GemmShape{512, 4096, 128}, GemmShape{5, 72, 40}}) {
    SCOPED_TRACE(absl::StrCat("m=", m, " k=", k, " n=", n));
    GemmInputs in;
    in.m = m;
    in.k = k;
    in.n = n;
    std::mt19937_64 rng(909 + m * 131 + k * 7 + n);
    std::uniform_int_distribution<int> quarter(-4, 4);
    std::uniform_int_distribution<int> bias_quarter(-8, 8);
    in.a.resize(m * k);
    in.w.resize(n * k);
    in.bias.resize(n);
    for (uint16_t& v : in.a) v = FloatToBf16(quarter(rng) / 4.0f);
    for (uint16_t& v : in.w) v = FloatToBf16(quarter(rng) / 4.0f);
    for (uint16_t& v : in.bias) v = FloatToBf16(bias_quarter(rng) / 4.0f);
    ASSERT_NO_FATAL_FAILURE(UploadGemmInputs(in));
    const GemmReference ref = ReferenceGemm(in.a, in.w, m, n, k);
    for (const GemmOut kind : {GemmOut::kBf16, GemmOut::kBf16Bias, GemmOut::kFp32}) {
      SCOPED_TRACE(GemmOutName(kind));
      std::vector<double> got;
      ASSERT_NO_FATAL_FAILURE(RunGemm(**runner, in, kind, 0, &got));
      Checker check(absl::StrCat("exact ", GemmOutName(kind)));
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double exact = ref.dot[i * n + j];
          if (kind == GemmOut::kBf16Bias) exact += Bf16Value(in.bias[j]);
          const double want =
              kind == GemmOut::kFp32 ? exact : Bf16Value(ReferenceBf16(static_cast<float>(exact)));
          check.Near(got[i * n + j], want, 0.0, i * n + j);
        }
      }
    }
  }
}

// Pointers that are not 16-byte aligned (a and out shifted by one element, odd k) get plans of
// their own and correct results; the aligned plan stays cached next to them.
TEST(GemmPlanTest, UnalignedPointersGetTheirOwnPlan) {
  SKIP_WITHOUT_CUDA_DEVICE();
  absl::StatusOr<std::unique_ptr<GemmRunner>> runner = GemmRunner::Create(0);
  ASSERT_TRUE(runner.ok()) << runner.status();
  GemmRunner& gemm = **runner;
  constexpr int64_t m = 9;
  constexpr int64_t k = 77;
  constexpr int64_t n = 24;
  std::mt19937_64 rng(1010);
  GemmInputs in;
  in.m = m;
  in.k = k;
  in.n = n;
  in.a = RandomBf16(m * k, -1.0, 1.0, rng);
  in.w = RandomBf16(n * k, -1.0, 1.0, rng);
  in.bias = RandomBf16(n, -1.0, 1.0, rng);
  const GemmReference ref = ReferenceGemm(in.a, in.w, m, n, k);
  int64_t plans = 0;
  for (const int offset : kOffsets) {
    SCOPED_TRACE(absl::StrCat("offset ", offset));
    ASSERT_CUDA_OK(in.d_a.Init(in.a, offset, 0));
    ASSERT_CUDA_OK(in.d_w.Init(in.w, 0, 0));
    ASSERT_CUDA_OK(in.d_bias.Init(in.bias, offset, 0));
    for (const GemmOut kind : {GemmOut::kBf16, GemmOut::kBf16Bias, GemmOut::kFp32}) {
      SCOPED_TRACE(GemmOutName(kind));
      std::vector<double> got;
      ASSERT_NO_FATAL_FAILURE(RunGemm(gemm, in, kind, offset, &got));
      CheckGemm(in, ref, kind, got);
      EXPECT_EQ(gemm.CachedPlanCount(), ++plans);
    }
  }
  // Empty products are no-ops; bad shapes and null pointers are INVALID_ARGUMENT.
  EXPECT_TRUE(gemm.Linear(nullptr, 0, k, nullptr, n, nullptr, nullptr, nullptr).ok());
  EXPECT_TRUE(gemm.LinearF32(nullptr, m, k, nullptr, 0, nullptr, nullptr).ok());
  EXPECT_EQ(gemm.Linear(in.d_a.get(), m, 0, in.d_w.get(), n, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gemm.Linear(in.d_a.get(), m, k, in.d_w.get(), n, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gemm.CachedPlanCount(), plans);
}

}  // namespace
}  // namespace anchorserve::cuda
