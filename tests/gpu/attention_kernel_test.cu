// Attention compute kernels (kernels/cuda/attention_launch.h) against an fp64 host evaluation of
// the same key sets: dense causal, and sparse = anchor region + given stripe lists.
//
// Every run poisons the outputs (NaN) first and checks that every row of every head was written
// and finite, that padding around sequences was neither read (it holds NaN inputs) nor written,
// and compares the checked rows elementwise with tolerances derived from the dtype:
//   |out - ref| <= 1.5 u (|ref| + max|v|)    (u = unit roundoff of bf16 / fp16)
// which covers rounding the output and P (the softmax weights fed to the PV product) to the
// input dtype; the fp32 accumulations are far below that. LSE: |lse - ref| <= 5e-4.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/attention_kernel.cuh"
#include "kernels/cuda/attention_launch.h"

namespace anchorserve::cuda {
namespace {

constexpr int64_t kPadElements = 64;  // NaN padding before each sequence's q/k/v/out block

bool HasGpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

uint16_t ToBits(float x, ElemType type) {
  uint16_t bits;
  if (type == ElemType::kBf16) {
    const __nv_bfloat16 value = __float2bfloat16_rn(x);
    std::memcpy(&bits, &value, 2);
  } else {
    const __half value = __float2half_rn(x);
    std::memcpy(&bits, &value, 2);
  }
  return bits;
}

float FromBits(uint16_t bits, ElemType type) {
  if (type == ElemType::kBf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

constexpr uint16_t kNanBits = 0xFFFF;  // NaN in both bf16 and fp16

// Device buffer that frees itself.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  cudaError_t Allocate(size_t bytes) {
    bytes_ = std::max<size_t>(bytes, 16);
    return cudaMalloc(&ptr_, bytes_);
  }
  template <typename T>
  cudaError_t Upload(const std::vector<T>& host) {
    cudaError_t error = Allocate(host.size() * sizeof(T));
    if (error != cudaSuccess) return error;
    return cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  cudaError_t Download(std::vector<T>* host) const {
    return cudaMemcpy(host->data(), ptr_, host->size() * sizeof(T), cudaMemcpyDeviceToHost);
  }
  template <typename T>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Case {
  ElemType type = ElemType::kBf16;
  int head_dim = 128;
  int hq = 8;
  int hkv = 2;
  bool head_major = false;
  std::vector<int32_t> seq_lens;
  bool sparse = false;
  AnchorGeometry geometry{2048, 128, 16, 1, 1};
  double stripe_density = 0.0;
  bool with_lse = true;
  // NaN padding between sequences too (else only before the first and after the last: then
  // token-major K/V form one strided tensor and whole key tiles are copied in bulk).
  bool pad_between = true;
  int sampled_rows = 0;  // 0: check every row; else this many random rows (+ boundaries)
  uint64_t seed = 1;
};

std::string Describe(const Case& c) {
  std::string lens;
  for (int32_t n : c.seq_lens) lens += std::to_string(n) + " ";
  return std::string(c.type == ElemType::kBf16 ? "bf16" : "fp16") +
         " d=" + std::to_string(c.head_dim) + " Hq=" + std::to_string(c.hq) +
         " Hkv=" + std::to_string(c.hkv) + (c.head_major ? " head-major" : " token-major") +
         (c.sparse ? " sparse G=" + std::to_string(c.geometry.group_size) +
                         " n_init=" + std::to_string(c.geometry.init_groups) +
                         " n_loc=" + std::to_string(c.geometry.local_groups) +
                         " density=" + std::to_string(c.stripe_density)
                   : " dense") +
         " seq_lens=[ " + lens + "]" + (c.pad_between ? "" : " packed") +
         " seed=" + std::to_string(c.seed);
}

// Host copy of one batch: inputs (as stored bits and as the floats they represent), layout,
// stripe lists and query tiles.
struct Batch {
  Case c;
  std::vector<SeqDesc> seqs;
  std::vector<uint16_t> q_bits, k_bits, v_bits;
  std::vector<float> q, k, v;
  size_t q_elems = 0, kv_elems = 0, lse_elems = 0;
  std::vector<int64_t> list_offset;  // [batch groups * Hq]
  std::vector<int32_t> count;
  std::vector<int32_t> index;
  std::vector<QueryTile> tiles;
  float scale = 0;

  float Q(const SeqDesc& s, int tok, int h, int c) const {
    return q[s.q_offset + tok * s.q_token_stride + h * s.q_head_stride + c];
  }
  float K(const SeqDesc& s, int tok, int h, int c) const {
    return k[s.kv_offset + tok * s.kv_token_stride + h * s.kv_head_stride + c];
  }
  float V(const SeqDesc& s, int tok, int h, int c) const {
    return v[s.kv_offset + tok * s.kv_token_stride + h * s.kv_head_stride + c];
  }
};

Batch MakeBatch(const Case& c) {
  Batch b;
  b.c = c;
  b.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::mt19937_64 rng(c.seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const int d = c.head_dim;
  int64_t q_at = 0, kv_at = 0, lse_at = 0;
  int32_t group_at = 0;
  const int32_t group_size = c.geometry.group_size;
  for (int32_t n : c.seq_lens) {
    SeqDesc s{};
    if (c.pad_between || b.seqs.empty()) {
      q_at += kPadElements;
      kv_at += kPadElements;
    }
    s.q_offset = q_at;
    s.kv_offset = kv_at;
    s.seq_len = n;
    s.q_token_stride = c.head_major ? d : int64_t{c.hq} * d;
    s.q_head_stride = c.head_major ? int64_t{n} * d : d;
    s.kv_token_stride = c.head_major ? d : int64_t{c.hkv} * d;
    s.kv_head_stride = c.head_major ? int64_t{n} * d : d;
    s.lse_offset = lse_at;
    s.group_begin = group_at;
    q_at += int64_t{n} * c.hq * d;
    kv_at += int64_t{n} * c.hkv * d;
    lse_at += int64_t{n} * c.hq;
    group_at += (n + group_size - 1) / group_size;
    b.seqs.push_back(s);
  }
  b.q_elems = q_at + kPadElements;
  b.kv_elems = kv_at + kPadElements;
  b.lse_elems = lse_at;
  b.q_bits.assign(b.q_elems, kNanBits);
  b.k_bits.assign(b.kv_elems, kNanBits);
  b.v_bits.assign(b.kv_elems, kNanBits);
  b.q.assign(b.q_elems, NAN);
  b.k.assign(b.kv_elems, NAN);
  b.v.assign(b.kv_elems, NAN);
  // Scores of spread ~1 (q scaled by 3) so that softmax maxima move between key tiles.
  auto fill = [&](std::vector<uint16_t>* bits, std::vector<float>* values, int64_t offset,
                  int64_t count, float amplitude) {
    for (int64_t i = 0; i < count; ++i) {
      const uint16_t stored = ToBits(amplitude * uniform(rng), c.type);
      (*bits)[offset + i] = stored;
      (*values)[offset + i] = FromBits(stored, c.type);
    }
  };
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    const SeqDesc& s = b.seqs[i];
    fill(&b.q_bits, &b.q, s.q_offset, int64_t{s.seq_len} * c.hq * d, 3.0f);
    fill(&b.k_bits, &b.k, s.kv_offset, int64_t{s.seq_len} * c.hkv * d, 1.0f);
    fill(&b.v_bits, &b.v, s.kv_offset, int64_t{s.seq_len} * c.hkv * d, 1.0f);
  }
  if (c.sparse) {
    std::bernoulli_distribution pick(c.stripe_density);
    const int64_t init_end = int64_t{c.geometry.init_groups} * group_size;
    int64_t at = 0;
    for (const SeqDesc& s : b.seqs) {
      const int32_t groups = (s.seq_len + group_size - 1) / group_size;
      for (int32_t g = 0; g < groups; ++g) {
        // Candidates C_g = [n_init*G, (g-n_loc+1)*G).
        const int64_t cand_end = int64_t{g - c.geometry.local_groups + 1} * group_size;
        for (int h = 0; h < c.hq; ++h) {
          b.list_offset.push_back(at);
          int32_t chosen = 0;
          for (int64_t j = init_end; j < cand_end; ++j) {
            if (pick(rng)) {
              b.index.push_back(static_cast<int32_t>(j));
              ++chosen;
            }
          }
          // Lists are laid out by their bound |C_g|; the tail stays unused (-1).
          const int64_t bound = std::max<int64_t>(0, cand_end - init_end);
          b.index.resize(at + bound, -1);
          b.count.push_back(chosen);
          at += bound;
        }
      }
    }
    if (b.index.empty()) b.index.push_back(-1);
  }
  b.tiles = BuildQueryTiles(c.seq_lens, group_size);
  return b;
}

// Key positions row i of (sequence s, head h) attends, as the spec defines them.
std::vector<int32_t> KeySet(const Batch& b, size_t seq_index, int h, int32_t i) {
  std::vector<int32_t> keys;
  if (!b.c.sparse) {
    for (int32_t j = 0; j <= i; ++j) keys.push_back(j);
    return keys;
  }
  const AnchorGeometry& geo = b.c.geometry;
  const int64_t group_size = geo.group_size;
  const int64_t g = i / group_size;
  const int64_t init_end = int64_t{geo.init_groups} * group_size;
  const int64_t local_begin = std::max(init_end, (g - geo.local_groups + 1) * group_size);
  for (int64_t j = 0; j < std::min<int64_t>(init_end, i + 1); ++j) keys.push_back(j);
  for (int64_t j = local_begin; j <= i; ++j) keys.push_back(j);
  const SeqDesc& s = b.seqs[seq_index];
  const int64_t slot = (s.group_begin + g) * b.c.hq + h;
  for (int32_t u = 0; u < b.count[slot]; ++u) keys.push_back(b.index[b.list_offset[slot] + u]);
  return keys;
}

struct RefRow {
  std::vector<double> out;
  double lse;
};

RefRow Reference(const Batch& b, size_t seq_index, int h, int32_t i) {
  const SeqDesc& s = b.seqs[seq_index];
  const int d = b.c.head_dim;
  const int kvh = h / (b.c.hq / b.c.hkv);
  const std::vector<int32_t> keys = KeySet(b, seq_index, h, i);
  std::vector<double> scores(keys.size());
  double max_score = -INFINITY;
  for (size_t u = 0; u < keys.size(); ++u) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += double{b.Q(s, i, h, c)} * b.K(s, keys[u], kvh, c);
    scores[u] = dot * b.scale;
    max_score = std::max(max_score, scores[u]);
  }
  RefRow row;
  row.out.assign(d, 0.0);
  double sum = 0;
  for (size_t u = 0; u < keys.size(); ++u) {
    const double w = std::exp(scores[u] - max_score);
    sum += w;
    for (int c = 0; c < d; ++c) row.out[c] += w * b.V(s, keys[u], kvh, c);
  }
  for (int c = 0; c < d; ++c) row.out[c] /= sum;
  row.lse = max_score + std::log(sum);
  return row;
}

std::vector<int32_t> RowsToCheck(const Case& c, int32_t n, std::mt19937_64* rng) {
  std::vector<int32_t> rows;
  if (c.sampled_rows == 0) {
    for (int32_t i = 0; i < n; ++i) rows.push_back(i);
    return rows;
  }
  std::set<int32_t> picked;
  for (int32_t r : {0, 1, 2, n / 2, n - 2, n - 1}) picked.insert(r);
  for (int32_t boundary : {kAttentionTileRows, c.geometry.group_size}) {
    for (int32_t at = boundary; at < n && picked.size() < 200; at += boundary * 7) {
      picked.insert(at - 1);
      picked.insert(at);
    }
  }
  std::uniform_int_distribution<int32_t> any(0, n - 1);
  for (int k = 0; k < c.sampled_rows; ++k) picked.insert(any(*rng));
  for (int32_t r : picked) {
    if (r >= 0 && r < n) rows.push_back(r);
  }
  return rows;
}

struct DeviceOutputs {
  std::vector<uint16_t> out;
  std::vector<float> lse;
};

// Uploads, launches (outputs poisoned first), downloads.
void RunOnDevice(const Batch& b, DeviceOutputs* result) {
  const Case& c = b.c;
  DeviceBuffer q, k, v, out, lse, seqs, tiles, offsets, counts, index;
  ASSERT_EQ(q.Upload(b.q_bits), cudaSuccess);
  ASSERT_EQ(k.Upload(b.k_bits), cudaSuccess);
  ASSERT_EQ(v.Upload(b.v_bits), cudaSuccess);
  ASSERT_EQ(out.Allocate(b.q_elems * 2), cudaSuccess);
  ASSERT_EQ(cudaMemset(out.get<void>(), 0xFF, b.q_elems * 2), cudaSuccess);  // NaN
  ASSERT_EQ(lse.Allocate(b.lse_elems * 4), cudaSuccess);
  ASSERT_EQ(cudaMemset(lse.get<void>(), 0xFF, b.lse_elems * 4), cudaSuccess);  // NaN
  ASSERT_EQ(seqs.Upload(b.seqs), cudaSuccess);
  ASSERT_EQ(tiles.Upload(b.tiles), cudaSuccess);

  AttentionParams params{};
  params.elem_type = c.type;
  params.num_q_heads = c.hq;
  params.num_kv_heads = c.hkv;
  params.head_dim = c.head_dim;
  params.softmax_scale = b.scale;
  params.q = q.get<void>();
  params.k = k.get<void>();
  params.v = v.get<void>();
  params.out = out.get<void>();
  params.maybe_lse = c.with_lse ? lse.get<float>() : nullptr;
  params.seqs = seqs.get<SeqDesc>();
  params.num_seqs = static_cast<int32_t>(b.seqs.size());
  params.kv_tensor = UniformKvTensor(b.seqs);
  params.tiles = tiles.get<QueryTile>();
  params.num_tiles = static_cast<int32_t>(b.tiles.size());
  params.sparse = c.sparse;
  params.geometry = c.geometry;
  if (c.sparse) {
    ASSERT_EQ(offsets.Upload(b.list_offset), cudaSuccess);
    ASSERT_EQ(counts.Upload(b.count), cudaSuccess);
    ASSERT_EQ(index.Upload(b.index), cudaSuccess);
    params.stripes.list_offset = offsets.get<int64_t>();
    params.stripes.count = counts.get<int32_t>();
    params.stripes.index = index.get<int32_t>();
  }
  const LaunchResult launched = LaunchAttention(params, nullptr);
  ASSERT_TRUE(launched.ok()) << (launched.precondition_failed()
                                     ? launched.what
                                     : cudaGetErrorString(launched.code));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  result->out.assign(b.q_elems, 0);
  result->lse.assign(b.lse_elems, 0.0f);
  ASSERT_EQ(out.Download(&result->out), cudaSuccess);
  ASSERT_EQ(lse.Download(&result->lse), cudaSuccess);
}

void CheckCase(const Case& c) {
  if (!HasGpu()) GTEST_SKIP() << "no CUDA device";
  SCOPED_TRACE(Describe(c));
  const Batch b = MakeBatch(c);
  DeviceOutputs dev;
  RunOnDevice(b, &dev);
  if (::testing::Test::HasFatalFailure()) return;

  // 1. Every output element written and finite; padding untouched.
  const int d = c.head_dim;
  std::vector<bool> inside(b.q_elems, false);
  int64_t non_finite = 0;
  for (const SeqDesc& s : b.seqs) {
    for (int32_t i = 0; i < s.seq_len; ++i) {
      for (int h = 0; h < c.hq; ++h) {
        const int64_t at = s.q_offset + i * s.q_token_stride + h * s.q_head_stride;
        for (int e = 0; e < d; ++e) {
          inside[at + e] = true;
          if (!std::isfinite(FromBits(dev.out[at + e], c.type))) ++non_finite;
        }
        if (c.with_lse && !std::isfinite(dev.lse[s.lse_offset + int64_t{h} * s.seq_len + i])) {
          ++non_finite;
        }
      }
    }
  }
  EXPECT_EQ(non_finite, 0) << "unwritten or non-finite outputs";
  int64_t touched_padding = 0;
  for (size_t e = 0; e < b.q_elems; ++e) {
    if (!inside[e] && dev.out[e] != kNanBits) ++touched_padding;
  }
  EXPECT_EQ(touched_padding, 0) << "writes outside the sequences' outputs";

  // 2. Checked rows against fp64, in parallel over (sequence, head).
  const double unit = c.type == ElemType::kBf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  struct Work {
    size_t seq;
    int head;
    std::vector<int32_t> rows;
  };
  std::vector<Work> work;
  std::mt19937_64 rng(c.seed * 7919 + 1);
  for (size_t si = 0; si < b.seqs.size(); ++si) {
    const std::vector<int32_t> rows = RowsToCheck(c, b.seqs[si].seq_len, &rng);
    for (int h = 0; h < c.hq; ++h) work.push_back({si, h, rows});
  }
  struct Tally {
    int64_t checked = 0, bad = 0, over_001 = 0, bad_lse = 0;
    double max_err = 0, max_lse_err = 0;
    std::string first_bad;
  };
  const unsigned threads = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
  std::vector<Tally> tallies(threads);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      Tally& tally = tallies[t];
      for (size_t w = t; w < work.size(); w += threads) {
        const SeqDesc& s = b.seqs[work[w].seq];
        const int h = work[w].head;
        for (int32_t i : work[w].rows) {
          const RefRow ref = Reference(b, work[w].seq, h, i);
          const int64_t at = s.q_offset + i * s.q_token_stride + h * s.q_head_stride;
          for (int e = 0; e < d; ++e) {
            const double got = FromBits(dev.out[at + e], c.type);
            const double err = std::fabs(got - ref.out[e]);
            const double tol = 1.5 * unit * (std::fabs(ref.out[e]) + 1.0) + 1e-6;
            ++tally.checked;
            tally.max_err = std::max(tally.max_err, std::isnan(err) ? INFINITY : err);
            if (err > 0.01 || std::isnan(err)) ++tally.over_001;
            if (!(err <= tol)) {
              if (tally.bad++ == 0) {
                tally.first_bad = "seq " + std::to_string(work[w].seq) + " head " +
                                  std::to_string(h) + " row " + std::to_string(i) + " col " +
                                  std::to_string(e) + ": got " + std::to_string(got) + " want " +
                                  std::to_string(ref.out[e]);
              }
            }
          }
          if (c.with_lse) {
            const double lse_err =
                std::fabs(dev.lse[s.lse_offset + int64_t{h} * s.seq_len + i] - ref.lse);
            tally.max_lse_err =
                std::max(tally.max_lse_err, std::isnan(lse_err) ? INFINITY : lse_err);
            if (!(lse_err <= 5e-4)) ++tally.bad_lse;
          }
        }
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  Tally total;
  for (const Tally& t : tallies) {
    total.checked += t.checked;
    total.bad += t.bad;
    total.over_001 += t.over_001;
    total.bad_lse += t.bad_lse;
    total.max_err = std::max(total.max_err, t.max_err);
    total.max_lse_err = std::max(total.max_lse_err, t.max_lse_err);
    if (total.first_bad.empty()) total.first_bad = t.first_bad;
  }
  EXPECT_GT(total.checked, 0);
  EXPECT_EQ(total.bad, 0) << "of " << total.checked << " elements; first: " << total.first_bad
                          << "; max error " << total.max_err;
  EXPECT_EQ(total.bad_lse, 0) << "max LSE error " << total.max_lse_err;
  std::printf("  checked %lld elements: max |err| %.3g, >0.01: %lld, max LSE err %.3g\n",
              static_cast<long long>(total.checked), total.max_err,
              static_cast<long long>(total.over_001), total.max_lse_err);
}

const std::vector<int32_t> kMixedLens = {1, 7, 64, 127, 128, 129, 255, 1000, 2049};

Case Dense(ElemType type, int d, int hq, int hkv, bool head_major, std::vector<int32_t> lens,
           uint64_t seed) {
  Case c;
  c.type = type;
  c.head_dim = d;
  c.hq = hq;
  c.hkv = hkv;
  c.head_major = head_major;
  c.seq_lens = std::move(lens);
  c.seed = seed;
  return c;
}

Case Sparse(Case c, AnchorGeometry geometry, double density) {
  c.sparse = true;
  c.geometry = geometry;
  c.stripe_density = density;
  return c;
}

// --- dense -----------------------------------------------------------------------------------

TEST(AttentionKernelDense, MixedBatchBf16D128TokenMajorGqa4) {
  CheckCase(Dense(ElemType::kBf16, 128, 8, 2, false, kMixedLens, 11));
}
TEST(AttentionKernelDense, MixedBatchBf16D64HeadMajorGqa8) {
  CheckCase(Dense(ElemType::kBf16, 64, 8, 1, true, kMixedLens, 12));
}
TEST(AttentionKernelDense, MixedBatchFp16D128HeadMajorGqa1) {
  CheckCase(Dense(ElemType::kFp16, 128, 4, 4, true, kMixedLens, 13));
}
TEST(AttentionKernelDense, MixedBatchFp16D64TokenMajorGqa4) {
  CheckCase(Dense(ElemType::kFp16, 64, 8, 2, false, kMixedLens, 14));
}
TEST(AttentionKernelDense, WithoutLse) {
  Case c = Dense(ElemType::kBf16, 128, 4, 1, true, {333, 1500}, 15);
  c.with_lse = false;
  CheckCase(c);
}
TEST(AttentionKernelDense, LongBf16D128) {
  Case c = Dense(ElemType::kBf16, 128, 4, 1, false, {16384}, 16);
  c.sampled_rows = 48;
  CheckCase(c);
}
TEST(AttentionKernelDense, LongFp16D64HeadMajor) {
  Case c = Dense(ElemType::kFp16, 64, 4, 2, true, {12345, 4097}, 17);
  c.sampled_rows = 48;
  CheckCase(c);
}

// Packed token-major batches: K/V form one strided tensor, so whole key tiles are bulk copies
// (TMA), mixed with row copies for the partial tiles.
Case Packed(Case c) {
  c.pad_between = false;
  EXPECT_GT(UniformKvTensor(MakeBatch(c).seqs).num_tokens, 0) << Describe(c);
  return c;
}
TEST(AttentionKernelDense, PackedBatchesBulkCopies) {
  CheckCase(Packed(Dense(ElemType::kBf16, 128, 8, 2, false, kMixedLens, 51)));
  CheckCase(Packed(Dense(ElemType::kFp16, 64, 8, 1, false, kMixedLens, 52)));
}
TEST(AttentionKernelDense, PackedLongBf16D128Gqa7) {
  Case c = Packed(Dense(ElemType::kBf16, 128, 7, 1, false, {5000, 9000}, 53));
  c.sampled_rows = 40;
  CheckCase(c);
}

// Same inputs twice: identical bits (a race would show here first).
void CheckDeterministic(const Case& c) {
  if (!HasGpu()) GTEST_SKIP() << "no CUDA device";
  SCOPED_TRACE(Describe(c));
  const Batch b = MakeBatch(c);
  DeviceOutputs first, second;
  RunOnDevice(b, &first);
  RunOnDevice(b, &second);
  EXPECT_TRUE(first.out == second.out);
  EXPECT_EQ(std::memcmp(first.lse.data(), second.lse.data(), first.lse.size() * 4), 0);
}

TEST(AttentionKernelDense, EveryTypeOtherSeeds) {
  CheckCase(Dense(ElemType::kBf16, 128, 8, 2, false, kMixedLens, 31));
  CheckCase(Dense(ElemType::kBf16, 64, 8, 1, true, kMixedLens, 32));
  CheckCase(Dense(ElemType::kFp16, 128, 4, 4, true, kMixedLens, 33));
  CheckCase(Dense(ElemType::kFp16, 64, 8, 2, false, kMixedLens, 34));
}
TEST(AttentionKernelDense, Deterministic) {
  CheckDeterministic(Dense(ElemType::kBf16, 128, 8, 2, false, {3000, 700}, 18));
}
TEST(AttentionKernelDense, DeterministicFp16D64HeadMajor) {
  CheckDeterministic(Dense(ElemType::kFp16, 64, 8, 1, true, {3000, 700}, 42));
}

// --- sparse ----------------------------------------------------------------------------------

// Small groups (G = 256) so that short sequences have many groups, stripes and local windows.
constexpr AnchorGeometry kSmallGroups{256, 64, 4, 1, 1};

TEST(AttentionKernelSparse, AnchorOnly) {
  CheckCase(Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {100, 257, 1000, 3001}, 21),
                   kSmallGroups, 0.0));
}
TEST(AttentionKernelSparse, FewStripes) {
  CheckCase(Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {100, 257, 1000, 3001}, 22),
                   kSmallGroups, 0.05));
}
TEST(AttentionKernelSparse, ManyStripesFp16D64HeadMajorGqa8) {
  CheckCase(
      Sparse(Dense(ElemType::kFp16, 64, 8, 1, true, {256, 999, 2500}, 23), kSmallGroups, 0.3));
}
TEST(AttentionKernelSparse, AllCandidatesIsDense) {
  CheckCase(
      Sparse(Dense(ElemType::kBf16, 64, 4, 4, false, {1, 129, 1500, 2048}, 24), kSmallGroups, 1.0));
}
// Packed: stripe tiles of 128 consecutive positions are bulk copies, mixed with gathered ones.
TEST(AttentionKernelSparse, PackedConsecutiveStripes) {
  CheckCase(Sparse(Packed(Dense(ElemType::kBf16, 128, 8, 2, false, {1500, 4000}, 56)),
                   AnchorGeometry{512, 128, 4, 1, 1}, 1.0));
  CheckCase(
      Sparse(Packed(Dense(ElemType::kFp16, 64, 4, 1, false, {3000}, 57)), kSmallGroups, 0.97));
}
TEST(AttentionKernelSparse, WideRegionsFp16D128) {
  // n_init = 2, n_loc = 2: two initial groups and one previous group in the anchor region.
  CheckCase(Sparse(Dense(ElemType::kFp16, 128, 8, 2, false, {700, 2600}, 25),
                   AnchorGeometry{128, 32, 4, 2, 2}, 0.2));
}
TEST(AttentionKernelSparse, GroupNotMultipleOfTile) {
  // G = 192: query tiles of 128 + 64 rows, ranges ending mid key tile.
  CheckCase(Sparse(Dense(ElemType::kBf16, 128, 4, 1, true, {191, 1000, 1500}, 26),
                   AnchorGeometry{192, 64, 3, 1, 1}, 0.15));
}
TEST(AttentionKernelSparse, NoInitialRegion) {
  CheckCase(Sparse(Dense(ElemType::kBf16, 64, 4, 2, false, {900, 1300}, 27),
                   AnchorGeometry{256, 64, 4, 0, 1}, 0.1));
}
TEST(AttentionKernelSparse, DefaultGeometryLong) {
  Case c = Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {16384, 5000}, 28),
                  AnchorGeometry{2048, 128, 16, 1, 1}, 0.1);
  c.sampled_rows = 40;
  CheckCase(c);
}

