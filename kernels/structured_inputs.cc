#include "kernels/structured_inputs.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

constexpr int kStripeKinds = 4;
constexpr int kTokensPerItem = 64;
constexpr double kTwoPi = 6.283185307179586;

enum TensorId : uint64_t { kTensorQ = 1, kTensorK = 2, kTensorV = 3, kTensorSalience = 4 };

uint64_t Mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Small seeded generator for the plan (positions, head kinds), independent of libstdc++'s
// distributions so a seed means the same inputs everywhere.
class PlanRng {
 public:
  explicit PlanRng(uint64_t seed) : state_(Mix64(seed ^ 0x5EED5EED5EED5EEDull)) {}
  uint64_t Next() { return Mix64(state_ += 0x9E3779B97F4A7C15ull); }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int64_t UniformInt(int64_t lo, int64_t hi) {                                // [lo, hi), hi > lo
    return lo + static_cast<int64_t>(Uniform() * static_cast<double>(hi - lo));
  }
  // Gaussian via Box-Muller (one of the pair).
  double Normal() {
    const double u1 = (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * Uniform());
  }

 private:
  uint64_t state_;
};

// dst[0, count) ~ N(0, stddev^2), a pure function of (row_key, index).
void FillNormal(uint64_t row_key, float stddev, int count, float* dst) {
  for (int i = 0; i < count; i += 2) {
    const uint64_t bits = Mix64(row_key + static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull);
    const float u1 = (static_cast<float>(bits >> 40) + 0.5f) * 0x1.0p-24f;
    const float u2 = static_cast<float>(bits & 0xFFFFFFu) * 0x1.0p-24f;
    const float radius = std::sqrt(-2.0f * std::log(u1)) * stddev;
    const float angle = static_cast<float>(kTwoPi) * u2;
    dst[i] = radius * std::cos(angle);
    if (i + 1 < count) dst[i + 1] = radius * std::sin(angle);
  }
}

uint64_t RowKey(uint64_t seed, TensorId tensor, int head, int64_t token) {
  return Mix64(Mix64(seed) + tensor * 0xA24BAED4963EE407ull +
               static_cast<uint64_t>(head) * 0x9FB21C651E98DF25ull +
               static_cast<uint64_t>(token) * 0xC2B2AE3D27D4EB4Full);
}

absl::Status ValidateShape(const AttentionShape& shape) {
  // ValidateTask checks shapes; reuse it with placeholder pointers.
  AttentionTask probe;
  probe.shape = shape;
  static const char kByte = 0;
  probe.q = probe.k = probe.v = &kByte;
  probe.out = const_cast<char*>(&kByte);
  return ValidateTask(probe);
}

HostQkv AllocateQkv(const AttentionShape& shape, DType dtype, Layout layout) {
  HostQkv qkv;
  qkv.shape = shape;
  qkv.dtype = dtype;
  qkv.layout = layout;
  const size_t element = ElementSize(dtype);
  qkv.q.resize(static_cast<size_t>(shape.seq_len) * shape.num_q_heads * shape.head_dim * element);
  qkv.k.resize(static_cast<size_t>(shape.seq_len) * shape.num_kv_heads * shape.head_dim * element);
  qkv.v.resize(qkv.k.size());
  return qkv;
}

void StoreRow(const float* row, const AttentionShape& shape, int num_heads, DType dtype,
              Layout layout, int64_t token, int head, std::vector<uint8_t>& tensor) {
  const TensorStrides strides = StridesFor(layout, shape.seq_len, num_heads, shape.head_dim);
  const int64_t offset = token * strides.token + head * strides.head;
  ConvertFromFloat(row, shape.head_dim, dtype,
                   tensor.data() + offset * static_cast<int64_t>(ElementSize(dtype)));
}

// Runs fn(first_token, end_token) over token chunks on all hardware threads.
template <typename Fn>
void ForTokenChunks(int64_t seq_len, Fn fn) {
  cpu::ThreadPool pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  const int64_t chunks = (seq_len + kTokensPerItem - 1) / kTokensPerItem;
  pool.ParallelFor(chunks, [&](int64_t chunk, int) {
    const int64_t begin = chunk * kTokensPerItem;
    fn(begin, std::min(seq_len, begin + kTokensPerItem));
  });
}

struct NeedleSpan {
  int64_t row_begin, row_end;
  int needle;
};

