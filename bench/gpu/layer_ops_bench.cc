// anchor_layer_ops_bench: the CUDA prefill engine's elementwise kernels (kernels/cuda/layer_ops.h)
// alone, at one layer's shapes, as the engine launches them: the "other kernels" of
// anchor_prefill_bench's split, kernel by kernel.
//
//   anchor_layer_ops_bench [--lengths=32768,131072] [--hidden=4096] [--heads=32] [--kv_heads=8]
//                          [--head_dim=128] [--inter=14336] [--mlp_chunk_rows=4608] [--reps=5]
//
// Defaults are Llama-3.1-8B's shape and the engine's default MLP chunk. Per length and kernel it
// prints the median time of one launch (CUDA events, after one warm-up), the bytes a launch must
// move at least (every input read once, every output written once) and the rate that gives, and
// the kernel's time per layer (launches per layer x median). Inputs are uniform random values
// (timings of these kernels do not depend on the data).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "bench/gpu/bench_util.h"
#include "kernels/cuda/layer_ops.h"

ABSL_FLAG(std::vector<std::string>, lengths, (std::vector<std::string>{"32768", "131072"}),
          "Prompt lengths (tokens).");
ABSL_FLAG(int, hidden, 4096, "Hidden size.");
ABSL_FLAG(int, heads, 32, "Query heads.");
ABSL_FLAG(int, kv_heads, 8, "K/V heads.");
ABSL_FLAG(int, head_dim, 128, "Head dimension.");
ABSL_FLAG(int, inter, 14336, "MLP intermediate size.");
ABSL_FLAG(int64_t, mlp_chunk_rows, 4608, "Rows per MLP chunk (the engine's default for Llama-8B).");
ABSL_FLAG(int, reps, 5, "Timed runs per kernel (median).");

namespace anchorserve::cuda {
namespace {

// --lengths as numbers; false (with a message) for one that is not a positive integer.
bool ReadLengths(std::vector<int64_t>* lengths) {
  for (const std::string& part : absl::GetFlag(FLAGS_lengths)) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1) {
      std::fprintf(stderr, "--lengths: %s is not a positive integer\n", part.c_str());
      return false;
    }
    lengths->push_back(n);
  }
  return true;
}