TEST(AttentionKernelSparse, MixedShapesOtherSeeds) {
  CheckCase(Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {100, 257, 1000, 3001}, 35),
                   kSmallGroups, 0.05));
  CheckCase(
      Sparse(Dense(ElemType::kFp16, 64, 8, 1, true, {256, 999, 2500}, 36), kSmallGroups, 0.3));
  CheckCase(Sparse(Dense(ElemType::kBf16, 128, 4, 1, true, {191, 1000, 1500}, 37),
                   AnchorGeometry{192, 64, 3, 1, 1}, 0.15));
}
TEST(AttentionKernelSparse, PackedBatchesBulkCopies) {
  CheckCase(Sparse(Packed(Dense(ElemType::kBf16, 128, 8, 2, false, {100, 257, 1000, 3001}, 54)),
                   kSmallGroups, 0.2));
  CheckCase(Sparse(Packed(Dense(ElemType::kFp16, 64, 4, 2, false, {900, 1300}, 55)),
                   AnchorGeometry{256, 64, 4, 0, 2}, 0.3));
}
TEST(AttentionKernelSparse, Deterministic) {
  CheckDeterministic(
      Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {3001, 1000}, 41), kSmallGroups, 0.2));
}
TEST(AttentionKernelSparse, DefaultGeometryLongOtherSeed) {
  Case c = Sparse(Dense(ElemType::kBf16, 128, 8, 2, false, {16384, 5000}, 43),
                  AnchorGeometry{2048, 128, 16, 1, 1}, 0.1);
  c.sampled_rows = 40;
  CheckCase(c);
}