struct HeadPlan {
  StructuredHeadKind kind = StructuredHeadKind::kSinkLocal;
  float noise = 1;   // q noise std (k noise has std 1: score noise std in nats)
  float sink = 0;    // q coefficient on the sink dim
  float rotary = 0;  // q amplitude of the rotary pattern
  float stripe[kStripeKinds] = {};
  float needle = 0;    // q coefficient along a needle direction
  float salience = 0;  // q coefficient on the salience dim
  std::vector<NeedleSpan> spans;
};

struct KvPlan {
  std::vector<int64_t> stripe_positions;  // sorted
  std::vector<int> stripe_kinds;
  std::vector<float> stripe_weights;
  std::vector<int64_t> needle_positions;
  std::vector<std::vector<float>> needle_directions;  // unit vectors in the needle dims
};

struct Plan {
  int rotary_pairs = 0;
  int sink_dim = -1;               // -1 when the head dim has no room
  int stripe_dim0 = -1;            // stripe kind k lives in dim stripe_dim0 + k
  int salience_dim = -1;           // per-key salience feature
  int needle_dim0 = -1;            // needle directions span [needle_dim0, d)
  float key_amplitude = 0;         // k coefficient of every feature
  std::vector<float> frequencies;  // [rotary_pairs]
  std::vector<HeadPlan> heads;     // [Hq]
  std::vector<KvPlan> kv;          // [Hkv]
};

