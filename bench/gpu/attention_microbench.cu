// Microbenchmark of the attention compute kernels (kernels/cuda/attention_launch.h) on the
// Llama-3.1-8B attention shape (Hq 32, Hkv 8, d 128, bf16, batch 1, token-major):
//   - dense causal: TFLOP/s with FLOPs = 4 * N^2 * d * Hq / 2;
//   - sparse (anchor region + synthetic uniformly random stripe lists at several densities of
//     the candidate keys): TFLOP/s on kept work, FLOPs = 4 * d * (computed causal entries);
//   - accuracy: on a subset of (head, row) pairs, the fraction of output elements that differ
//     by more than 0.01 from an fp32 evaluation of the same key set (GPU, simple kernel).
// Timing: CUDA events around each launch, warm-up first, median of the repeats. Inputs are
// random (never zeros); outputs are poisoned before the first run.
//
// Key tiles are copied as the product copies them (whole contiguous tiles in bulk by TMA, the
// rest row by row); --copy=rows copies every tile row by row, --copy=both runs each problem both
// ways, alternating (an A/B of the bulk copies in one process).
//
// Usage: anchor_attention_microbench [--dense=4096,8192,...] [--sparse=32768,131072]
//                                    [--densities=0.05,0.1,0.3] [--check_rows=128]
//                                    [--copy=bulk|rows|both]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu/bench_util.h"
#include "kernels/cuda/attention_launch.h"

namespace anchorserve::cuda {
namespace {

constexpr int kHq = 32;
constexpr int kHkv = 8;
constexpr int kD = 128;
using Elem = __nv_bfloat16;

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void FillRandom(Elem* data, int64_t count, uint64_t seed, float amplitude) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t x = (seed + static_cast<uint64_t>(i)) * 0x9e3779b97f4a7c15ull;
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 29;
    const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
    data[i] = __float2bfloat16_rn(amplitude * u);
  }
}

// What a reference row needs to enumerate its key set (same definition as the kernels).
struct RefSpec {
  const Elem* q;
  const Elem* k;
  const Elem* v;
  int32_t seq_len;
  float scale;
  bool sparse;
  AnchorGeometry geometry;
  const int64_t* list_offset;  // [groups * Hq]
  const int32_t* count;
  const int32_t* index;
};