// --- arguments -------------------------------------------------------------------------------

TEST(AttentionKernelArgs, RejectsUnsupported) {
  SeqDesc seq{};
  QueryTile tile{};
  AttentionParams p{};
  p.elem_type = ElemType::kBf16;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 96;
  p.softmax_scale = 0.1f;
  p.seqs = &seq;
  p.num_seqs = 1;
  p.tiles = &tile;
  p.num_tiles = 1;
  alignas(16) static uint16_t buffer[8];
  p.q = p.k = p.v = buffer;
  p.out = buffer;
  // Rejected with the failed precondition named, before any CUDA call.
  auto expect_rejected = [&](const char* mentions) {
    const LaunchResult result = LaunchAttention(p, nullptr);
    EXPECT_EQ(result.code, cudaErrorInvalidValue) << mentions;
    ASSERT_TRUE(result.precondition_failed()) << mentions;
    EXPECT_NE(std::string(result.what).find(mentions), std::string::npos) << result.what;
  };
  expect_rejected("head_dim");  // 96
  p.head_dim = 128;
  p.num_kv_heads = 3;
  expect_rejected("multiple of num_kv_heads");
  p.num_kv_heads = 2;
  p.softmax_scale = NAN;
  expect_rejected("softmax_scale");
  p.softmax_scale = 0.1f;
  p.sparse = true;  // no geometry
  expect_rejected("group_size");
  p.geometry = AnchorGeometry{256, 64, 4, 1, 1};  // no stripe lists
  expect_rejected("stripe lists");
  p.num_tiles = 0;  // nothing to do
  EXPECT_TRUE(LaunchAttention(p, nullptr).ok());
}

