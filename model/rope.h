// Rotary position embedding tables as transformers computes them in fp32, so that post-RoPE K
// matches its cache to fp32 rounding. Shared by the engines; tests compute RoPE independently.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace anchorserve {

// inv_freq [d/2]: theta^(-2i/d) in fp32 (exponent, power and reciprocal each rounded to fp32),
// then for llama3 scaling the per-frequency adjustment in fp32: wavelengths 2*pi/inv_freq above
// original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
// original / high_freq_factor are kept, and the ones between interpolate with
// s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
// (1 - s) * inv_freq / factor + s * inv_freq.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

// cos and sin [d/2] of position `position`: angle fl32(position * inv_freq[i]), then cos/sin
// rounded to fp32. Dimension i pairs with i + d/2 (rotate-half):
//   out[i]       = x[i] * cos[i] - x[i + d/2] * sin[i]
//   out[i + d/2] = x[i + d/2] * cos[i] + x[i] * sin[i]
void RopeCosSin(const std::vector<float>& inv_freq, int64_t position, float* cos, float* sin);

}  // namespace anchorserve