Plan MakePlan(const AttentionShape& shape, const StructuredInputOptions& o) {
  Plan plan;
  const int d = shape.head_dim;
  const int64_t n = shape.seq_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  PlanRng rng(o.seed);

  plan.rotary_pairs = d / 4;
  const int content0 = 2 * plan.rotary_pairs;
  if (d - content0 >= 1) plan.sink_dim = content0;
  if (d - content0 >= 1 + kStripeKinds) plan.stripe_dim0 = content0 + 1;
  if (d - content0 >= 2 + kStripeKinds) plan.salience_dim = content0 + 1 + kStripeKinds;
  if (d - content0 >= 3 + kStripeKinds) plan.needle_dim0 = content0 + 2 + kStripeKinds;
  // Balanced feature amplitudes: q and k coefficients of a 16-nat feature are equal.
  plan.key_amplitude = std::sqrt(16.0f / scale);
  const float to_q = 1.0f / (scale * plan.key_amplitude);  // nats -> q coefficient
  for (int c = 0; c < plan.rotary_pairs; ++c) {
    const double t = plan.rotary_pairs > 1 ? static_cast<double>(c) / (plan.rotary_pairs - 1) : 0;
    plan.frequencies.push_back(static_cast<float>(std::pow(1.0 / o.local_window, t)));
  }

  // Head kinds by a seeded shuffle.
  const int hq = shape.num_q_heads;
  std::vector<int> order(hq);
  std::iota(order.begin(), order.end(), 0);
  for (int i = hq - 1; i > 0; --i) std::swap(order[i], order[rng.UniformInt(0, i + 1)]);
  const int retrieval = static_cast<int>(std::lround(o.retrieval_head_fraction * hq));
  const int diffuse =
      std::min(hq - retrieval, static_cast<int>(std::lround(o.diffuse_head_fraction * hq)));
  const int stripe = std::min(hq - retrieval - diffuse,
                              static_cast<int>(std::lround(o.stripe_head_fraction * hq)));
  plan.heads.resize(hq);
  for (int i = 0; i < hq; ++i) {
    StructuredHeadKind kind = StructuredHeadKind::kSinkLocal;
    if (i < retrieval) {
      kind = StructuredHeadKind::kRetrieval;
    } else if (i < retrieval + diffuse) {
      kind = StructuredHeadKind::kDiffuse;
    } else if (i < retrieval + diffuse + stripe) {
      kind = StructuredHeadKind::kStripe;
    }
    plan.heads[order[i]].kind = kind;
  }
  for (HeadPlan& head : plan.heads) {
    const float sharp = 1.0f + o.sharpness_jitter * static_cast<float>(2 * rng.Uniform() - 1);
    // Stripe heads follow key salience most; diffuse heads not at all (set below).
    const double salience_share = head.kind == StructuredHeadKind::kStripe
                                      ? 0.25 + 0.75 * rng.Uniform()
                                      : 0.5 * rng.Uniform();
    head.salience = static_cast<float>(o.salience_strength * salience_share) * to_q;
    float sink = o.sink_strength * sharp;
    float local = 0.5f * o.local_strength * sharp;
    float stripe_all = 0.25f * o.stripe_strength;
    head.noise = o.background_noise;
    switch (head.kind) {
      case StructuredHeadKind::kSinkLocal:
        local = o.local_strength * sharp;
        break;
      case StructuredHeadKind::kStripe: {
        stripe_all = 0;
        bool any = false;
        for (int k = 0; k < kStripeKinds; ++k) {
          if (rng.Uniform() < 0.5) {
            head.stripe[k] = o.stripe_strength * sharp * to_q;
            any = true;
          }
        }
        if (!any) head.stripe[rng.UniformInt(0, kStripeKinds)] = o.stripe_strength * sharp * to_q;
        break;
      }
      case StructuredHeadKind::kRetrieval:
        head.needle = o.needle_strength * to_q;
        break;
      case StructuredHeadKind::kDiffuse:
        sink = 0.25f * o.sink_strength;
        local = 0.25f * o.local_strength;
        stripe_all = 0;
        head.salience = 0;
        head.noise = o.diffuse_noise;
        break;
    }
    head.sink = sink * to_q;
    head.rotary = local * to_q;
    if (stripe_all > 0) {
      for (float& coefficient : head.stripe) coefficient = stripe_all * to_q;
    }
  }

  // Per KV head: stripes and needles.
  plan.kv.resize(shape.num_kv_heads);
  const int ratio = shape.GqaRatio();
  for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
    KvPlan& kv = plan.kv[kvh];
    const int64_t first = std::min<int64_t>(o.sink_tokens, n - 1);
    if (plan.stripe_dim0 >= 0 && n - first > 0) {
      const int64_t count = std::max<int64_t>(1, std::llround(o.stripe_rate * n));
      for (int64_t s = 0; s < count; ++s) kv.stripe_positions.push_back(rng.UniformInt(first, n));
      std::sort(kv.stripe_positions.begin(), kv.stripe_positions.end());
      kv.stripe_positions.erase(std::unique(kv.stripe_positions.begin(), kv.stripe_positions.end()),
                                kv.stripe_positions.end());
      for (size_t s = 0; s < kv.stripe_positions.size(); ++s) {
        kv.stripe_kinds.push_back(static_cast<int>(rng.UniformInt(0, kStripeKinds)));
        kv.stripe_weights.push_back(static_cast<float>(0.6 + 0.4 * rng.Uniform()));
      }
    }
    if (plan.needle_dim0 >= 0 && n / 2 > first) {
      const int needle_dims = d - plan.needle_dim0;
      for (int needle = 0; needle < o.needles; ++needle) {
        const int64_t position = rng.UniformInt(first, n / 2);
        std::vector<float> direction(needle_dims);
        double norm = 0;
        for (float& x : direction) {
          x = static_cast<float>(rng.Normal());
          norm += double{x} * x;
        }
        for (float& x : direction) x = static_cast<float>(x / std::sqrt(norm));
        kv.needle_positions.push_back(position);
        kv.needle_directions.push_back(std::move(direction));
        // Each retrieval head of this KV head looks the needle up from one span of queries.
        const int64_t rows = std::min<int64_t>(o.needle_query_rows, n);
        const int64_t earliest = position + std::max<int64_t>(1, n / 4);
        if (earliest > n - rows) continue;
        for (int h = kvh * ratio; h < (kvh + 1) * ratio; ++h) {
          if (plan.heads[h].kind != StructuredHeadKind::kRetrieval) continue;
          const int64_t begin = rng.UniformInt(earliest, n - rows + 1);
          plan.heads[h].spans.push_back({begin, begin + rows, needle});
        }
      }
    }
  }
  // The question at the end: the last question_rows rows of each retrieval head look up one of
  // its KV head's needles. A stream of its own, so the rest of the plan does not depend on it.
  PlanRng question_rng(o.seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t question_rows = std::min<int64_t>(o.question_rows, n);
  for (int h = 0; h < shape.num_q_heads && question_rows > 0; ++h) {
    const KvPlan& kv = plan.kv[h / ratio];
    if (plan.heads[h].kind != StructuredHeadKind::kRetrieval || kv.needle_positions.empty()) {
      continue;
    }
    const int needle = static_cast<int>(
        question_rng.UniformInt(0, static_cast<int64_t>(kv.needle_positions.size())));
    plan.heads[h].spans.push_back({n - question_rows, n, needle});
  }
  return plan;
}

