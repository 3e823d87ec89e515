#include "kernels/cpu/cpu_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

// How a task runs. KV heads are processed one after the other, each with all threads:
//  1. K and V of the KV head are converted once to fp32 (K as transposed key tiles
//     [d_pad, kTileKeys], V as rows [N, d_pad]); every query head of the KV head reads these, so
//     K/V are never copied per query head and the conversion cost is shared.
//  2. Dense mode: one work item per (query head, 64-row query tile), longest rows first; online
//     softmax over key tiles [0, last row], causal mask only where a tile crosses the diagonal.
//  3. Anchor mode, three passes:
//     a. Anchor: per (query head, query tile inside one group), online softmax over A(i), the
//        initial and the block-aligned local key ranges. Groups that identify no stripes
//        (C_g empty, theta = -inf) are final here; the others keep (m, l, acc) in a state buffer
//        [ratio, groups, G rounded up to 8, d_pad] (storing costs one write and one read of
//        acc; recomputing the anchor region would cost about 40% more work).
//     b. Identification: per group, for every query head of the KV head at once (the candidate
//        key tiles are shared): pooled queries and anchors, score tiles, fp32 comparison.
//     c. Sparse: per (query head, group, 256 rows): the selected keys are gathered into fp32
//        tiles of up to 512 keys and continue the online softmax from the state (no causal mask:
//        every stripe precedes the group); then the rows are written.
// Scores are kept in base 2 (q is pre-multiplied by scale * log2 e, in fp32); the identification
// works in natural units as the spec states it.
namespace anchorserve::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Sparse phase: query tiles of one work item share each gathered chunk of stripe keys, and a
// chunk holds this many key tiles. 4 x 4 keeps a work item's data (Q, state, chunk) in L2.
constexpr int kQueryTilesPerItem = 4;
constexpr int kGatherTiles = 4;

int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// 64-byte aligned, uninitialized float storage; Allocate reports failure instead of throwing.
class FloatBuffer {
 public:
  bool Allocate(int64_t count) {
    const size_t bytes = static_cast<size_t>(RoundUp(std::max<int64_t>(count, 1) * 4, 64));
    data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    return data_ != nullptr;
  }
  float* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
};

// Everything derived from the task once.
struct Problem {
  AttentionTask* task = nullptr;
  int64_t n = 0;
  int hq = 0, hkv = 0, ratio = 0, d = 0, d_pad = 0;
  TensorStrides q_strides{}, kv_strides{};
  size_t element_size = 0;
  float scale = 0;    // softmax scale
  float q_scale = 0;  // scale * log2(e): scores in base-2 units
  int64_t num_key_tiles = 0;
  // AnchorAttention geometry.
  int64_t group_size = 0, num_groups = 0, group_slots = 0;
  int64_t init_keys = 0;  // n_init * G
  int block_size = 0, step = 0, local_groups = 0;
  float theta = 0;
  bool mass = false;  // per-group thresholds from config.mass_target (section 8 of the spec)
};

struct GroupGeometry {
  int64_t row_begin = 0, row_end = 0;
  int64_t init_end = 0;                  // initial keys [0, init_end)
  int64_t local_begin = 0;               // local keys [local_begin, i]
  int64_t cand_begin = 0, cand_end = 0;  // candidates C_g; empty when equal
  bool HasCandidates() const { return cand_end > cand_begin; }
};

GroupGeometry Group(const Problem& p, int64_t g) {
  GroupGeometry geo;
  geo.row_begin = g * p.group_size;
  geo.row_end = std::min(p.n, geo.row_begin + p.group_size);
  geo.init_end = std::min(p.init_keys, p.n);
  const int64_t local_start = (g - p.local_groups + 1) * p.group_size;
  geo.local_begin = std::max(p.init_keys, local_start);
  geo.cand_begin = p.init_keys;
  geo.cand_end = std::max(p.init_keys, std::min(local_start, p.n));
  return geo;
}

// Stripe identification runs for the group (a non-empty C_g and a finite threshold).
bool Identifies(const Problem& p, const GroupGeometry& geo) {
  return geo.HasCandidates() && (p.mass || p.theta != kNegInf);
}

constexpr int kMassLevels = kMassThetaBins + 2;  // grid levels 0..kMassThetaBins, then "beyond"

// Mass-target selection state of one group and one query head (docs/anchorattention.md 8).
struct GroupMassHistogram {
  // [blocks, kMassLevels]: sum of exp(min(s_ij - x(i), ceiling)) over the candidates of each
  // level, i the block's sampled row.
  std::vector<double> block_mass;
  std::vector<int64_t> level_keys;  // [kMassLevels] candidates per level
  std::vector<uint8_t> key_level;   // [|C_g|] level of each candidate

  void Reset(int blocks, int64_t candidates) {
    block_mass.assign(static_cast<size_t>(blocks) * kMassLevels, 0.0);
    level_keys.assign(kMassLevels, 0);
    key_level.resize(static_cast<size_t>(candidates));
  }
};

struct MassChoice {
  float theta = INFINITY;  // +inf: keep every candidate
  int level = kMassLevels;
  double estimated_mass = 1.0;  // row-weighted mean over the group's blocks
};

