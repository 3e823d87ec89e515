// anchor_prefill_bench: throughput of a prefill engine (CPU, or CUDA with --engine=cuda) on a
// checkpoint directory.
//
//   anchor_prefill_bench --model=DIR --tokens=1024[,2048...] [--dense | --theta=12] [--engine=cpu]
//                        [--block_size=128] [--step=16] [--threads=0] [--kv_dtype=bf16]
//                        [--repeats=1] [--per_layer] [--mlp_chunk_rows=0]
//
// Prints the model (fingerprint, parameters, load time), then per prompt length the prefill time,
// tokens/s, achieved GFLOP/s (linear layers 2 * N * linear parameters, plus attention
// 4 * d * computed score entries), the GEMMs' share and rate (summed per-layer GEMM times),
// on the CUDA engine the GPU time of the run and the wall time outside it,
// per-layer times with --per_layer, and the process's peak resident set (VmHWM from
// /proc/self/status). K/V go to a sink that only counts bytes. --mlp_chunk_rows sets the CUDA
// engine's MLP chunk height (0: its default).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/attention_types.h"
#include "model/model.h"
#include "model/prefill_engine_factory.h"

namespace anchorserve {
namespace {

struct Options {
  std::string model;
  std::vector<int64_t> tokens = {1024};
  bool dense = false;
  float theta = 12.0f;
  int block_size = 128, step = 16;
  int threads = 0;
  DType kv_dtype = DType::kBf16;
  int repeats = 1;
  bool per_layer = false;
  bool cuda = false;
  int64_t mlp_chunk_rows = 0;
};

bool ParseFlags(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    bool ok = true;
    if (key == "--model") {
      o->model = value;
    } else if (key == "--tokens") {
      o->tokens.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int64_t n = 0;
        ok = ok && absl::SimpleAtoi(part, &n) && n > 0;
        o->tokens.push_back(n);
      }
    } else if (key == "--dense") {
      o->dense = true;
    } else if (key == "--theta") {
      ok = absl::SimpleAtof(value, &o->theta);
    } else if (key == "--block_size") {
      ok = absl::SimpleAtoi(value, &o->block_size);
    } else if (key == "--step") {
      ok = absl::SimpleAtoi(value, &o->step);
    } else if (key == "--threads") {
      ok = absl::SimpleAtoi(value, &o->threads);
    } else if (key == "--kv_dtype") {
      if (value == "bf16") {
        o->kv_dtype = DType::kBf16;
      } else if (value == "fp16") {
        o->kv_dtype = DType::kFp16;
      } else if (value == "fp32") {
        o->kv_dtype = DType::kFp32;
      } else {
        ok = false;
      }
    } else if (key == "--repeats") {
      ok = absl::SimpleAtoi(value, &o->repeats) && o->repeats > 0;
    } else if (key == "--engine") {
      ok = value == "cpu" || value == "cuda";
      o->cuda = value == "cuda";
    } else if (key == "--per_layer") {
      o->per_layer = true;
    } else if (key == "--mlp_chunk_rows") {
      ok = absl::SimpleAtoi(value, &o->mlp_chunk_rows) && o->mlp_chunk_rows >= 0;
    } else {
      ok = false;
    }
    if (!ok) {
      fprintf(stderr, "bad flag: %s\n", arg.c_str());
      return false;
    }
  }
  if (o->model.empty()) {
    fprintf(stderr, "--model=DIR is required\n");
    return false;
  }
  return true;
}

// A /proc/self/status field in kB ("VmHWM", "VmRSS"), or -1.
int64_t StatusKb(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, field + ":")) continue;
    int64_t kb = -1;
    // "VmHWM:\t  1234 kB"; an 8-digit value leaves no space after the tab.
    std::vector<std::string> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (parts.size() >= 2 && absl::SimpleAtoi(parts[1], &kb)) return kb;
  }
  return -1;
}

class CountingSink : public KvSink {
 public:
  absl::Status OnLayer(int, absl::Span<const char> k, absl::Span<const char> v) override {
    bytes += static_cast<int64_t>(k.size() + v.size());
    return absl::OkStatus();
  }
  int64_t bytes = 0;
};