// The block order visits every (tile, head) exactly once, also with a short last chunk.
// Which batches share one strided K/V tensor (host only).
TEST(AttentionKernelArgs, UniformKvTensor) {
  const int64_t d = 128;
  auto token_major = [&](int64_t offset, int32_t n) {
    SeqDesc s{};
    s.kv_offset = offset;
    s.kv_token_stride = 8 * d;
    s.kv_head_stride = d;
    s.seq_len = n;
    return s;
  };
  // Packed after a 64-element lead: base 64, tokens end at the last sequence's end.
  KvTensorShape shape = UniformKvTensor({token_major(64, 100), token_major(64 + 100 * 8 * d, 300)});
  EXPECT_EQ(shape.base_offset, 64);
  EXPECT_EQ(shape.num_tokens, 400);
  EXPECT_EQ(shape.token_stride, 8 * d);
  EXPECT_EQ(shape.head_stride, d);
  // A gap that is not a whole number of tokens, or different strides: none.
  EXPECT_EQ(UniformKvTensor({token_major(0, 100), token_major(100 * 8 * d + 64, 10)}).num_tokens,
            0);
  SeqDesc head_major = token_major(0, 100);
  head_major.kv_token_stride = d;
  head_major.kv_head_stride = 100 * d;
  EXPECT_GT(UniformKvTensor({head_major}).num_tokens, 0);
  SeqDesc second = head_major;
  second.kv_offset = 8 * 100 * d;
  second.kv_head_stride = 50 * d;
  second.seq_len = 50;
  EXPECT_EQ(UniformKvTensor({head_major, second}).num_tokens, 0);
  EXPECT_EQ(UniformKvTensor({}).num_tokens, 0);
}