// One block of 256 threads per checked (row, head): fp32 scores, two passes, fp32 output.
__global__ void ReferenceRows(RefSpec spec, const int32_t* rows, const int32_t* heads,
                              int64_t scratch_stride, float* scratch, float* out_ref,
                              float* lse_ref) {
  __shared__ float q_row[kD];
  __shared__ float reduce[256];
  __shared__ float partial[256 / kD][kD];
  const int row = rows[blockIdx.x];
  const int head = heads[blockIdx.x];
  const int kv_head = head / (kHq / kHkv);
  const int tid = threadIdx.x;
  float* scores = scratch + blockIdx.x * scratch_stride;
  if (tid < kD) {
    q_row[tid] = __bfloat162float(spec.q[(int64_t{row} * kHq + head) * kD + tid]);
  }
  __syncthreads();
  // Key enumeration: [0, e0), [b1, row], stripes.
  int64_t e0 = row + 1, b1 = row + 1;
  const int32_t* stripes = nullptr;
  int32_t stripe_count = 0;
  if (spec.sparse) {
    const int64_t g_size = spec.geometry.group_size;
    const int64_t g = row / g_size;
    const int64_t init_end = int64_t{spec.geometry.init_groups} * g_size;
    e0 = min(init_end, int64_t{row} + 1);
    b1 = max(init_end, (g - spec.geometry.local_groups + 1) * g_size);
    const int64_t slot = g * kHq + head;
    stripes = spec.index + spec.list_offset[slot];
    stripe_count = spec.count[slot];
  }
  const int64_t n1 = b1 <= row ? row - b1 + 1 : 0;
  const int64_t total = e0 + n1 + stripe_count;
  auto position = [&](int64_t u) -> int64_t {
    if (u < e0) return u;
    if (u < e0 + n1) return b1 + (u - e0);
    return stripes[u - e0 - n1];
  };
  float local_max = -INFINITY;
  for (int64_t u = tid; u < total; u += 256) {
    const Elem* key = spec.k + (position(u) * kHkv + kv_head) * kD;
    float dot = 0.0f;
    for (int c = 0; c < kD; c += 8) {
      const uint4 packed = *reinterpret_cast<const uint4*>(key + c);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
      for (int e = 0; e < 4; ++e) {
        const float2 kv = __bfloat1622float2(pairs[e]);
        dot = fmaf(q_row[c + 2 * e], kv.x, dot);
        dot = fmaf(q_row[c + 2 * e + 1], kv.y, dot);
      }
    }
    const float score = dot * spec.scale;
    scores[u] = score;
    local_max = fmaxf(local_max, score);
  }
  reduce[tid] = local_max;
  __syncthreads();
  for (int width = 128; width > 0; width /= 2) {
    if (tid < width) reduce[tid] = fmaxf(reduce[tid], reduce[tid + width]);
    __syncthreads();
  }
  const float row_max = reduce[0];
  __syncthreads();
  float local_sum = 0.0f;
  for (int64_t u = tid; u < total; u += 256) {
    const float w = expf(scores[u] - row_max);
    scores[u] = w;
    local_sum += w;
  }
  reduce[tid] = local_sum;
  __syncthreads();
  for (int width = 128; width > 0; width /= 2) {
    if (tid < width) reduce[tid] += reduce[tid + width];
    __syncthreads();
  }
  const float row_sum = reduce[0];
  const int dim = tid % kD;
  const int part = tid / kD;
  float acc = 0.0f;
  for (int64_t u = part; u < total; u += 256 / kD) {
    acc = fmaf(scores[u], __bfloat162float(spec.v[(position(u) * kHkv + kv_head) * kD + dim]), acc);
  }
  partial[part][dim] = acc;
  __syncthreads();
  if (tid < kD) {
    float value = 0.0f;
    for (int p = 0; p < 256 / kD; ++p) value += partial[p][tid];
    out_ref[int64_t{blockIdx.x} * kD + tid] = value / row_sum;
    if (tid == 0) lse_ref[blockIdx.x] = row_max + logf(row_sum);
  }
}

struct Problem {
  int32_t n = 0;
  Elem* q = nullptr;
  Elem* k = nullptr;
  Elem* v = nullptr;
  Elem* out = nullptr;
  float* lse = nullptr;
  SeqDesc* seq = nullptr;
  KvTensorShape kv_tensor{};
  QueryTile* tiles = nullptr;
  int32_t num_tiles = 0;
};

Problem MakeProblem(int32_t n, uint64_t seed) {
  Problem p;
  p.n = n;
  const int64_t q_elems = int64_t{n} * kHq * kD;
  const int64_t kv_elems = int64_t{n} * kHkv * kD;
  BENCH_CUDA(cudaMalloc(&p.q, q_elems * 2));
  BENCH_CUDA(cudaMalloc(&p.k, kv_elems * 2));
  BENCH_CUDA(cudaMalloc(&p.v, kv_elems * 2));
  BENCH_CUDA(cudaMalloc(&p.out, q_elems * 2));
  BENCH_CUDA(cudaMalloc(&p.lse, int64_t{n} * kHq * 4));
  FillRandom<<<1024, 256>>>(p.q, q_elems, seed * 3 + 1, 3.0f);
  FillRandom<<<1024, 256>>>(p.k, kv_elems, seed * 3 + 2, 1.0f);
  FillRandom<<<1024, 256>>>(p.v, kv_elems, seed * 3 + 3, 1.0f);
  BENCH_CUDA(cudaGetLastError());
  BENCH_CUDA(cudaMemset(p.out, 0xFF, q_elems * 2));  // NaN poison
  BENCH_CUDA(cudaMemset(p.lse, 0xFF, int64_t{n} * kHq * 4));
  SeqDesc seq{};
  seq.q_offset = 0;
  seq.kv_offset = 0;
  seq.q_token_stride = int64_t{kHq} * kD;
  seq.q_head_stride = kD;
  seq.kv_token_stride = int64_t{kHkv} * kD;
  seq.kv_head_stride = kD;
  seq.lse_offset = 0;
  seq.seq_len = n;
  seq.group_begin = 0;
  BENCH_CUDA(cudaMalloc(&p.seq, sizeof(SeqDesc)));
  BENCH_CUDA(cudaMemcpy(p.seq, &seq, sizeof(SeqDesc), cudaMemcpyHostToDevice));
  p.kv_tensor = UniformKvTensor({seq});
  const std::vector<QueryTile> tiles = BuildQueryTiles({n}, 2048);
  p.num_tiles = static_cast<int32_t>(tiles.size());
  BENCH_CUDA(cudaMalloc(&p.tiles, tiles.size() * sizeof(QueryTile)));
  BENCH_CUDA(
      cudaMemcpy(p.tiles, tiles.data(), tiles.size() * sizeof(QueryTile), cudaMemcpyHostToDevice));
  return p;
}

