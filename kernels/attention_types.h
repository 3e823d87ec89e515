// The problem every backend solves: AnchorAttention (docs/anchorattention.md) causal prefill of
// one or more sequences, and the statistics it reports.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace anchorserve {

enum class Layout {
  kTokenMajor,  // [seq_len, num_heads, head_dim]
  kHeadMajor,   // [num_heads, seq_len, head_dim]
};

enum class AttentionMode {
  kAnchor,  // sparse AnchorAttention
  kDense,   // exact dense causal attention, served by a dense kernel
  kAuto,    // dense where AnchorAttention cannot be cheaper, else kAnchor (ResolveMode)
};

// The spec's knobs, with its defaults. One group = block_size * step query rows.
struct AnchorConfig {
  AttentionMode mode = AttentionMode::kAnchor;
  float theta = 12.0f;         // nats of scale*q.k; +inf = dense, -inf = anchor region only
  int block_size = 128;        // B
  int step = 16;               // s
  int init_groups = 1;         // n_init
  int local_groups = 1;        // n_loc (own group counts as 1)
  float softmax_scale = 0.0f;  // 0 = 1/sqrt(head_dim)
  // Mass-target mode (docs/anchorattention.md section 8): with mass_target p in (0, 1], each
  // (query head, group) picks its own theta, the smallest on the kMassThetaStep grid above
  // mass_min_theta whose estimated kept attention mass reaches p; `theta` is then unused.
  float mass_target = 0.0f;       // 0 = off (fixed theta)
  float mass_density_cap = 1.0f;  // a group keeping more than this fraction of C_g keeps all of it
  float mass_min_theta = 0.0f;    // keys within this many nats of the pooled anchor always stay

  int64_t GroupSize() const { return int64_t{block_size} * step; }
  bool UsesMassTarget() const { return mode == AttentionMode::kAnchor && mass_target > 0.0f; }
  float ScaleFor(int head_dim) const {
    return softmax_scale > 0.0f ? softmax_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  }
  // Dense mode, or a threshold that keeps every candidate.
  bool IsDense() const {
    return mode == AttentionMode::kDense || (!UsesMassTarget() && theta == INFINITY);
  }
};

// The mass-target theta grid: candidate thresholds mass_min_theta + k * kMassThetaStep for
// k in [0, kMassThetaBins]; a group whose target needs more keeps every candidate.
inline constexpr float kMassThetaStep = 0.25f;
inline constexpr int kMassThetaBins = 160;
// Pooled gaps above this many nats count as this much in mass estimates (keeps fp32 sums finite;
// such a key is kept by every threshold >= -gap anyway).
inline constexpr float kMassGapCeiling = 40.0f;

// Threshold k of the grid, as every backend and the reference compute it (fp32).
inline float MassThetaAt(const AnchorConfig& config, int k) {
  return config.mass_min_theta + static_cast<float>(k) * kMassThetaStep;
}

// The grid level of a candidate with pooled margin `margin` (max_r of scale * qbar_r . k_j -
// abar_r): the smallest k with margin >= -MassThetaAt(k), or kMassThetaBins + 1 when no grid
// threshold keeps it. Exactly consistent with that comparison in fp32.
inline int MassLevelOf(const AnchorConfig& config, float margin) {
  if (margin >= -MassThetaAt(config, 0)) return 0;
  const float steps = (-config.mass_min_theta - margin) / kMassThetaStep;
  if (!(steps <= static_cast<float>(kMassThetaBins + 1))) return kMassThetaBins + 1;  // NaN too
  int k = std::max(1, static_cast<int>(std::ceil(steps)));
  while (k > 1 && margin >= -MassThetaAt(config, k - 1)) --k;
  while (k <= kMassThetaBins && margin < -MassThetaAt(config, k)) ++k;
  return k;
}

// Bounds that keep every derived size (group size, index lists) well inside int32/int64.
inline constexpr int kMaxBlockSize = 4096;
inline constexpr int kMaxStep = 1024;
inline constexpr int kMaxRegionGroups = 1 << 20;
inline constexpr int kMaxHeadDim = 256;

// Checks ranges: theta not NaN, block_size in [1, kMaxBlockSize], step in [1, kMaxStep],
// init_groups >= 0, local_groups >= 1, softmax_scale finite and >= 0, mass_target in [0, 1],
// mass_density_cap in (0, 1], mass_min_theta finite.
absl::Status ValidateAnchorConfig(const AnchorConfig& config);

// The anchor region (init and local groups, docs/anchorattention.md section 2) of a causal
// sequence of `seq_len` rows, as a fraction of its N (N + 1) / 2 causal entries: the part every
// row computes whatever the stripes select.
double AnchorRegionFraction(const AnchorConfig& config, int64_t seq_len);

// Mode kAuto runs dense when the anchor region alone holds more than this fraction of the causal
// entries: identification reads that region once more and the sparse kernel runs slower per
// entry than the dense one, so below-break-even sequences (short N) cost more sparse than dense.
inline constexpr double kAutoDenseAnchorFraction = 0.5;

