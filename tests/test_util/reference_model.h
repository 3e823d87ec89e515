// An independent fp64 forward pass of a Llama/Qwen2 checkpoint, the yardstick of the prefill
// engines. It reads config.json and the safetensors files itself (no code shared with model/),
// computes with plain loops in double, and carries next to every value the scale sigma of the
// error an fp32 implementation of the same forward pass makes there, by probabilistic rounding
// error analysis (each fp32 rounding is a bounded, mean-independent error of at most u = 2^-24
// relative; errors of independent roundings add in quadrature):
//   - a length-K dot product adds u * sqrt(K + 1) * sum |a_i b_i| (the partial sums are bounded by
//     sum |a_i b_i|) and propagates input errors as sqrt(sum (b_i sigma_a_i)^2 + ...);
//   - RMSNorm propagates through d(rsqrt) and adds its mean-of-squares, sqrt and scaling
//     roundings;
//   - RoPE adds the worst-case fp32 error of inv_freq (exponent, power, reciprocal and the llama3
//     adjustment, each rounded to fp32), of the angle p * inv_freq, and of cos/sin;
//   - softmax attention propagates score errors to the output exactly to first order,
//     o' - o = sum_j p_j (v_j - o) ds_j + sum_j p_j dv_j, plus exp (4u each), accumulation,
//     online-softmax rescaling and normalization roundings;
//   - SiLU propagates through its derivative; products and sums add one rounding.
// Worst-case bounds grow by about sqrt(K) per dot product faster than actual errors and become
// useless after a few layers; this model does not. Its sums of bounded independent terms are
// sub-Gaussian, so |error| > lambda * sigma has probability below 2 exp(-lambda^2 / 2); tests allow
// kToleranceSigmas sigmas. The terms hold for any fp32 evaluation order (blocked GEMMs, online
// softmax), so sigma applies to the CPU engine and to transformers' fp32 forward alike. On the
// tiny presets the largest observed error is about 0.4 sigma.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace anchorserve {

// Sigmas of error a test allows: 2 exp(-8^2 / 2) = 2.5e-14 per compared value under the model,
// and room for the model's first-order simplifications.
inline constexpr double kToleranceSigmas = 8.0;

struct ReferenceForward {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int64_t seq_len = 0;
  int64_t vocab_size = 0;
  // Per layer, post-RoPE K and V as transformers caches them: [Hkv, N, d].
  std::vector<std::vector<double>> k, v;
  std::vector<std::vector<double>> k_sigma, v_sigma;  // fp32 error scales, same shapes
  std::vector<double> logits, logits_sigma;           // [V] of the last position
};

// Runs the forward pass of the checkpoint in `dir` over `ids` (positions 0..N-1, dense causal
// attention). Errors name the file or field; the checkpoint must be one the engine accepts.
absl::StatusOr<ReferenceForward> RunReferenceForward(const std::string& dir,
                                                     absl::Span<const int32_t> ids);

}  // namespace anchorserve