// The smallest grid level whose estimated kept mass reaches the target; every candidate when
// none does or when the level keeps more than the density cap allows. `anchor_mass` [blocks]:
// sum_{j in A(i)} exp(s_ij - x(i)) of each block's sampled row; `block_rows` [blocks].
MassChoice ChooseMassLevel(const AnchorConfig& config, const GroupMassHistogram& histogram,
                           const double* anchor_mass, const int64_t* block_rows, int blocks,
                           int64_t candidates) {
  // p = 1 asks for every candidate; the estimate could only reach it by rounding.
  if (config.mass_target >= 1.0f) return MassChoice{};
  double rows = 0;
  std::vector<double> kept(blocks), total(blocks);
  for (int b = 0; b < blocks; ++b) {
    const double* mass = histogram.block_mass.data() + int64_t{b} * kMassLevels;
    total[b] = anchor_mass[b];
    for (int k = 0; k < kMassLevels; ++k) total[b] += mass[k];
    kept[b] = anchor_mass[b];
    rows += static_cast<double>(block_rows[b]);
  }
  int64_t kept_keys = 0;
  MassChoice choice;
  for (int k = 0; k <= kMassThetaBins; ++k) {
    double estimate = 0;
    for (int b = 0; b < blocks; ++b) {
      kept[b] += histogram.block_mass[int64_t{b} * kMassLevels + k];
      estimate += static_cast<double>(block_rows[b]) * kept[b] / total[b];
    }
    estimate /= rows;
    kept_keys += histogram.level_keys[k];
    if (estimate >= static_cast<double>(config.mass_target)) {
      if (static_cast<double>(kept_keys) >
          static_cast<double>(config.mass_density_cap) * static_cast<double>(candidates)) {
        return MassChoice{};
      }
      choice.theta = MassThetaAt(config, k);
      choice.level = k;
      choice.estimated_mass = estimate;
      return choice;
    }
  }
  return MassChoice{};
}

const uint8_t* ElementAt(const void* base, const Problem& p, TensorStrides strides, int64_t token,
                         int head) {
  return static_cast<const uint8_t*>(base) +
         (token * strides.token + head * strides.head) * static_cast<int64_t>(p.element_size);
}

// dst[0, d_pad): row `token` of `head`, converted to fp32, times `factor`, zero-padded.
void LoadRow(const void* base, const Problem& p, TensorStrides strides, int64_t token, int head,
             float factor, float* dst) {
  ConvertToFloat(ElementAt(base, p, strides, token, head), p.task->dtype, p.d, dst);
  if (factor != 1.0f) {
    for (int e = 0; e < p.d; ++e) dst[e] *= factor;
  }
  std::fill(dst + p.d, dst + p.d_pad, 0.0f);
}

// dst: [round_up(rows, kRowAlign), d_pad] query rows [row0, row0 + rows) of head h, scaled into
// base-2 score units; padding rows zero.
void LoadQueryTile(const Problem& p, int h, int64_t row0, int rows, float* dst) {
  for (int r = 0; r < rows; ++r) {
    LoadRow(p.task->q, p, p.q_strides, row0 + r, h, p.q_scale, dst + int64_t{r} * p.d_pad);
  }
  const int padded = static_cast<int>(RoundUp(rows, kRowAlign));
  std::fill(dst + int64_t{rows} * p.d_pad, dst + int64_t{padded} * p.d_pad, 0.0f);
}

void ResetState(const Problem& p, int rows, float* m, float* l, float* acc) {
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + RoundUp(rows, kRowAlign) * p.d_pad, 0.0f);
}

// Writes out = acc / l (and the natural-log LSE) for rows [row0, row0 + rows) of head h.
void FinalizeRows(const Problem& p, int h, int64_t row0, int rows, const float* m, const float* l,
                  const float* acc, float* row_scratch) {
  AttentionTask& task = *p.task;
  for (int r = 0; r < rows; ++r) {
    const float inverse = 1.0f / l[r];
    const float* src = acc + int64_t{r} * p.d_pad;
    for (int e = 0; e < p.d; ++e) row_scratch[e] = src[e] * inverse;
    void* dst = const_cast<uint8_t*>(ElementAt(task.out, p, p.q_strides, row0 + r, h));
    ConvertFromFloat(row_scratch, p.d, task.dtype, dst);
    if (task.maybe_lse != nullptr) {
      task.maybe_lse[h * p.n + row0 + r] = (m[r] + std::log2(l[r])) * kLn2;
    }
  }
}

// K and V of one KV head in fp32: kt [num_key_tiles, d_pad, kTileKeys] (each key tile
// transposed), v [num_key_tiles * kTileKeys, d_pad]. Padding is zero.
struct ConvertedKv {
  float* kt = nullptr;
  float* v = nullptr;
  const float* KeyTile(const Problem& p, int64_t tile) const {
    return kt + tile * p.d_pad * kTileKeys;
  }
  const float* ValueTile(const Problem& p, int64_t tile) const {
    return v + tile * kTileKeys * p.d_pad;
  }
};