struct ModeChoice {
  AttentionMode mode = AttentionMode::kAnchor;  // kAnchor or kDense, never kAuto
  std::string reason;                           // set when the config asked for kAuto
};

// The mode a request of `seq_len` rows runs in: config.mode unless it is kAuto. The one place
// that decides auto; backends expect resolved configs (CheckBatch refuses kAuto).
ModeChoice ResolveMode(const AnchorConfig& config, int64_t seq_len);

struct AttentionShape {
  int64_t seq_len = 0;   // N: q_len == kv_len (causal prefill)
  int num_q_heads = 0;   // Hq
  int num_kv_heads = 0;  // Hkv; Hq % Hkv == 0, query head h reads KV head h / (Hq / Hkv)
  int head_dim = 0;      // d

  int GqaRatio() const { return num_q_heads / num_kv_heads; }
};

// Element strides of a [seq_len, num_heads, head_dim]-shaped tensor stored in `layout`.
struct TensorStrides {
  int64_t token;
  int64_t head;
};
inline TensorStrides StridesFor(Layout layout, int64_t seq_len, int num_heads, int head_dim) {
  return layout == Layout::kTokenMajor ? TensorStrides{int64_t{num_heads} * head_dim, head_dim}
                                       : TensorStrides{head_dim, seq_len * head_dim};
}

// One attention problem without its buffers: what a backend decides "can this run?" on.
struct AttentionProblem {
  AttentionShape shape;
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  AnchorConfig config;
};

// Checks shape (positive dims, Hq % Hkv, d <= kMaxHeadDim, products without overflow) and
// config; INVALID_ARGUMENT naming the offending field. Backend limits are CanRun's.
absl::Status ValidateProblem(const AttentionProblem& problem);

// Problems with equal keys may share one backend run: everything but seq_len (theta compared
// by bit pattern, so the key is a total order even for values validation rejects).
std::string AttentionBatchKey(const AttentionProblem& problem);

// What one query head computed (the spec's metrics, as exact counts).
struct HeadStats {
  int64_t computed_entries = 0;  // sum_i |A(i)| + sum_g |S_g| * rows(g)
  int64_t stripe_entries = 0;    // sum_g |S_g| * rows(g)
  int64_t stripe_groups = 0;     // groups with a non-empty candidate set C_g
  int64_t stripes_total = 0;     // sum of |S_g| over those groups
  int64_t stripes_min = 0;       // min |S_g| over those groups (0 when there are none)
  int64_t stripes_max = 0;
  // Mass-target mode only (zero otherwise), over the groups that identify stripes: the chosen
  // thresholds of the groups that kept a subset (finite theta), how many kept every candidate
  // (target out of the grid's reach or over the density cap), and the estimated kept mass summed
  // over every row of the head (rows without candidates count 1).
  int64_t mass_groups = 0;   // groups with a finite chosen theta
  float mass_theta_min = 0;  // min / max / sum of the chosen theta over those groups
  float mass_theta_max = 0;
  double mass_theta_sum = 0;
  int64_t mass_full_groups = 0;   // groups that kept all of C_g
  double estimated_mass_sum = 0;  // sum over rows of the estimated kept fraction of mass
};

inline int64_t CausalEntries(int64_t seq_len) { return seq_len * (seq_len + 1) / 2; }

struct StageTimes {
  double identification_seconds = 0;  // anchor + stripe identification
  double compute_seconds = 0;         // sparse or dense attention
  double transfer_seconds = 0;        // host <-> device copies
};

// One sequence to attend. The caller owns every buffer; the backend fills the outputs.
struct AttentionTask {
  AttentionShape shape;
  DType dtype = DType::kBf16;           // of q, k, v and out
  Layout layout = Layout::kTokenMajor;  // of q, k, v and out
  const void* q = nullptr;              // [N, Hq, d] or [Hq, N, d]
  const void* k = nullptr;              // [N, Hkv, d] or [Hkv, N, d]
  const void* v = nullptr;              // [N, Hkv, d] or [Hkv, N, d]
  void* out = nullptr;                  // like q
  float* maybe_lse = nullptr;  // [Hq, N] natural-log sum of exp(s_ij) over the computed keys
  AnchorConfig config;
  // Set by whoever stops waiting for the result; backends skip or abandon the task.
  const std::atomic<bool>* maybe_cancelled = nullptr;

  // Outputs.
  std::vector<HeadStats> head_stats;  // [Hq]
  StageTimes times;
  absl::Status status;  // per task: CANCELLED when abandoned, OK otherwise

  bool Cancelled() const {
    return maybe_cancelled != nullptr && maybe_cancelled->load(std::memory_order_relaxed);
  }
};

inline AttentionProblem ProblemOf(const AttentionTask& task) {
  return AttentionProblem{task.shape, task.dtype, task.layout, task.config};
}

// ValidateProblem plus non-null buffers.
absl::Status ValidateTask(const AttentionTask& task);

}  // namespace anchorserve