TEST(AttentionKernelArgs, BlockOrderIsAPermutation) {
  for (int32_t num_tiles : {1, 5, 16, 17, 50}) {
    for (int32_t heads : {1, 4, 32}) {
      for (int32_t chunk : {0, 1, 3, attention_detail::kTilesPerChunk, 64}) {
        std::vector<int> seen(static_cast<size_t>(num_tiles) * heads, 0);
        for (int64_t linear = 0; linear < int64_t{num_tiles} * heads; ++linear) {
          const attention_detail::WorkItem item =
              attention_detail::DecodeWorkItem(linear, num_tiles, heads, chunk);
          ASSERT_GE(item.tile_index, 0);
          ASSERT_LT(item.tile_index, num_tiles);
          ASSERT_GE(item.head, 0);
          ASSERT_LT(item.head, heads);
          ++seen[static_cast<size_t>(item.tile_index) * heads + item.head];
        }
        for (int hits : seen) EXPECT_EQ(hits, 1) << num_tiles << " " << heads << " " << chunk;
      }
    }
  }
}

TEST(AttentionKernelArgs, QueryTilesStayInsideGroups) {
  const std::vector<QueryTile> tiles = BuildQueryTiles({300, 1, 1000}, 192);
  std::vector<std::vector<int>> covered = {std::vector<int>(300), std::vector<int>(1),
                                           std::vector<int>(1000)};
  for (const QueryTile& t : tiles) {
    EXPECT_GE(t.q_len, 1);
    EXPECT_LE(t.q_len, kAttentionTileRows);
    EXPECT_EQ(t.group, t.q_start / 192);
    EXPECT_EQ((t.q_start + t.q_len - 1) / 192, t.group);
    for (int i = t.q_start; i < t.q_start + t.q_len; ++i) ++covered[t.seq][i];
  }
  for (const auto& rows : covered) {
    for (int hits : rows) EXPECT_EQ(hits, 1);
  }
  for (size_t i = 1; i < tiles.size(); ++i) {
    EXPECT_GE(tiles[i - 1].q_start + tiles[i - 1].q_len, tiles[i].q_start + tiles[i].q_len);
  }
}

}  // namespace
}  // namespace anchorserve::cuda