void ConvertKvTile(const Problem& p, int kv_head, int64_t tile, const ConvertedKv& kv,
                   float* row_scratch) {
  float* kt = kv.kt + tile * p.d_pad * kTileKeys;
  float* v = kv.v + tile * kTileKeys * p.d_pad;
  std::fill(kt, kt + int64_t{p.d_pad} * kTileKeys, 0.0f);
  const int64_t key0 = tile * kTileKeys;
  const int keys = static_cast<int>(std::min<int64_t>(kTileKeys, p.n - key0));
  for (int c = 0; c < keys; ++c) {
    LoadRow(p.task->k, p, p.kv_strides, key0 + c, kv_head, 1.0f, row_scratch);
    for (int e = 0; e < p.d; ++e) kt[e * kTileKeys + c] = row_scratch[e];
    LoadRow(p.task->v, p, p.kv_strides, key0 + c, kv_head, 1.0f, v + int64_t{c} * p.d_pad);
  }
  std::fill(v + int64_t{keys} * p.d_pad, v + int64_t{kTileKeys} * p.d_pad, 0.0f);
}

// Online softmax of a query tile (rows [row0, row0 + rows)) over keys [key_begin, key_end),
// causally masked.
void AttendKeyRange(const TileKernels& kernels, const Problem& p, const ConvertedKv& kv,
                    const float* q_tile, int64_t row0, int rows, int64_t key_begin, int64_t key_end,
                    float* m, float* l, float* acc, float* scores) {
  key_end = std::min(key_end, row0 + rows);
  if (key_begin >= key_end) return;
  AttendTileArgs args;
  args.q = q_tile;
  args.rows = rows;
  args.d_pad = p.d_pad;
  args.row0 = row0;
  args.key_begin = key_begin;
  args.key_end = key_end;
  args.causal = true;
  args.m = m;
  args.l = l;
  args.acc = acc;
  args.scores = scores;
  for (int64_t tile = key_begin / kTileKeys; tile * kTileKeys < key_end; ++tile) {
    args.kt = kv.KeyTile(p, tile);
    args.v = kv.ValueTile(p, tile);
    args.key0 = tile * kTileKeys;
    args.num_keys = static_cast<int>(std::min<int64_t>(kTileKeys, p.n - args.key0));
    kernels.attend_tile(args);
  }
}

struct WorkerScratch {
  FloatBuffer q_tiles;    // [kQueryTilesPerItem * kTileRows, d_pad]
  FloatBuffer scores;     // [kTileRows, kTileKeys]
  FloatBuffer acc;        // [kTileRows, d_pad]
  FloatBuffer m, l;       // [kTileRows]
  FloatBuffer row;        // [d_pad]
  FloatBuffer gather_kt;  // [kGatherTiles, d_pad, kTileKeys]
  FloatBuffer gather_v;   // [kGatherTiles * kTileKeys, d_pad]
  // [round_up(rows, kRowAlign), d_pad]: scale * pooled queries (ratio * step rows), followed in
  // mass-target mode by scale * the sampled row of each block (ratio * step more).
  FloatBuffer pooled;
  FloatBuffer pooled_anchor;  // [rows]: abar_r, then the sampled rows' anchors x(i)
  FloatBuffer margins;        // [ratio, kTileKeys]
  // Mass-target mode only: each sampled row's s_ij - x(i) over the current key tile, and per
  // local head the group's histogram, sampled rows' anchor masses and block row counts.
  FloatBuffer gaps;                            // [ratio * step, kTileKeys]
  std::vector<GroupMassHistogram> histograms;  // [ratio]
  std::vector<double> anchor_mass;             // [ratio * step]
  std::vector<int64_t> block_rows;             // [step]

  bool Allocate(const Problem& p) {
    const int64_t pooled_rows = RoundUp(int64_t{p.ratio} * p.step * (p.mass ? 2 : 1), kRowAlign);
    bool ok = q_tiles.Allocate(int64_t{kQueryTilesPerItem} * kTileRows * p.d_pad) &&
              scores.Allocate(int64_t{kTileRows} * kTileKeys) &&
              acc.Allocate(int64_t{kTileRows} * p.d_pad) && m.Allocate(kTileRows) &&
              l.Allocate(kTileRows) && row.Allocate(p.d_pad) &&
              gather_kt.Allocate(int64_t{kGatherTiles} * p.d_pad * kTileKeys) &&
              gather_v.Allocate(int64_t{kGatherTiles} * kTileKeys * p.d_pad) &&
              pooled.Allocate(pooled_rows * p.d_pad) && pooled_anchor.Allocate(pooled_rows) &&
              margins.Allocate(int64_t{p.ratio} * kTileKeys) &&
              (!p.mass || gaps.Allocate(int64_t{p.ratio} * p.step * kTileKeys));
    if (!ok) return false;
    if (p.mass) {
      histograms.resize(p.ratio);
      anchor_mass.resize(static_cast<size_t>(p.ratio) * p.step);
      block_rows.resize(p.step);
    }
    // Gathered tiles and pooled rows are only ever partly written; the rest must stay finite.
    std::fill(gather_kt.get(), gather_kt.get() + int64_t{kGatherTiles} * p.d_pad * kTileKeys, 0.0f);
    std::fill(gather_v.get(), gather_v.get() + int64_t{kGatherTiles} * kTileKeys * p.d_pad, 0.0f);
    std::fill(pooled.get(), pooled.get() + pooled_rows * p.d_pad, 0.0f);
    return true;
  }
};

