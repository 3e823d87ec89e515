#include "model/rope.h"

#include <cmath>

namespace anchorserve {

// Every step is rounded to fp32 in the order transformers evaluates it (this file is compiled
// without floating-point contraction, the ISO C++ default).
std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const int half = config.head_dim / 2;
  const float dim = static_cast<float>(config.head_dim);
  const float theta = static_cast<float>(config.rope.theta);
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / dim;
    inv_freq[i] = 1.0f / std::pow(theta, exponent);
  }
  if (config.rope.type != RopeType::kLlama3) return inv_freq;

  const RopeParameters& rope = config.rope;
  const float original = static_cast<float>(rope.original_max_position_embeddings);
  const float low_wavelength = static_cast<float>(
      static_cast<double>(rope.original_max_position_embeddings) / rope.low_freq_factor);
  const float high_wavelength = static_cast<float>(
      static_cast<double>(rope.original_max_position_embeddings) / rope.high_freq_factor);
  const float factor = static_cast<float>(rope.factor);
  const float low = static_cast<float>(rope.low_freq_factor);
  const float span = static_cast<float>(rope.high_freq_factor - rope.low_freq_factor);
  const float two_pi = static_cast<float>(2.0 * M_PI);
  for (float& f : inv_freq) {
    const float wavelength = two_pi / f;
    const float scaled = wavelength > low_wavelength ? f / factor : f;
    const bool medium = !(wavelength < high_wavelength) && !(wavelength > low_wavelength);
    if (medium) {
      const float s = (original / wavelength - low) / span;
      f = (1.0f - s) * scaled / factor + s * scaled;
    } else {
      f = scaled;
    }
  }
  return inv_freq;
}

void RopeCosSin(const std::vector<float>& inv_freq, int64_t position, float* cos, float* sin) {
  const float p = static_cast<float>(position);
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double angle = static_cast<double>(p * inv_freq[i]);
    cos[i] = static_cast<float>(std::cos(angle));
    sin[i] = static_cast<float>(std::sin(angle));
  }
}

}  // namespace anchorserve