// A device buffer freed at scope exit.
struct DeviceArray {
  explicit DeviceArray(int64_t bytes) { BENCH_CUDA(cudaMalloc(&data, static_cast<size_t>(bytes))); }
  ~DeviceArray() { cudaFree(data); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  void* data = nullptr;
};

// Median milliseconds of `launch` over `reps` timed runs after one warm-up.
double MedianMs(const std::function<cudaError_t()>& launch, int reps) {
  BENCH_CUDA(launch());
  return MedianEventMs([&] { BENCH_CUDA(launch()); }, reps);
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<int64_t> lengths;
  if (!ReadLengths(&lengths)) return 2;
  const int heads = absl::GetFlag(FLAGS_heads), kv_heads = absl::GetFlag(FLAGS_kv_heads),
            head_dim = absl::GetFlag(FLAGS_head_dim);
  const int64_t h = absl::GetFlag(FLAGS_hidden), inter = absl::GetFlag(FLAGS_inter),
                mlp_chunk_rows = absl::GetFlag(FLAGS_mlp_chunk_rows);
  const int reps = absl::GetFlag(FLAGS_reps);
  if (h < 4 || heads < 1 || kv_heads < 1 || head_dim < 2 || head_dim % 2 != 0 || inter < 1 ||
      mlp_chunk_rows < 1 || reps < 1) {
    std::fprintf(stderr,
                 "shape flags, --mlp_chunk_rows and --reps must be positive (head_dim even)\n");
    return 2;
  }
  cudaDeviceProp properties{};
  BENCH_CUDA(cudaGetDeviceProperties(&properties, 0));
  std::printf("device: %s, %d SMs\n", properties.name, properties.multiProcessorCount);
  const int64_t q_dim = int64_t{heads} * head_dim, kv_dim = int64_t{kv_heads} * head_dim;
  std::printf(
      "shape: hidden %lld, heads %d / %d, head_dim %d, intermediate %lld, MLP chunk %lld "
      "rows\n",
      static_cast<long long>(h), heads, kv_heads, head_dim, static_cast<long long>(inter),
      static_cast<long long>(mlp_chunk_rows));

  for (const int64_t n : lengths) {
    const int64_t rows = std::min(n, mlp_chunk_rows);
    DeviceArray x(n * h * 4);                   // [N, H] fp32 residual stream
    DeviceArray normed(n * h * 2);              // [N, H] bf16
    DeviceArray q(n * q_dim * 2);               // [N, Hq, d]
    DeviceArray kv(n * 2 * kv_dim * 2);         // [N, 2, Hkv, d]
    DeviceArray proj(n * h * 2);                // [N, H]
    DeviceArray gate_up(rows * 2 * inter * 2);  // [rows, 2I]
    DeviceArray act(rows * inter * 2);          // [rows, I]
    DeviceArray exported(n * kv_dim * 2);       // [N, Hkv, d] bf16
    DeviceArray weight(h * 2);                  // [H]
    DeviceArray inv_freq(head_dim / 2 * 4);     // [d/2]

    // Random fp32 values tiled over x, then bf16 copies of them for every bf16 input.
    std::mt19937 rng(static_cast<uint32_t>(n));
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    std::vector<float> block(int64_t{1} << 22);
    for (float& v : block) v = uniform(rng);
    const int64_t x_count = n * h;
    for (int64_t at = 0; at < x_count; at += static_cast<int64_t>(block.size())) {
      const int64_t count = std::min<int64_t>(static_cast<int64_t>(block.size()), x_count - at);
      BENCH_CUDA(cudaMemcpy(x.as<float>() + at, block.data(), count * 4, cudaMemcpyHostToDevice));
    }
    auto fill_bf16 = [&](const DeviceArray& dst, int64_t count) {
      for (int64_t at = 0; at < count; at += x_count) {
        BENCH_CUDA(LaunchFloatToBf16(x.as<float>(), std::min(x_count, count - at),
                                     dst.as<uint16_t>() + at, nullptr));
      }
    };
    fill_bf16(normed, n * h);
    fill_bf16(q, n * q_dim);
    fill_bf16(kv, n * 2 * kv_dim);
    fill_bf16(proj, n * h);
    fill_bf16(gate_up, rows * 2 * inter);
    fill_bf16(weight, h);
    std::vector<float> freqs(static_cast<size_t>(head_dim / 2));
    for (size_t i = 0; i < freqs.size(); ++i) {
      freqs[i] = 1.0f / std::pow(500000.0f, 2.0f * static_cast<float>(i) / head_dim);
    }
    BENCH_CUDA(cudaMemcpy(inv_freq.data, freqs.data(), freqs.size() * 4, cudaMemcpyHostToDevice));
    BENCH_CUDA(cudaDeviceSynchronize());

    struct Op {
      const char* name;
      int per_layer;  // launches (or, for silu_mul, passes over all N rows) per layer
      int64_t bytes;  // at least moved by one launch
      std::function<cudaError_t()> launch;
    };
    const float eps = 1e-5f;
    const std::vector<Op> ops = {
        // The engine fuses each residual add with the norm after it; the two alone are timed
        // for comparison (0 per layer: only the first layer's input norm and the last layer's
        // residual add run unfused).
        {"rms_norm (alone)", 0, n * h * (4 + 2),
         [&] {
           return LaunchRmsNorm(x.as<float>(), n, static_cast<int>(h), weight.as<uint16_t>(), eps,
                                normed.as<uint16_t>(), nullptr);
         }},
        {"residual_add (alone)", 0, n * h * (4 + 2 + 4),
         [&] {
           return LaunchResidualAdd(x.as<float>(), proj.as<uint16_t>(), n, static_cast<int>(h),
                                    nullptr);
         }},
        {"residual_add_rms_norm", 2, n * h * (4 + 2 + 4 + 2),
         [&] {
           return LaunchResidualAddRmsNorm(x.as<float>(), proj.as<uint16_t>(), n,
                                           static_cast<int>(h), weight.as<uint16_t>(), eps,
                                           normed.as<uint16_t>(), nullptr);
         }},
        {"rope_q", 1, n * q_dim * 2 * 2,
         [&] {
           return LaunchRope(q.as<uint16_t>(), n, q_dim, heads, head_dim, inv_freq.as<float>(),
                             nullptr);
         }},
        {"rope_k", 1, n * kv_dim * 2 * 2,
         [&] {
           return LaunchRope(kv.as<uint16_t>(), n, 2 * kv_dim, kv_heads, head_dim,
                             inv_freq.as<float>(), nullptr);
         }},
        // All chunks of a layer: the engine runs one launch per chunk between its GEMMs.
        {"silu_mul (all chunks)", 1, n * inter * (2 * 2 + 2),
         [&] {
           for (int64_t row0 = 0; row0 < n; row0 += rows) {
             const cudaError_t error =
                 LaunchSiluMul(gate_up.as<uint16_t>(), std::min(rows, n - row0),
                               static_cast<int>(inter), act.as<uint16_t>(), nullptr);
             if (error != cudaSuccess) return error;
           }
           return cudaSuccess;
         }},
        {"extract_kv (K or V, when exported)", 2, n * kv_dim * 2 * 2,
         [&] {
           return LaunchExtractKv(kv.as<uint16_t>(), n, 2 * kv_dim, kv_heads, head_dim,
                                  kLayerOpsBf16, false, exported.data, nullptr);
         }},
    };
    std::printf("\nN = %lld\n%-36s %10s %10s %10s %14s\n", static_cast<long long>(n), "kernel",
                "ms", "GB moved", "GB/s", "ms per layer");
    double layer_ms = 0, layer_ms_without_export = 0;
    for (const Op& op : ops) {
      const double ms = MedianMs(op.launch, reps);
      const double gb = static_cast<double>(op.bytes) * 1e-9;
      std::printf("%-36s %10.3f %10.3f %10.1f %14.3f\n", op.name, ms, gb, gb / (ms * 1e-3),
                  ms * op.per_layer);
      layer_ms += ms * op.per_layer;
      if (std::string(op.name).rfind("extract_kv", 0) != 0)
        layer_ms_without_export += ms * op.per_layer;
    }
    std::printf("%-36s %10s %10s %10s %14.3f\n", "per layer, K/V not exported", "", "", "",
                layer_ms_without_export);
    std::printf("%-36s %10s %10s %10s %14.3f\n", "per layer, K/V exported (bf16)", "", "", "",
                layer_ms);
  }
  return 0;
}

}  // namespace
}  // namespace anchorserve::cuda

int main(int argc, char** argv) { return anchorserve::cuda::Main(argc, argv); }