absl::Status ValidateOptions(const StructuredInputOptions& o) {
  const float fractions[] = {o.stripe_head_fraction, o.retrieval_head_fraction,
                             o.diffuse_head_fraction};
  for (float f : fractions) {
    if (!(f >= 0.0f && f <= 1.0f)) {
      return absl::InvalidArgumentError("head fractions must be in [0, 1]");
    }
  }
  if (o.stripe_head_fraction + o.retrieval_head_fraction + o.diffuse_head_fraction > 1.0001f) {
    return absl::InvalidArgumentError("head fractions must sum to at most 1");
  }
  const float values[] = {o.sink_strength,     o.local_strength,   o.stripe_strength,
                          o.salience_strength, o.needle_strength,  o.background_noise,
                          o.diffuse_noise,     o.sharpness_jitter, o.value_std};
  for (float value : values) {
    if (!std::isfinite(value) || value < 0.0f) {
      return absl::InvalidArgumentError("strengths, noise levels and jitter must be finite, >= 0");
    }
  }
  if (o.sharpness_jitter > 1.0f) {
    return absl::InvalidArgumentError("sharpness_jitter must be at most 1");
  }
  if (!(o.stripe_rate >= 0.0 && o.stripe_rate <= 1.0)) {
    return absl::InvalidArgumentError("stripe_rate must be in [0, 1]");
  }
  if (o.question_rows < 0) return absl::InvalidArgumentError("question_rows must be >= 0");
  if (o.sink_tokens < 0 || o.needles < 0 || o.needles > 4096 || o.needle_query_rows < 1) {
    return absl::InvalidArgumentError(
        "sink_tokens must be >= 0, needles in [0, 4096], needle_query_rows >= 1");
  }
  if (o.local_window < 1) return absl::InvalidArgumentError("local_window must be >= 1");
  return absl::OkStatus();
}

}  // namespace

std::string_view StructuredHeadKindName(StructuredHeadKind kind) {
  switch (kind) {
    case StructuredHeadKind::kSinkLocal:
      return "sink_local";
    case StructuredHeadKind::kStripe:
      return "stripe";
    case StructuredHeadKind::kRetrieval:
      return "retrieval";
    case StructuredHeadKind::kDiffuse:
      return "diffuse";
  }
  return "unknown";
}