int Main(int argc, char** argv) {
  Options o;
  if (!ParseFlags(argc, argv, &o)) return 2;
  absl::StatusOr<std::unique_ptr<Model>> loaded = LoadModel(o.model, o.threads);
  if (!loaded.ok()) {
    fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const Model& model = **loaded;
  const ModelConfig& c = model.config();
  const int64_t linear_params =
      int64_t{c.num_layers} * (int64_t{c.hidden_size} * (2 * c.QDim() + 2 * c.KvDim()) +
                               3 * int64_t{c.hidden_size} * c.intermediate_size);
  printf("model %s: %s, %d layers, hidden %d, heads %d/%d, d %d, vocab %ld\n", o.model.c_str(),
         std::string(ArchitectureName(c.architecture)).c_str(), c.num_layers, c.hidden_size,
         c.num_heads, c.num_kv_heads, c.head_dim, static_cast<long>(c.vocab_size));
  printf("  %.1f M parameters (%s on disk, %.2f GB fp32 copies), loaded in %.2f s\n",
         model.num_parameters() / 1e6, std::string(DTypeName(model.weight_dtype())).c_str(),
         model.weight_storage().converted_bytes() / 1e9, model.load_seconds());
  printf("  fingerprint %s\n", model.fingerprint().c_str());
  printf("  peak RSS after load: %.2f GiB\n", StatusKb("VmHWM") / 1048576.0);

  absl::StatusOr<std::unique_ptr<PrefillEngine>> engine =
      CreatePrefillEngine(model, PrefillEngineOptions{.use_cuda = o.cuda,
                                                      .cuda_device = 0,
                                                      .cpu_threads = o.threads,
                                                      .mlp_chunk_rows = o.mlp_chunk_rows});
  if (!engine.ok()) {
    fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  std::mt19937 random(1);
  for (int64_t n : o.tokens) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int32_t& id : ids) id = static_cast<int32_t>(random() % c.vocab_size);
    PrefillTask task;
    task.token_ids = ids;
    if (o.dense) {
      task.config.mode = AttentionMode::kDense;
    } else {
      task.config.theta = o.theta;
      task.config.block_size = o.block_size;
      task.config.step = o.step;
    }
    task.kv_layer_end = c.num_layers;
    task.kv_dtype = o.kv_dtype;
    printf("\n%ld tokens, %s, workspace %.2f GB\n", static_cast<long>(n),
           o.dense ? "dense" : ("anchor theta " + std::to_string(o.theta)).c_str(),
           (*engine)->WorkspaceBytes(n, task.config) / 1e9);
    for (int r = 0; r < o.repeats; ++r) {
      CountingSink sink;
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<PrefillResult> result = (*engine)->Run(task, &sink);
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!result.ok()) {
        fprintf(stderr, "%s\n", result.status().ToString().c_str());
        return 1;
      }
      double attention_flops = 0, density = 0, attention = 0, identification = 0, gemm = 0;
      for (const PrefillLayerStats& layer : result->layers) {
        attention_flops += 4.0 * c.head_dim * c.num_heads * layer.density * CausalEntries(n);
        density += layer.density / c.num_layers;
        attention += layer.attention_seconds;
        identification += layer.identification_seconds;
        gemm += layer.gemm_seconds;
      }
      const double flops =
          2.0 * n * linear_params + attention_flops + 2.0 * c.vocab_size * c.hidden_size;
      printf(
          "  run %d: %.3f s, %.1f tokens/s, %.1f GFLOP/s, attention %.3f s + identification "
          "%.3f s, mean density %.3f, %.1f MB of K/V\n",
          r, seconds, n / seconds, flops / seconds / 1e9, attention, identification, density,
          sink.bytes / 1e6);
      if (gemm > 0) {
        printf("    GEMMs %.3f s (%.1f TFLOP/s), everything else %.3f s\n", gemm,
               2.0 * n * linear_params / gemm / 1e12, seconds - attention - identification - gemm);
      }
      if (o.cuda) {
        // compute_seconds is the GPU's time from the embedding to the logits: the rest of the wall
        // time is the run's allocations, their release and the host's waits around them.
        printf("    GPU time %.3f s (other kernels %.3f s), wall time outside it %.3f s\n",
               result->compute_seconds, result->compute_seconds - attention - identification - gemm,
               seconds - result->compute_seconds);
      }
      if (result->device_bytes_in_use > 0) {
        printf("    device memory in use after the last layer: %.2f GiB (whole process)\n",
               result->device_bytes_in_use / 1073741824.0);
      }
      if (o.per_layer && r == o.repeats - 1) {
        for (size_t l = 0; l < result->layers.size(); ++l) {
          const PrefillLayerStats& s = result->layers[l];
          printf(
              "    layer %2zu: %.4f s (attention %.4f s, identification %.4f s, GEMMs %.4f s, "
              "density %.3f)\n",
              l, s.layer_seconds, s.attention_seconds, s.identification_seconds, s.gemm_seconds,
              s.density);
        }
      }
    }
  }
  printf("\npeak RSS (VmHWM): %.2f GiB\n", StatusKb("VmHWM") / 1048576.0);
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) { return anchorserve::Main(argc, argv); }
