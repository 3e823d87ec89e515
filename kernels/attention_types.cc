#include "kernels/attention_types.h"

#include <limits>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"

namespace anchorserve {

namespace {

// lo + (lo + 1) + ... + hi, 0 when hi < lo.
double SumRange(int64_t lo, int64_t hi) {
  if (hi < lo) return 0.0;
  return 0.5 * static_cast<double>(hi - lo + 1) * static_cast<double>(lo + hi);
}

}  // namespace

double AnchorRegionFraction(const AnchorConfig& config, int64_t seq_len) {
  if (seq_len <= 0) return 1.0;
  const int64_t group = config.GroupSize();
  const int64_t init_end = std::min<int64_t>(int64_t{config.init_groups} * group, seq_len);
  // Rows below init_end see keys 0..r (r + 1 of them); later rows see init_end sink keys plus
  // keys local_begin..r of their local groups.
  double entries = SumRange(1, init_end);
  auto add_group = [&](int64_t g) {
    const int64_t first = std::max(g * group, init_end);
    const int64_t last = std::min((g + 1) * group, seq_len) - 1;
    if (last < first) return;
    const int64_t local_begin = std::max<int64_t>(init_end, (g - config.local_groups + 1) * group);
    entries += static_cast<double>(last - first + 1) * static_cast<double>(init_end);
    entries += SumRange(first - local_begin + 1, last - local_begin + 1);
  };
  // Full groups from n_init + n_loc - 1 on all add the same count (their local region starts
  // past the sink region), so the work is O(n_init + n_loc) whatever N and G are.
  const int64_t num_groups = (seq_len + group - 1) / group;
  const int64_t steady_begin =
      std::max<int64_t>(init_end / group, int64_t{config.init_groups} + config.local_groups - 1);
  int64_t g = init_end / group;
  for (; g < std::min(steady_begin, num_groups); ++g) add_group(g);
  if (g < num_groups - 1) {
    const int64_t lead = int64_t{config.local_groups - 1} * group;  // local keys before a group
    entries += static_cast<double>(num_groups - 1 - g) *
               (static_cast<double>(group) * static_cast<double>(init_end) +
                SumRange(lead + 1, lead + group));
    g = num_groups - 1;
  }
  for (; g < num_groups; ++g) add_group(g);
  const double causal = 0.5 * static_cast<double>(seq_len) * static_cast<double>(seq_len + 1);
  return std::min(1.0, entries / causal);
}

ModeChoice ResolveMode(const AnchorConfig& config, int64_t seq_len) {
  ModeChoice choice;
  if (config.mode != AttentionMode::kAuto) {
    choice.mode = config.mode;
    return choice;
  }
  const double fraction = AnchorRegionFraction(config, seq_len);
  const bool dense = fraction > kAutoDenseAnchorFraction;
  choice.mode = dense ? AttentionMode::kDense : AttentionMode::kAnchor;
  choice.reason =
      absl::StrCat("auto: ", dense ? "dense" : "anchor", ", the anchor region is ",
                   absl::SixDigits(100.0 * fraction), "% of the causal entries at N=", seq_len,
                   " (dense above ", 100.0 * kAutoDenseAnchorFraction, "%)");
  return choice;
}

absl::Status ValidateAnchorConfig(const AnchorConfig& config) {
  if (std::isnan(config.theta)) return absl::InvalidArgumentError("config.theta is NaN");
  if (config.block_size < 1 || config.block_size > kMaxBlockSize) {
    return absl::InvalidArgumentError(absl::StrCat("config.block_size must be in [1, ",
                                                   kMaxBlockSize, "], got ", config.block_size));
  }
  if (config.step < 1 || config.step > kMaxStep) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.step must be in [1, ", kMaxStep, "], got ", config.step));
  }
  if (config.init_groups < 0 || config.init_groups > kMaxRegionGroups) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.init_groups must be in [0, ", kMaxRegionGroups, "], got ", config.init_groups));
  }
  if (config.local_groups < 1 || config.local_groups > kMaxRegionGroups) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.local_groups must be in [1, ", kMaxRegionGroups, "], got ", config.local_groups));
  }
  if (!std::isfinite(config.softmax_scale) || config.softmax_scale < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.softmax_scale must be finite and positive (0 = default), got ",
                     config.softmax_scale));
  }
  if (!(config.mass_target >= 0.0f && config.mass_target <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.mass_target must be in [0, 1] (0 = fixed theta), got ", config.mass_target));
  }
  if (!(config.mass_density_cap > 0.0f && config.mass_density_cap <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.mass_density_cap must be in (0, 1], got ", config.mass_density_cap));
  }
  if (!std::isfinite(config.mass_min_theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.mass_min_theta must be finite, got ", config.mass_min_theta));
  }
  return absl::OkStatus();
}

absl::Status ValidateProblem(const AttentionProblem& problem) {
  const AttentionShape& s = problem.shape;
  if (s.seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("seq_len must be positive, got ", s.seq_len));
  }
  if (s.num_q_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_q_heads must be positive, got ", s.num_q_heads));
  }
  if (s.num_kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_kv_heads must be positive, got ", s.num_kv_heads));
  }
  if (s.num_q_heads % s.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads (", s.num_q_heads,
                                                   ") must be a multiple of num_kv_heads (",
                                                   s.num_kv_heads, ")"));
  }
  if (s.head_dim <= 0 || s.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be in [1, ", kMaxHeadDim, "], got ", s.head_dim));
  }
  // Elements of Q must fit int64 with room for byte counts.
  const int64_t limit = std::numeric_limits<int64_t>::max() / 8;
  if (s.seq_len > limit / (int64_t{s.num_q_heads} * s.head_dim)) {
    return absl::InvalidArgumentError("seq_len * num_q_heads * head_dim overflows");
  }
  return ValidateAnchorConfig(problem.config);
}

absl::Status ValidateTask(const AttentionTask& task) {
  if (task.q == nullptr || task.k == nullptr || task.v == nullptr || task.out == nullptr) {
    return absl::InvalidArgumentError("q, k, v and out must be non-null");
  }
  return ValidateProblem(ProblemOf(task));
}

std::string AttentionBatchKey(const AttentionProblem& problem) {
  const AnchorConfig& c = problem.config;
  return absl::StrCat(
      "attention/", static_cast<int>(problem.dtype), "/", static_cast<int>(problem.layout), "/",
      problem.shape.num_q_heads, "/", problem.shape.num_kv_heads, "/", problem.shape.head_dim, "/",
      static_cast<int>(c.mode), "/", absl::bit_cast<uint32_t>(c.theta), "/", c.block_size, "/",
      c.step, "/", c.init_groups, "/", c.local_groups, "/",
      absl::bit_cast<uint32_t>(c.softmax_scale), "/", absl::bit_cast<uint32_t>(c.mass_target), "/",
      absl::bit_cast<uint32_t>(c.mass_density_cap), "/",
      absl::bit_cast<uint32_t>(c.mass_min_theta));
}

}  // namespace anchorserve