void Poison(const Problem& p) {
  BENCH_CUDA(cudaMemset(p.out, 0xFF, int64_t{p.n} * kHq * kD * 2));
  BENCH_CUDA(cudaMemset(p.lse, 0xFF, int64_t{p.n} * kHq * 4));
}

void FreeProblem(Problem* p) {
  cudaFree(p->q);
  cudaFree(p->k);
  cudaFree(p->v);
  cudaFree(p->out);
  cudaFree(p->lse);
  cudaFree(p->seq);
  cudaFree(p->tiles);
}

struct StripeSet {
  int64_t* list_offset = nullptr;
  int32_t* count = nullptr;
  int32_t* index = nullptr;
  double kept_entries_per_head = 0;  // sum_i |A(i)| + sum_g |S_g| rows(g), mean over heads
  double stripe_entries_per_head = 0;
};

// Uniformly random stripes: each candidate key of (group, head) kept with probability density.
StripeSet MakeStripes(int32_t n, const AnchorGeometry& geo, double density, uint64_t seed) {
  StripeSet set;
  const int64_t g_size = geo.group_size;
  const int32_t groups = static_cast<int32_t>((n + g_size - 1) / g_size);
  std::vector<int64_t> offsets;
  std::vector<int32_t> counts;
  std::vector<int32_t> index;
  const uint64_t threshold = static_cast<uint64_t>(density * 18446744073709551615.0);
  double stripe_entries = 0;
  for (int32_t g = 0; g < groups; ++g) {
    const int64_t cand_begin = int64_t{geo.init_groups} * g_size;
    const int64_t cand_end = (int64_t{g} - geo.local_groups + 1) * g_size;
    const int64_t rows = std::min<int64_t>(n, (g + 1) * g_size) - g * g_size;
    for (int h = 0; h < kHq; ++h) {
      offsets.push_back(static_cast<int64_t>(index.size()));
      int32_t chosen = 0;
      for (int64_t j = cand_begin; j < cand_end; ++j) {
        if (Mix(seed ^ (uint64_t(g) << 40) ^ (uint64_t(h) << 32) ^ uint64_t(j)) < threshold) {
          index.push_back(static_cast<int32_t>(j));
          ++chosen;
        }
      }
      counts.push_back(chosen);
      stripe_entries += static_cast<double>(chosen) * static_cast<double>(rows);
    }
  }
  if (index.empty()) index.push_back(0);
  double anchor_entries = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = i / g_size;
    const int64_t init_end = int64_t{geo.init_groups} * g_size;
    const int64_t local_begin = std::max(init_end, (g - geo.local_groups + 1) * g_size);
    anchor_entries += std::min(init_end, i + 1) + (local_begin <= i ? i - local_begin + 1 : 0);
  }
  set.stripe_entries_per_head = stripe_entries / kHq;
  set.kept_entries_per_head = anchor_entries + set.stripe_entries_per_head;
  BENCH_CUDA(cudaMalloc(&set.list_offset, offsets.size() * 8));
  BENCH_CUDA(cudaMalloc(&set.count, counts.size() * 4));
  BENCH_CUDA(cudaMalloc(&set.index, index.size() * 4));
  BENCH_CUDA(
      cudaMemcpy(set.list_offset, offsets.data(), offsets.size() * 8, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(set.count, counts.data(), counts.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(set.index, index.data(), index.size() * 4, cudaMemcpyHostToDevice));
  return set;
}

// bulk: the product's copies (KvTensorShape given); else every key tile row by row.
AttentionParams ParamsFor(const Problem& p, const StripeSet* stripes, const AnchorGeometry& geo,
                          bool bulk) {
  AttentionParams params{};
  params.elem_type = ElemType::kBf16;
  params.num_q_heads = kHq;
  params.num_kv_heads = kHkv;
  params.head_dim = kD;
  params.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kD));
  params.q = p.q;
  params.k = p.k;
  params.v = p.v;
  params.out = p.out;
  params.maybe_lse = p.lse;
  params.seqs = p.seq;
  params.num_seqs = 1;
  if (bulk) params.kv_tensor = p.kv_tensor;
  params.tiles = p.tiles;
  params.num_tiles = p.num_tiles;
  params.sparse = stripes != nullptr;
  params.geometry = geo;
  if (stripes != nullptr) {
    params.stripes.list_offset = stripes->list_offset;
    params.stripes.count = stripes->count;
    params.stripes.index = stripes->index;
  }
  return params;
}