// Runs the task; see RunCpuAttention.
class CpuAttention {
 public:
  CpuAttention(AttentionTask* task, ThreadPool* pool, const TileKernels& kernels,
               std::vector<std::vector<int64_t>>* maybe_stripes,
               std::vector<float>* maybe_group_thetas)
      : pool_(*pool),
        kernels_(kernels),
        maybe_stripes_(maybe_stripes),
        maybe_group_thetas_(maybe_group_thetas) {
    Problem& p = problem_;
    p.task = task;
    const AttentionShape& shape = task->shape;
    p.n = shape.seq_len;
    p.hq = shape.num_q_heads;
    p.hkv = shape.num_kv_heads;
    p.ratio = shape.GqaRatio();
    p.d = shape.head_dim;
    p.d_pad = PaddedHeadDim(p.d);
    p.q_strides = StridesFor(task->layout, p.n, p.hq, p.d);
    p.kv_strides = StridesFor(task->layout, p.n, p.hkv, p.d);
    p.element_size = ElementSize(task->dtype);
    p.scale = task->config.ScaleFor(p.d);
    p.q_scale = p.scale * kLog2e;
    p.num_key_tiles = (p.n + kTileKeys - 1) / kTileKeys;
    const AnchorConfig& config = task->config;
    p.block_size = config.block_size;
    p.step = config.step;
    p.local_groups = config.local_groups;
    p.group_size = config.GroupSize();
    p.num_groups = (p.n + p.group_size - 1) / p.group_size;
    p.group_slots = RoundUp(std::min(p.group_size, p.n), kRowAlign);
    p.init_keys = int64_t{config.init_groups} * p.group_size;
    p.theta = config.theta;
    p.mass = config.UsesMassTarget();
  }

  absl::Status Run() {
    AttentionTask& task = *problem_.task;
    task.status = absl::OkStatus();
    task.times = StageTimes{};
    ANCHOR_RETURN_IF_ERROR(AllocateScratch());
    const bool dense = task.config.IsDense();
    for (int kv_head = 0; kv_head < problem_.hkv; ++kv_head) {
      if (task.Cancelled()) break;
      const auto start = std::chrono::steady_clock::now();
      ConvertKv(kv_head);
      if (dense) {
        DenseHead(kv_head);
        task.times.compute_seconds += SecondsSince(start);
      } else {
        task.times.identification_seconds += SecondsSince(start);
        AnchorHead(kv_head);
      }
    }
    if (task.Cancelled()) {
      task.status = absl::CancelledError("attention task cancelled");
      return absl::OkStatus();
    }
    FillHeadStats(dense);
    return absl::OkStatus();
  }

