// Seeded Q/K/V whose attention looks like a long-context LLM's (after RoPE), for tests,
// benchmarks and the demo client. Every element is a pure function of (seed, tensor, head,
// token, dim), so results do not depend on the thread count.
//
// How the structure is built (scores in nats of scale * q.k, scale = 1/sqrt(d)):
//  - Rotary local part: the first 2*floor(d/4) dims are rotary pairs; q_i and k_j carry the same
//    unit pattern rotated by i*w_c and j*w_c, with frequencies w_c log-spaced in
//    [1/local_window, 1], so q_i.k_j decays with |i - j| (about logarithmically) and is largest
//    at distance 0. The remaining "content" dims hold the sink, stripe and needle features.
//  - Sinks: keys [0, sink_tokens) carry a sink feature every query matches: a high score on the
//    first tokens.
//  - Vertical stripes: about stripe_rate * N key positions per KV head (random, after the sinks)
//    carry one of 4 stripe features; stripe heads match some of the features, so every query of
//    the head scores those keys high (a vertical line in the attention map).
//  - Key salience: every key has a N(0, 1) salience value in one content dim, which the heads
//    weigh (stripe heads by 0.25-1 x salience_strength nats, other heads 0-0.5 x, diffuse heads
//    not at all): soft vertical stripes of every strength, so the selected fraction changes
//    smoothly with theta.
//  - Needles (retrieval heads): per KV head, `needles` keys in the first half of the sequence
//    get a random direction in the content subspace; a span of needle_query_rows consecutive
//    queries later on (at least N/4 further) of each retrieval head matches it strongly.
//  - Diffuse heads: weak sinks and locality, larger noise: no sharp anchor, little sparsity.
//  - Noise: i.i.d. normal q and k noise giving a background score std of background_noise
//    (diffuse_noise for diffuse heads). V is i.i.d. normal with std value_std.
// Head kinds are assigned to query heads by a seeded shuffle (fractions below; the rest are
// sink/local heads); every head's strengths get a seeded multiplier in
// [1 - sharpness_jitter, 1 + sharpness_jitter].
//
// Measured with the defaults (seed 0), theta = 12 and the spec defaults (B = 128, s = 16,
// n_init = n_loc = 1), CPU backend, Llama shape (Hq = 32, Hkv = 8, d = 128, bf16), 2026-11-22:
//   N      density  stripe density  output recall (tau 0.01)  attention mass mean / min
//   4k     1.000    0.000           1.000                     1.000 / 1.000
//   16k    0.435    0.091           0.920                     0.990 / 0.0005
//   32k    0.293    0.113           0.866                     0.980 / 0.010
//   64k    0.219    0.128           0.814                     0.969 / 0.005
//   128k   0.180    0.134           0.763                     0.954 / 0.0007
// (below N = 4097 no group has candidates, so every row attends to all of A(i) = [0, i]). By head
// kind at 32k: sink/local 0.29, stripe 0.21, retrieval 0.21, diffuse 1.0; the anchor region
// alone is 0.19 of the causal matrix at 32k and 0.047 at 128k. Densities vary with the seed
// (per-head sharpness is random). Generation takes about 2 s at N = 128k, 32 heads on 16 cores.
// Logs: bench/cpu/results/2026-11-22/.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_types.h"

namespace anchorserve {

enum class StructuredHeadKind { kSinkLocal, kStripe, kRetrieval, kDiffuse };

struct StructuredInputOptions {
  uint64_t seed = 0;

  // Fractions of query heads of each kind (rounded to whole heads); the rest are sink/local.
  float stripe_head_fraction = 0.375f;
  float retrieval_head_fraction = 0.125f;
  float diffuse_head_fraction = 0.0625f;

  int sink_tokens = 4;             // leading keys that act as attention sinks
  float sink_strength = 16.0f;     // sink score of sink/local, stripe and retrieval heads (nats)
  float local_strength = 8.0f;     // rotary score at distance 0 of sink/local heads (nats)
  int local_window = 512;          // distance (tokens) at which the rotary score has decayed to ~0
  double stripe_rate = 1.0 / 512;  // fraction of key positions that are stripes, per KV head
  float stripe_strength = 11.0f;   // stripe score of stripe heads (nats; scaled per key by 0.6-1)
  float salience_strength =
      3.0f;                     // score std of per-key salience for the most salience-driven heads
  int needles = 8;              // needle keys per KV head (retrieval heads look them up)
  int needle_query_rows = 128;  // consecutive query rows that look up one needle
  // The last question_rows rows of every retrieval head look up one needle (a question at the
  // end of the prompt about something far back). 0 = none.
  int question_rows = 0;
  float needle_strength = 18.0f;  // needle score of the looking-up rows (nats)
  float background_noise = 1.0f;  // score std of the i.i.d. noise (nats)
  float diffuse_noise = 1.5f;     // the same for diffuse heads
  float sharpness_jitter = 0.3f;  // per-head strength multiplier range, see above
  float value_std = 1.0f;         // V ~ N(0, value_std^2)
};

// Q/K/V bytes in `dtype` and `layout`: q [N, Hq, d] or [Hq, N, d], k and v likewise with Hkv.
struct HostQkv {
  AttentionShape shape;
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  std::vector<uint8_t> q, k, v;
  std::vector<StructuredHeadKind> head_kinds;  // [Hq]; empty for random inputs
};

// INVALID_ARGUMENT for bad shapes (as ValidateTask) or options (negative counts, fractions
// outside [0, 1] or summing above 1, non-finite strengths, local_window < 1).
absl::StatusOr<HostQkv> GenerateStructuredQkv(const AttentionShape& shape, DType dtype,
                                              Layout layout, const StructuredInputOptions& options);

// I.i.d. N(0, 1) q, k and v, rounded to `dtype`.
absl::StatusOr<HostQkv> GenerateRandomQkv(const AttentionShape& shape, DType dtype, Layout layout,
                                          uint64_t seed);

// Points task->shape/dtype/layout/q/k/v at `qkv` (which must outlive the task's run).
void BindInputs(const HostQkv& qkv, AttentionTask* task);

std::string_view StructuredHeadKindName(StructuredHeadKind kind);

}  // namespace anchorserve