absl::StatusOr<HostQkv> GenerateStructuredQkv(const AttentionShape& shape, DType dtype,
                                              Layout layout,
                                              const StructuredInputOptions& options) {
  ANCHOR_RETURN_IF_ERROR(ValidateShape(shape));
  ANCHOR_RETURN_IF_ERROR(ValidateOptions(options));
  const Plan plan = MakePlan(shape, options);
  HostQkv qkv = AllocateQkv(shape, dtype, layout);
  for (const HeadPlan& head : plan.heads) qkv.head_kinds.push_back(head.kind);
  const int d = shape.head_dim;
  const uint64_t seed = options.seed;
  const float rotary_weight = plan.rotary_pairs > 0 ? 1.0f / std::sqrt(plan.rotary_pairs) : 0;
  const float key_rotary = plan.key_amplitude * rotary_weight;

  ForTokenChunks(shape.seq_len, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d + 1);
    std::vector<float> cosines(plan.rotary_pairs), sines(plan.rotary_pairs);
    for (int64_t t = begin; t < end; ++t) {
      for (int c = 0; c < plan.rotary_pairs; ++c) {
        const double angle = static_cast<double>(t) * plan.frequencies[c];
        cosines[c] = static_cast<float>(std::cos(angle));
        sines[c] = static_cast<float>(std::sin(angle));
      }
      // Queries.
      for (int h = 0; h < shape.num_q_heads; ++h) {
        const HeadPlan& head = plan.heads[h];
        FillNormal(RowKey(seed, kTensorQ, h, t), head.noise, d, row.data());
        const float amplitude = head.rotary * rotary_weight;
        for (int c = 0; c < plan.rotary_pairs; ++c) {
          row[2 * c] += amplitude * cosines[c];
          row[2 * c + 1] += amplitude * sines[c];
        }
        if (plan.sink_dim >= 0) row[plan.sink_dim] += head.sink;
        if (plan.stripe_dim0 >= 0) {
          for (int k = 0; k < kStripeKinds; ++k) row[plan.stripe_dim0 + k] += head.stripe[k];
        }
        if (plan.salience_dim >= 0) row[plan.salience_dim] += head.salience;
        for (const NeedleSpan& span : head.spans) {
          if (t < span.row_begin || t >= span.row_end) continue;
          const std::vector<float>& direction =
              plan.kv[h / shape.GqaRatio()].needle_directions[span.needle];
          for (size_t e = 0; e < direction.size(); ++e) {
            row[plan.needle_dim0 + e] += head.needle * direction[e];
          }
        }
        StoreRow(row.data(), shape, shape.num_q_heads, dtype, layout, t, h, qkv.q);
      }
      // Keys and values.
      for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
        const KvPlan& kv = plan.kv[kvh];
        FillNormal(RowKey(seed, kTensorK, kvh, t), 1.0f, d, row.data());
        for (int c = 0; c < plan.rotary_pairs; ++c) {
          row[2 * c] += key_rotary * cosines[c];
          row[2 * c + 1] += key_rotary * sines[c];
        }
        // Feature dims carry no noise: only sink/stripe keys have a value there.
        if (plan.sink_dim >= 0) {
          row[plan.sink_dim] = t < options.sink_tokens ? plan.key_amplitude : 0.0f;
        }
        if (plan.stripe_dim0 >= 0) {
          for (int k = 0; k < kStripeKinds; ++k) row[plan.stripe_dim0 + k] = 0.0f;
          auto it = std::lower_bound(kv.stripe_positions.begin(), kv.stripe_positions.end(), t);
          if (it != kv.stripe_positions.end() && *it == t) {
            const size_t s = it - kv.stripe_positions.begin();
            row[plan.stripe_dim0 + kv.stripe_kinds[s]] = plan.key_amplitude * kv.stripe_weights[s];
          }
        }
        if (plan.salience_dim >= 0) {
          float salience;
          FillNormal(RowKey(seed, kTensorSalience, kvh, t), 1.0f, 1, &salience);
          row[plan.salience_dim] = plan.key_amplitude * salience;
        }
        for (size_t needle = 0; needle < kv.needle_positions.size(); ++needle) {
          if (kv.needle_positions[needle] != t) continue;
          const std::vector<float>& direction = kv.needle_directions[needle];
          for (size_t e = 0; e < direction.size(); ++e) {
            row[plan.needle_dim0 + e] += plan.key_amplitude * direction[e];
          }
        }
        StoreRow(row.data(), shape, shape.num_kv_heads, dtype, layout, t, kvh, qkv.k);
        FillNormal(RowKey(seed, kTensorV, kvh, t), options.value_std, d, row.data());
        StoreRow(row.data(), shape, shape.num_kv_heads, dtype, layout, t, kvh, qkv.v);
      }
    }
  });
  return qkv;
}

absl::StatusOr<HostQkv> GenerateRandomQkv(const AttentionShape& shape, DType dtype, Layout layout,
                                          uint64_t seed) {
  ANCHOR_RETURN_IF_ERROR(ValidateShape(shape));
  HostQkv qkv = AllocateQkv(shape, dtype, layout);
  const int d = shape.head_dim;
  ForTokenChunks(shape.seq_len, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d + 1);
    for (int64_t t = begin; t < end; ++t) {
      for (int h = 0; h < shape.num_q_heads; ++h) {
        FillNormal(RowKey(seed, kTensorQ, h, t), 1.0f, d, row.data());
        StoreRow(row.data(), shape, shape.num_q_heads, dtype, layout, t, h, qkv.q);
      }
      for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
        FillNormal(RowKey(seed, kTensorK, kvh, t), 1.0f, d, row.data());
        StoreRow(row.data(), shape, shape.num_kv_heads, dtype, layout, t, kvh, qkv.k);
        FillNormal(RowKey(seed, kTensorV, kvh, t), 1.0f, d, row.data());
        StoreRow(row.data(), shape, shape.num_kv_heads, dtype, layout, t, kvh, qkv.v);
      }
    }
  });
  return qkv;
}

void BindInputs(const HostQkv& qkv, AttentionTask* task) {
  task->shape = qkv.shape;
  task->dtype = qkv.dtype;
  task->layout = qkv.layout;
  task->q = qkv.q.data();
  task->k = qkv.k.data();
  task->v = qkv.v.data();
}

}  // namespace anchorserve