 private:
  absl::Status AllocateScratch() {
    const Problem& p = problem_;
    const int64_t kv_floats = p.num_key_tiles * kTileKeys * p.d_pad;
    if (!kt_.Allocate(kv_floats) || !v_.Allocate(kv_floats)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate ", 8 * kv_floats, " bytes for K/V"));
    }
    kv_.kt = kt_.get();
    kv_.v = v_.get();
    workers_.resize(pool_.num_threads());
    for (WorkerScratch& scratch : workers_) {
      if (!scratch.Allocate(p)) {
        return absl::ResourceExhaustedError("cpu backend: cannot allocate worker scratch");
      }
    }
    if (!p.task->config.IsDense()) {
      bool any_identification = false;
      for (int64_t g = 0; g < p.num_groups; ++g) any_identification |= Identifies(p, Group(p, g));
      if (any_identification) {
        const int64_t rows = int64_t{p.ratio} * p.num_groups * p.group_slots;
        if (!state_m_.Allocate(rows) || !state_l_.Allocate(rows) ||
            !state_acc_.Allocate(rows * p.d_pad)) {
          return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate ",
                                                           rows * (p.d_pad + 2) * 4,
                                                           " bytes of softmax state"));
        }
      }
      stripes_.assign(static_cast<size_t>(p.ratio * p.num_groups), {});
      stripe_counts_.assign(static_cast<size_t>(p.hq * p.num_groups), 0);
      group_choice_.assign(static_cast<size_t>(p.ratio * p.num_groups), MassChoice{});
      group_theta_.assign(static_cast<size_t>(p.hq * p.num_groups), NAN);
      group_mass_.assign(static_cast<size_t>(p.hq * p.num_groups), 1.0);
      if (maybe_stripes_ != nullptr) {
        maybe_stripes_->assign(static_cast<size_t>(p.hq * p.num_groups), {});
      }
    } else if (maybe_stripes_ != nullptr) {
      maybe_stripes_->clear();
    }
    if (maybe_group_thetas_ != nullptr) maybe_group_thetas_->clear();
    return absl::OkStatus();
  }

  void ConvertKv(int kv_head) {
    pool_.ParallelFor(problem_.num_key_tiles, [&](int64_t tile, int worker) {
      ConvertKvTile(problem_, kv_head, tile, kv_, workers_[worker].row.get());
    });
  }

  // Dense causal flash attention for the query heads of one KV head.
  void DenseHead(int kv_head) {
    const Problem& p = problem_;
    const int64_t num_tiles = (p.n + kTileRows - 1) / kTileRows;
    pool_.ParallelFor(num_tiles * p.ratio, [&](int64_t item, int worker) {
      if (p.task->Cancelled()) return;
      const int64_t tile = num_tiles - 1 - item / p.ratio;  // longest rows first
      const int h = kv_head * p.ratio + static_cast<int>(item % p.ratio);
      WorkerScratch& w = workers_[worker];
      const int64_t row0 = tile * kTileRows;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, p.n - row0));
      LoadQueryTile(p, h, row0, rows, w.q_tiles.get());
      ResetState(p, rows, w.m.get(), w.l.get(), w.acc.get());
      AttendKeyRange(kernels_, p, kv_, w.q_tiles.get(), row0, rows, 0, p.n, w.m.get(), w.l.get(),
                     w.acc.get(), w.scores.get());
      FinalizeRows(p, h, row0, rows, w.m.get(), w.l.get(), w.acc.get(), w.row.get());
    });
  }

  // Softmax state of (local query head, row) for rows of identifying groups.
  int64_t StateSlot(int local_head, int64_t row) const {
    const Problem& p = problem_;
    const int64_t g = row / p.group_size;
    return (int64_t{local_head} * p.num_groups + g) * p.group_slots + (row - g * p.group_size);
  }

  void AnchorHead(int kv_head) {
    const Problem& p = problem_;
    AttentionTask& task = *p.task;
    auto start = std::chrono::steady_clock::now();
    AnchorRegionPass(kv_head);
    if (task.Cancelled()) return;
    for (int hl = 0; hl < p.ratio; ++hl) {
      for (int64_t g = 0; g < p.num_groups; ++g) {
        stripes_[hl * p.num_groups + g].clear();
        group_choice_[hl * p.num_groups + g] = MassChoice{};
      }
    }
    std::vector<int64_t> identifying;  // groups, most candidates first
    for (int64_t g = p.num_groups - 1; g >= 0; --g) {
      if (Identifies(p, Group(p, g))) identifying.push_back(g);
    }
    if (!identifying.empty()) {
      pool_.ParallelFor(static_cast<int64_t>(identifying.size()), [&](int64_t item, int worker) {
        if (task.Cancelled()) return;
        IdentifyStripes(kv_head, identifying[item], workers_[worker]);
      });
    }
    task.times.identification_seconds += SecondsSince(start);
    if (task.Cancelled() || identifying.empty()) return;
    start = std::chrono::steady_clock::now();
    StripePass(kv_head, identifying);
    task.times.compute_seconds += SecondsSince(start);
    for (int hl = 0; hl < p.ratio; ++hl) {
      const int h = kv_head * p.ratio + hl;
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const std::vector<int32_t>& list = stripes_[hl * p.num_groups + g];
        stripe_counts_[h * p.num_groups + g] = static_cast<int64_t>(list.size());
        if (Identifies(p, Group(p, g))) {
          const MassChoice& choice = group_choice_[hl * p.num_groups + g];
          group_theta_[h * p.num_groups + g] = p.mass ? choice.theta : p.theta;
          group_mass_[h * p.num_groups + g] = choice.estimated_mass;
        }
        if (maybe_stripes_ != nullptr) {
          (*maybe_stripes_)[h * p.num_groups + g].assign(list.begin(), list.end());
        }
      }
    }
  }

  // Phase 1: online softmax over A(i) for every row. Rows of groups without identification are
  // final after it; the others keep (m, l, acc) in the state buffers.
  void AnchorRegionPass(int kv_head) {
    const Problem& p = problem_;
    struct TileRef {
      int64_t group, row0;
      int rows;
    };
    std::vector<TileRef> tiles;
    for (int64_t g = p.num_groups - 1; g >= 0; --g) {
      const GroupGeometry geo = Group(p, g);
      for (int64_t row0 = geo.row_begin; row0 < geo.row_end; row0 += kTileRows) {
        tiles.push_back(
            {g, row0, static_cast<int>(std::min<int64_t>(kTileRows, geo.row_end - row0))});
      }
    }
    pool_.ParallelFor(static_cast<int64_t>(tiles.size()) * p.ratio, [&](int64_t item, int worker) {
      if (p.task->Cancelled()) return;
      const TileRef& tile = tiles[item / p.ratio];
      const int hl = static_cast<int>(item % p.ratio);
      const int h = kv_head * p.ratio + hl;
      const GroupGeometry geo = Group(p, tile.group);
      WorkerScratch& w = workers_[worker];
      const bool keep_state = Identifies(p, geo);
      float* m = w.m.get();
      float* l = w.l.get();
      float* acc = w.acc.get();
      if (keep_state) {
        const int64_t slot = StateSlot(hl, tile.row0);
        m = state_m_.get() + slot;
        l = state_l_.get() + slot;
        acc = state_acc_.get() + slot * p.d_pad;
      }
      LoadQueryTile(p, h, tile.row0, tile.rows, w.q_tiles.get());
      ResetState(p, tile.rows, m, l, acc);
      AttendKeyRange(kernels_, p, kv_, w.q_tiles.get(), tile.row0, tile.rows, 0, geo.init_end, m, l,
                     acc, w.scores.get());
      AttendKeyRange(kernels_, p, kv_, w.q_tiles.get(), tile.row0, tile.rows, geo.local_begin, p.n,
                     m, l, acc, w.scores.get());
      if (!keep_state) FinalizeRows(p, h, tile.row0, tile.rows, m, l, acc, w.row.get());
    });
  }

  // Phase 2 for group g and every query head of the KV head: pooled queries and anchors, then
  // S_g = { j in C_g : max_r (scale * qbar_r . k_j - abar_r) >= -theta } in fp32. In mass-target
  // mode the last row of each block is scored too (exactly), for the estimate of kept mass.
  void IdentifyStripes(int kv_head, int64_t g, WorkerScratch& w) {
    const Problem& p = problem_;
    const GroupGeometry geo = Group(p, g);
    const int blocks = static_cast<int>(
        std::min<int64_t>(p.step, (geo.row_end - geo.row_begin + p.block_size - 1) / p.block_size));
    const int pooled_rows = p.ratio * blocks;
    const int scored_rows = pooled_rows * (p.mass ? 2 : 1);
    float* row = w.row.get();
    for (int hl = 0; hl < p.ratio; ++hl) {
      const int h = kv_head * p.ratio + hl;
      for (int b = 0; b < blocks; ++b) {
        const int64_t b0 = geo.row_begin + int64_t{b} * p.block_size;
        const int64_t b1 = std::min(geo.row_end, b0 + p.block_size);
        float* pooled = w.pooled.get() + int64_t{hl * blocks + b} * p.d_pad;
        std::fill(pooled, pooled + p.d_pad, 0.0f);
        double anchor_sum = 0;
        for (int64_t i = b0; i < b1; ++i) {
          LoadRow(p.task->q, p, p.q_strides, i, h, 1.0f, row);
          for (int e = 0; e < p.d; ++e) pooled[e] += row[e];
          anchor_sum += state_m_.get()[StateSlot(hl, i)];
        }
        if (p.mass) {
          // The block's last row, sampled: scale * q_i (natural units), its anchor x(i) and
          // anchor-region mass sum over A(i) of exp(s_ij - x(i)) (l relative to the running max).
          const int sampled = pooled_rows + hl * blocks + b;
          float* sampled_q = w.pooled.get() + int64_t{sampled} * p.d_pad;
          LoadRow(p.task->q, p, p.q_strides, b1 - 1, h, p.scale, sampled_q);
          w.pooled_anchor.get()[sampled] = state_m_.get()[StateSlot(hl, b1 - 1)] * kLn2;
          w.anchor_mass[hl * blocks + b] = state_l_.get()[StateSlot(hl, b1 - 1)];
          w.block_rows[b] = b1 - b0;
        }
        const float factor = p.scale / static_cast<float>(b1 - b0);
        for (int e = 0; e < p.d; ++e) pooled[e] *= factor;
        // The running max m is the anchor x(i) in base-2 units.
        w.pooled_anchor.get()[hl * blocks + b] =
            static_cast<float>(anchor_sum / static_cast<double>(b1 - b0)) * kLn2;
      }
    }
    const int padded_rows = static_cast<int>(RoundUp(scored_rows, kRowAlign));
    const int64_t candidates = geo.cand_end - geo.cand_begin;
    if (p.mass) {
      for (int hl = 0; hl < p.ratio; ++hl) w.histograms[hl].Reset(blocks, candidates);
    }
    float* margins = w.margins.get();
    float* scores = w.scores.get();
    const float min_margin = -p.theta;
    for (int64_t tile = geo.cand_begin / kTileKeys; tile * kTileKeys < geo.cand_end; ++tile) {
      const int64_t key0 = tile * kTileKeys;
      const int lo = static_cast<int>(std::max<int64_t>(0, geo.cand_begin - key0));
      const int hi = static_cast<int>(std::min<int64_t>(kTileKeys, geo.cand_end - key0));
      std::fill(margins, margins + int64_t{p.ratio} * kTileKeys, kNegInf);
      for (int r0 = 0; r0 < padded_rows; r0 += kTileRows) {
        const int chunk = std::min(kTileRows, padded_rows - r0);
        kernels_.score_tile(w.pooled.get() + int64_t{r0} * p.d_pad, chunk, p.d_pad,
                            kv_.KeyTile(p, tile), hi, scores);
        for (int r = 0; r < chunk && r0 + r < scored_rows; ++r) {
          const int scored_row = r0 + r;
          const float anchor = w.pooled_anchor.get()[scored_row];
          const float* score = scores + r * kTileKeys;
          if (scored_row >= pooled_rows) {  // a sampled row: s_ij - x(i)
            float* gap = w.gaps.get() + int64_t{scored_row - pooled_rows} * kTileKeys;
            for (int c = lo; c < hi; ++c) gap[c] = score[c] - anchor;
            continue;
          }
          float* margin = margins + (scored_row / blocks) * kTileKeys;
          for (int c = lo; c < hi; ++c) margin[c] = std::max(margin[c], score[c] - anchor);
        }
      }
      for (int hl = 0; hl < p.ratio; ++hl) {
        const float* margin = margins + hl * kTileKeys;
        if (p.mass) {
          AddToHistogram(key0 - geo.cand_begin, lo, hi, margin,
                         w.gaps.get() + int64_t{hl} * blocks * kTileKeys, blocks,
                         &w.histograms[hl]);
          continue;
        }
        std::vector<int32_t>& list = stripes_[hl * p.num_groups + g];
        for (int c = lo; c < hi; ++c) {
          if (margin[c] >= min_margin) list.push_back(static_cast<int32_t>(key0 + c));
        }
      }
    }
    if (!p.mass) return;
    for (int hl = 0; hl < p.ratio; ++hl) {
      const GroupMassHistogram& histogram = w.histograms[hl];
      const MassChoice choice =
          ChooseMassLevel(p.task->config, histogram, w.anchor_mass.data() + hl * blocks,
                          w.block_rows.data(), blocks, candidates);
      group_choice_[hl * p.num_groups + g] = choice;
      std::vector<int32_t>& list = stripes_[hl * p.num_groups + g];
      for (int64_t c = 0; c < candidates; ++c) {
        if (histogram.key_level[c] <= choice.level) {
          list.push_back(static_cast<int32_t>(geo.cand_begin + c));
        }
      }
    }
  }

  // Bins candidates [lo, hi) of one key tile (candidate index `first` at column 0) by grid level
  // of their margin, adding each block's sampled-row weight exp(s_ij - x(i)) to that level.
  void AddToHistogram(int64_t first, int lo, int hi, const float* margin, const float* gaps,
                      int blocks, GroupMassHistogram* histogram) const {
    const AnchorConfig& config = problem_.task->config;
    for (int c = lo; c < hi; ++c) {
      const int level = MassLevelOf(config, margin[c]);
      histogram->key_level[first + c] = static_cast<uint8_t>(level);
      ++histogram->level_keys[level];
      for (int b = 0; b < blocks; ++b) {
        const float gap = std::min(gaps[int64_t{b} * kTileKeys + c], kMassGapCeiling);
        histogram->block_mass[int64_t{b} * kMassLevels + level] += std::exp(gap);
      }
    }
  }

  // Phase 3: the selected keys of each group, gathered into dense fp32 tiles, continue the
  // online softmax of the group's rows; then every row of the group is final.
  void StripePass(int kv_head, const std::vector<int64_t>& identifying) {
    const Problem& p = problem_;
    struct Item {
      int64_t group, row0;
      int rows, local_head;
    };
    std::vector<Item> items;
    constexpr int kItemRows = kQueryTilesPerItem * kTileRows;
    for (int64_t g : identifying) {
      const GroupGeometry geo = Group(p, g);
      for (int hl = 0; hl < p.ratio; ++hl) {
        for (int64_t row0 = geo.row_begin; row0 < geo.row_end; row0 += kItemRows) {
          items.push_back(
              {g, row0, static_cast<int>(std::min<int64_t>(kItemRows, geo.row_end - row0)), hl});
        }
      }
    }
    // Most stripe work first.
    std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
      return stripes_[a.local_head * p.num_groups + a.group].size() * a.rows >
             stripes_[b.local_head * p.num_groups + b.group].size() * b.rows;
    });
    pool_.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t index, int worker) {
      if (p.task->Cancelled()) return;
      const Item& item = items[index];
      WorkerScratch& w = workers_[worker];
      const int h = kv_head * p.ratio + item.local_head;
      const std::vector<int32_t>& keys = stripes_[item.local_head * p.num_groups + item.group];
      const int num_tiles = (item.rows + kTileRows - 1) / kTileRows;
      for (int t = 0; t < num_tiles; ++t) {
        const int rows = std::min(kTileRows, item.rows - t * kTileRows);
        LoadQueryTile(p, h, item.row0 + int64_t{t} * kTileRows, rows,
                      w.q_tiles.get() + int64_t{t} * kTileRows * p.d_pad);
      }
      const int64_t slot0 = StateSlot(item.local_head, item.row0);
      constexpr int kChunkKeys = kGatherTiles * kTileKeys;
      for (size_t k0 = 0; k0 < keys.size(); k0 += kChunkKeys) {
        const int count = static_cast<int>(std::min<size_t>(kChunkKeys, keys.size() - k0));
        GatherKeys(kv_head, keys.data() + k0, count, w);
        for (int t = 0; t < num_tiles; ++t) {
          AttendTileArgs args;
          args.q = w.q_tiles.get() + int64_t{t} * kTileRows * p.d_pad;
          args.rows = std::min(kTileRows, item.rows - t * kTileRows);
          args.d_pad = p.d_pad;
          const int64_t slot = slot0 + int64_t{t} * kTileRows;
          args.m = state_m_.get() + slot;
          args.l = state_l_.get() + slot;
          args.acc = state_acc_.get() + slot * p.d_pad;
          args.scores = w.scores.get();
          args.causal = false;  // every stripe key precedes the group
          for (int kt = 0; kt * kTileKeys < count; ++kt) {
            args.kt = w.gather_kt.get() + int64_t{kt} * p.d_pad * kTileKeys;
            args.v = w.gather_v.get() + int64_t{kt} * kTileKeys * p.d_pad;
            args.num_keys = std::min(kTileKeys, count - kt * kTileKeys);
            args.key0 = 0;
            args.key_begin = 0;
            args.key_end = args.num_keys;
            kernels_.attend_tile(args);
          }
        }
      }
      for (int t = 0; t < num_tiles; ++t) {
        const int64_t slot = slot0 + int64_t{t} * kTileRows;
        FinalizeRows(p, h, item.row0 + int64_t{t} * kTileRows,
                     std::min(kTileRows, item.rows - t * kTileRows), state_m_.get() + slot,
                     state_l_.get() + slot, state_acc_.get() + slot * p.d_pad, w.row.get());
      }
    });
  }

  // w.gather_kt / w.gather_v <- keys[0, count) of the KV head, in fp32 (no per-head copy of K/V:
  // read from the converted K/V of this KV head).
  void GatherKeys(int kv_head, const int32_t* keys, int count, WorkerScratch& w) {
    const Problem& p = problem_;
    for (int k = 0; k < count; ++k) {
      const int64_t key = keys[k];
      const int64_t tile = key / kTileKeys;
      const int column = static_cast<int>(key - tile * kTileKeys);
      const float* src_kt = kv_.KeyTile(p, tile) + column;
      float* dst_kt =
          w.gather_kt.get() + int64_t{k / kTileKeys} * p.d_pad * kTileKeys + (k % kTileKeys);
      for (int e = 0; e < p.d; ++e) dst_kt[e * kTileKeys] = src_kt[e * kTileKeys];
      std::memcpy(w.gather_v.get() + int64_t{k} * p.d_pad, kv_.v + key * p.d_pad,
                  sizeof(float) * p.d_pad);
    }
  }

  void FillHeadStats(bool dense) {
    const Problem& p = problem_;
    AttentionTask& task = *p.task;
    task.head_stats.assign(p.hq, HeadStats{});
    if (dense) {
      for (HeadStats& stats : task.head_stats) stats.computed_entries = CausalEntries(p.n);
      return;
    }
    // sum_i |A(i)| is the same for every head.
    int64_t anchor_entries = 0;
    for (int64_t g = 0; g < p.num_groups; ++g) {
      const GroupGeometry geo = Group(p, g);
      for (int64_t i = geo.row_begin; i < geo.row_end; ++i) {
        anchor_entries +=
            std::min(geo.init_end, i + 1) + std::max<int64_t>(0, i + 1 - geo.local_begin);
      }
    }
    for (int h = 0; h < p.hq; ++h) {
      HeadStats& stats = task.head_stats[h];
      stats.computed_entries = anchor_entries;
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const GroupGeometry geo = Group(p, g);
        const int64_t rows = geo.row_end - geo.row_begin;
        if (p.mass) {
          const double mass = Identifies(p, geo) ? group_mass_[h * p.num_groups + g] : 1.0;
          stats.estimated_mass_sum += mass * static_cast<double>(rows);
          if (Identifies(p, geo)) AddMassTheta(group_theta_[h * p.num_groups + g], &stats);
        }
        if (!geo.HasCandidates()) continue;
        const int64_t count = stripe_counts_[h * p.num_groups + g];
        stats.stripe_entries += count * (geo.row_end - geo.row_begin);
        stats.stripes_min = stats.stripe_groups == 0 ? count : std::min(stats.stripes_min, count);
        stats.stripes_max = std::max(stats.stripes_max, count);
        stats.stripes_total += count;
        ++stats.stripe_groups;
      }
      stats.computed_entries += stats.stripe_entries;
    }
    if (maybe_group_thetas_ != nullptr) *maybe_group_thetas_ = group_theta_;
  }

  static void AddMassTheta(float theta, HeadStats* stats) {
    if (theta == INFINITY) {
      ++stats->mass_full_groups;
      return;
    }
    stats->mass_theta_min =
        stats->mass_groups == 0 ? theta : std::min(stats->mass_theta_min, theta);
    stats->mass_theta_max =
        stats->mass_groups == 0 ? theta : std::max(stats->mass_theta_max, theta);
    stats->mass_theta_sum += theta;
    ++stats->mass_groups;
  }

  Problem problem_;
  ThreadPool& pool_;
  const TileKernels& kernels_;
  std::vector<std::vector<int64_t>>* maybe_stripes_;
  std::vector<float>* maybe_group_thetas_;
  FloatBuffer kt_, v_;
  ConvertedKv kv_;
  std::vector<WorkerScratch> workers_;
  FloatBuffer state_m_, state_l_, state_acc_;
  std::vector<std::vector<int32_t>> stripes_;  // [ratio * num_groups] of the current KV head
  std::vector<int64_t> stripe_counts_;         // [Hq * num_groups]
  std::vector<MassChoice> group_choice_;       // [ratio * num_groups] of the current KV head
  std::vector<float> group_theta_;             // [Hq * num_groups]: NaN where none identified
  std::vector<double> group_mass_;             // [Hq * num_groups] estimated kept mass
};

}  // namespace

absl::Status RunCpuAttention(AttentionTask* task, ThreadPool* pool, const TileKernels& kernels,
                             std::vector<std::vector<int64_t>>* maybe_stripes,
                             std::vector<float>* maybe_group_thetas) {
  CpuAttention attention(task, pool, kernels, maybe_stripes, maybe_group_thetas);
  return attention.Run();
}

}  // namespace anchorserve::cpu