// Median milliseconds of `reps` launches after `warmup` launches.
double TimeMs(const AttentionParams& params, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) BENCH_LAUNCH(LaunchAttention(params, nullptr));
  BENCH_CUDA(cudaDeviceSynchronize());
  return MedianEventMs([&] { BENCH_LAUNCH(LaunchAttention(params, nullptr)); }, reps);
}

struct Accuracy {
  int64_t elements = 0;
  int64_t over_001 = 0;
  double max_err = 0;
  double max_lse_err = 0;
  int64_t non_finite = 0;
};

// Compares the kernel's output (already in p.out / p.lse) with the fp32 reference on
// `rows_per_head` rows of 4 heads.
Accuracy CheckAccuracy(const Problem& p, const StripeSet* stripes, const AnchorGeometry& geo,
                       int rows_per_head) {
  const int heads_checked[] = {0, 9, 18, 31};
  std::vector<int32_t> rows, heads;
  for (int h : heads_checked) {
    for (int r = 0; r < rows_per_head; ++r) {
      // Spread over the sequence, biased to late rows (most keys), plus the last row.
      const uint64_t x = Mix(uint64_t(h) * 1000003 + r);
      const double f = std::sqrt(static_cast<double>(x >> 11) / 9007199254740992.0);
      rows.push_back(r == 0 ? p.n - 1 : std::min<int32_t>(p.n - 1, static_cast<int32_t>(f * p.n)));
      heads.push_back(h);
    }
  }
  const int count = static_cast<int>(rows.size());
  int32_t *d_rows, *d_heads;
  float *scratch, *out_ref, *lse_ref;
  BENCH_CUDA(cudaMalloc(&d_rows, count * 4));
  BENCH_CUDA(cudaMalloc(&d_heads, count * 4));
  BENCH_CUDA(cudaMalloc(&scratch, int64_t{count} * p.n * 4));
  BENCH_CUDA(cudaMalloc(&out_ref, int64_t{count} * kD * 4));
  BENCH_CUDA(cudaMalloc(&lse_ref, count * 4));
  BENCH_CUDA(cudaMemcpy(d_rows, rows.data(), count * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(d_heads, heads.data(), count * 4, cudaMemcpyHostToDevice));
  RefSpec spec{
      p.q, p.k,     p.v,     p.n,    1.0f / std::sqrt(static_cast<float>(kD)), stripes != nullptr,
      geo, nullptr, nullptr, nullptr};
  if (stripes != nullptr) {
    spec.list_offset = stripes->list_offset;
    spec.count = stripes->count;
    spec.index = stripes->index;
  }
  ReferenceRows<<<count, 256>>>(spec, d_rows, d_heads, p.n, scratch, out_ref, lse_ref);
  BENCH_CUDA(cudaGetLastError());
  BENCH_CUDA(cudaDeviceSynchronize());
  std::vector<float> ref(int64_t{count} * kD), ref_lse(count);
  BENCH_CUDA(cudaMemcpy(ref.data(), out_ref, ref.size() * 4, cudaMemcpyDeviceToHost));
  BENCH_CUDA(cudaMemcpy(ref_lse.data(), lse_ref, count * 4, cudaMemcpyDeviceToHost));
  Accuracy acc;
  std::vector<uint16_t> got(kD);
  for (int i = 0; i < count; ++i) {
    BENCH_CUDA(cudaMemcpy(got.data(), p.out + (int64_t{rows[i]} * kHq + heads[i]) * kD, kD * 2,
                          cudaMemcpyDeviceToHost));
    float lse = 0;
    BENCH_CUDA(
        cudaMemcpy(&lse, p.lse + int64_t{heads[i]} * p.n + rows[i], 4, cudaMemcpyDeviceToHost));
    for (int c = 0; c < kD; ++c) {
      uint32_t wide = uint32_t{got[c]} << 16;
      float value;
      std::memcpy(&value, &wide, 4);
      const double err = std::fabs(double{value} - ref[int64_t{i} * kD + c]);
      ++acc.elements;
      if (!std::isfinite(value)) ++acc.non_finite;
      if (!(err <= 0.01)) ++acc.over_001;
      acc.max_err = std::max(acc.max_err, std::isfinite(err) ? err : INFINITY);
    }
    acc.max_lse_err = std::max(acc.max_lse_err, std::fabs(double{lse} - ref_lse[i]));
  }
  cudaFree(d_rows);
  cudaFree(d_heads);
  cudaFree(scratch);
  cudaFree(out_ref);
  cudaFree(lse_ref);
  return acc;
}

std::vector<double> ParseList(const char* text) {
  std::vector<double> values;
  std::string s(text);
  size_t at = 0;
  while (at < s.size()) {
    size_t comma = s.find(',', at);
    if (comma == std::string::npos) comma = s.size();
    values.push_back(std::atof(s.substr(at, comma - at).c_str()));
    at = comma + 1;
  }
  return values;
}

int Reps(int32_t n) { return n >= 131072 ? 3 : n >= 65536 ? 5 : 10; }

int Main(int argc, char** argv) {
  std::vector<double> dense_n = {4096, 8192, 16384, 32768, 65536, 131072};
  std::vector<double> sparse_n = {32768, 131072};
  std::vector<double> densities = {0.05, 0.1, 0.3};
  int check_rows = 128;
  std::vector<bool> copy_modes = {true};  // bulk
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* prefix) -> const char* {
      return arg.rfind(prefix, 0) == 0 ? argv[i] + std::strlen(prefix) : nullptr;
    };
    if (const char* v = value("--dense=")) {
      dense_n = ParseList(v);
    } else if (const char* v = value("--sparse=")) {
      sparse_n = ParseList(v);
    } else if (const char* v = value("--densities=")) {
      densities = ParseList(v);
    } else if (const char* v = value("--check_rows=")) {
      check_rows = std::atoi(v);
    } else if (const char* v = value("--copy=")) {
      const std::string mode = v;
      if (mode != "bulk" && mode != "rows" && mode != "both") {
        std::fprintf(stderr, "--copy must be bulk, rows or both\n");
        return 2;
      }
      copy_modes =
          mode == "both" ? std::vector<bool>{true, false} : std::vector<bool>{mode == "bulk"};
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, shape Hq=%d Hkv=%d d=%d bf16 batch 1 token-major\n", prop.name,
              prop.multiProcessorCount, kHq, kHkv, kD);
  const AnchorGeometry geo{2048, 128, 16, 1, 1};
  std::vector<std::string> summary;
  char line[640];
  auto accuracy_text = [](const Accuracy& acc) {
    char text[256];
    std::snprintf(text, sizeof(text),
                  "acc: %lld elems, >0.01: %lld (%.4f%%), max|err| %.2e, max LSE err %.2e, "
                  "non-finite %lld",
                  static_cast<long long>(acc.elements), static_cast<long long>(acc.over_001),
                  100.0 * acc.over_001 / acc.elements, acc.max_err, acc.max_lse_err,
                  static_cast<long long>(acc.non_finite));
    return std::string(text);
  };

  std::printf("\n== dense causal ==\n");
  auto copy_name = [](bool bulk) { return bulk ? "bulk" : "rows"; };
  std::vector<std::pair<int32_t, double>> dense_ms;  // first copy mode's times
  for (double nd : dense_n) {
    const int32_t n = static_cast<int32_t>(nd);
    Problem p = MakeProblem(n, 1234 + n);
    const double flops = 4.0 * static_cast<double>(n) * n * kD * kHq / 2.0;
    for (bool bulk : copy_modes) {
      const AttentionParams params = ParamsFor(p, nullptr, geo, bulk);
      Poison(p);
      const double ms = TimeMs(params, 2, Reps(n));
      const Accuracy acc = CheckAccuracy(p, nullptr, geo, check_rows);
      if (bulk == copy_modes[0]) dense_ms.push_back({n, ms});
      std::snprintf(line, sizeof(line),
                    "dense  N=%6d copy=%s             ms=%9.3f  TFLOP/s=%6.1f  | %s", n,
                    copy_name(bulk), ms, flops / ms * 1e-9, accuracy_text(acc).c_str());
      std::printf("%s\n", line);
      std::fflush(stdout);
      summary.push_back(line);
    }
    FreeProblem(&p);
  }

  std::printf("\n== sparse: anchor region (n_init=n_loc=1, G=2048) + random stripes ==\n");
  for (double nd : sparse_n) {
    const int32_t n = static_cast<int32_t>(nd);
    Problem p = MakeProblem(n, 777 + n);
    double dense_reference_ms = 0;
    for (const auto& [dn, ms] : dense_ms) {
      if (dn == n) dense_reference_ms = ms;
    }
    for (double density : densities) {
      StripeSet stripes = MakeStripes(n, geo, density, 99 + n);
      const double kept = stripes.kept_entries_per_head;
      const double flops = 4.0 * kD * kept * kHq;
      const double causal = static_cast<double>(n) * (n + 1) / 2.0;
      for (bool bulk : copy_modes) {
        const AttentionParams params = ParamsFor(p, &stripes, geo, bulk);
        Poison(p);
        const double ms = TimeMs(params, 2, Reps(n));
        const Accuracy acc = CheckAccuracy(p, &stripes, geo, check_rows);
        char speedup[32] = "n/a";
        if (dense_reference_ms > 0) {
          std::snprintf(speedup, sizeof(speedup), "%.2fx", dense_reference_ms / ms);
        }
        std::snprintf(line, sizeof(line),
                      "sparse N=%6d copy=%s cand=%4.2f  ms=%9.3f  TFLOP/s=%6.1f  density=%.4f "
                      "stripe_density=%.4f  vs_dense=%s | %s",
                      n, copy_name(bulk), density, ms, flops / ms * 1e-9, kept / causal,
                      stripes.stripe_entries_per_head / causal, speedup,
                      accuracy_text(acc).c_str());
        std::printf("%s\n", line);
        std::fflush(stdout);
        summary.push_back(line);
      }
      cudaFree(stripes.list_offset);
      cudaFree(stripes.count);
      cudaFree(stripes.index);
    }
    FreeProblem(&p);
  }
  std::printf("\n== summary ==\n");
  for (const std::string& s : summary) std::printf("%s\n", s.c_str());
  return 0;
}

}  // namespace
}  // namespace anchorserve::cuda

int main(int argc, char** argv) { return anchorserve::cuda::Main(argc, argv); }
