// anchor_cpu_bench: throughput of the CPU backend (dense and AnchorAttention) on structured or
// random inputs, and the density AnchorAttention keeps.
//
//   anchor_cpu_bench [--n=4096,8192,16384] [--hq=8] [--hkv=2] [--d=128] [--dtype=fp32]
//                    [--layout=token|head] [--mode=both|dense|anchor] [--theta=12]
//                    [--threads=0] [--kernels=avx512|avx2|portable] [--inputs=structured|random]
//                    [--seed=0] [--repeats=2]
//                    [--gen.<StructuredInputOptions field>=value ...]
//
// GFLOP/s count kept work only: 4 * d * computed entries (2 for QK^T, 2 for PV per entry), the
// same definition for both modes, so anchor mode's rate shows how fast the kept work runs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/sparsity_stats.h"
#include "kernels/structured_inputs.h"

namespace anchorserve {
namespace {

struct Options {
  std::vector<int64_t> lengths = {4096, 8192, 16384};
  int hq = 8, hkv = 2, d = 128;
  DType dtype = DType::kFp32;
  Layout layout = Layout::kTokenMajor;
  std::string mode = "both";
  float theta = 12.0f;
  int threads = 0;
  std::string kernels;  // empty: the fastest this CPU runs
  std::string inputs = "structured";
  uint64_t seed = 0;
  int repeats = 2;
  StructuredInputOptions structured;
};

// --gen.<knob>=value sets a StructuredInputOptions field (for exploring the generator).
bool SetGeneratorKnob(const std::string& knob, const std::string& value,
                      StructuredInputOptions* g) {
  float f = 0;
  int i = 0;
  double x = 0;
  const std::map<std::string, float*> floats = {
      {"stripe_head_fraction", &g->stripe_head_fraction},
      {"retrieval_head_fraction", &g->retrieval_head_fraction},
      {"diffuse_head_fraction", &g->diffuse_head_fraction},
      {"sink_strength", &g->sink_strength},
      {"local_strength", &g->local_strength},
      {"stripe_strength", &g->stripe_strength},
      {"needle_strength", &g->needle_strength},
      {"salience_strength", &g->salience_strength},
      {"background_noise", &g->background_noise},
      {"diffuse_noise", &g->diffuse_noise},
      {"sharpness_jitter", &g->sharpness_jitter},
      {"value_std", &g->value_std}};
  const std::map<std::string, int*> ints = {{"sink_tokens", &g->sink_tokens},
                                            {"local_window", &g->local_window},
                                            {"needles", &g->needles},
                                            {"needle_query_rows", &g->needle_query_rows},
                                            {"question_rows", &g->question_rows}};
  if (auto it = floats.find(knob); it != floats.end()) {
    if (!absl::SimpleAtof(value, &f)) return false;
    *it->second = f;
    return true;
  }
  if (auto it = ints.find(knob); it != ints.end()) {
    if (!absl::SimpleAtoi(value, &i)) return false;
    *it->second = i;
    return true;
  }
  if (knob == "stripe_rate" && absl::SimpleAtod(value, &x)) {
    g->stripe_rate = x;
    return true;
  }
  return false;
}

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad argument '%s' (use --name=value)\n", arg.c_str());
      return false;
    }
    const std::string name = arg.substr(2, eq - 2);
    const std::string value = arg.substr(eq + 1);
    bool ok = true;
    if (name == "n") {
      o->lengths.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int64_t n = 0;
        ok = ok && absl::SimpleAtoi(part, &n) && n > 0;
        o->lengths.push_back(n);
      }
    } else if (name == "hq") {
      ok = absl::SimpleAtoi(value, &o->hq);
    } else if (name == "hkv") {
      ok = absl::SimpleAtoi(value, &o->hkv);
    } else if (name == "d") {
      ok = absl::SimpleAtoi(value, &o->d);
    } else if (name == "dtype") {
      ok = value == "fp32" || value == "bf16" || value == "fp16";
      o->dtype = value == "fp32" ? DType::kFp32 : value == "bf16" ? DType::kBf16 : DType::kFp16;
    } else if (name == "layout") {
      ok = value == "token" || value == "head";
      o->layout = value == "head" ? Layout::kHeadMajor : Layout::kTokenMajor;
    } else if (name == "mode") {
      ok = value == "both" || value == "dense" || value == "anchor";
      o->mode = value;
    } else if (name == "theta") {
      ok = absl::SimpleAtof(value, &o->theta);
    } else if (name == "kernels") {
      o->kernels = value;
    } else if (name == "threads") {
      ok = absl::SimpleAtoi(value, &o->threads);
    } else if (name == "inputs") {
      ok = value == "structured" || value == "random";
      o->inputs = value;
    } else if (name == "seed") {
      ok = absl::SimpleAtoi(value, &o->seed);
    } else if (name.rfind("gen.", 0) == 0) {
      ok = SetGeneratorKnob(name.substr(4), value, &o->structured);
    } else if (name == "repeats") {
      ok = absl::SimpleAtoi(value, &o->repeats) && o->repeats >= 0;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "bad value in '%s'\n", arg.c_str());
      return false;
    }
  }
  return true;
}

int Main(int argc, char** argv) {
  Options o;
  if (!ParseArgs(argc, argv, &o)) return 2;
  auto backend_or = CreateCpuBackendWithKernels(o.threads, o.kernels);
  if (!backend_or.ok()) {
    std::fprintf(stderr, "%s\n", backend_or.status().ToString().c_str());
    return 1;
  }
  AttentionBackend& backend = **backend_or;
  const int threads = o.threads > 0
                          ? o.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("# %s\n", backend.Info().device.c_str());
  std::printf("# Hq=%d Hkv=%d d=%d dtype=%s inputs=%s seed=%llu theta=%g threads=%d repeats=%d\n",
              o.hq, o.hkv, o.d, std::string(DTypeName(o.dtype)).c_str(), o.inputs.c_str(),
              static_cast<unsigned long long>(o.seed), o.theta, threads, o.repeats);
  std::printf("%-7s %-6s %9s %8s %10s %10s %9s %9s %12s\n", "N", "mode", "density", "stripe_d",
              "ident_ms", "compute_ms", "total_ms", "GFLOP/s", "GFLOP/s/core");
  for (const int64_t n : o.lengths) {
    const AttentionShape shape{n, o.hq, o.hkv, o.d};
    absl::StatusOr<HostQkv> qkv;
    const auto generate_start = std::chrono::steady_clock::now();
    if (o.inputs == "structured") {
      StructuredInputOptions options = o.structured;
      options.seed = o.seed;
      qkv = GenerateStructuredQkv(shape, o.dtype, o.layout, options);
    } else {
      qkv = GenerateRandomQkv(shape, o.dtype, o.layout, o.seed);
    }
    if (!qkv.ok()) {
      std::fprintf(stderr, "%s\n", qkv.status().ToString().c_str());
      return 1;
    }
    std::printf(
        "#   N=%lld: %s inputs generated in %.2f s\n", static_cast<long long>(n), o.inputs.c_str(),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - generate_start).count());
    std::map<std::string, std::vector<uint8_t>> outs;
    std::map<std::string, std::vector<float>> lses;
    std::vector<std::string> modes;
    if (o.mode != "anchor") modes.push_back("dense");
    if (o.mode != "dense") modes.push_back("anchor");
    std::map<std::string, RequestSummary> summaries;
    for (const std::string& mode : modes) {
      AttentionTask task;
      BindInputs(*qkv, &task);
      std::vector<uint8_t>& out = outs[mode];
      std::vector<float>& lse = lses[mode];
      out.resize(qkv->q.size());
      lse.resize(static_cast<size_t>(n) * o.hq);
      task.out = out.data();
      task.maybe_lse = lse.data();
      task.config.theta = o.theta;
      task.config.mode = mode == "dense" ? AttentionMode::kDense : AttentionMode::kAnchor;
      double best_total = 1e30, ident = 0, compute = 0;
      // With repeats >= 1 the first run only warms up; --repeats=0 times a single cold run.
      for (int r = 0; r < std::max(1, o.repeats + (o.repeats > 0)); ++r) {
        const auto start = std::chrono::steady_clock::now();
        const absl::Status status = backend.Run({&task});
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (!status.ok()) {
          std::fprintf(stderr, "%s\n", status.ToString().c_str());
          return 1;
        }
        if ((r > 0 || o.repeats == 0) && seconds < best_total) {
          best_total = seconds;
          ident = task.times.identification_seconds;
          compute = task.times.compute_seconds;
        }
      }
      const RequestSummary summary = SummarizeHeads(n, task.head_stats);
      int64_t computed = 0;
      for (const HeadStats& stats : task.head_stats) computed += stats.computed_entries;
      const double gflops = 4.0 * o.d * static_cast<double>(computed) / best_total / 1e9;
      std::printf("%-7lld %-6s %9.4f %8.4f %10.1f %10.1f %9.1f %9.1f %12.1f\n",
                  static_cast<long long>(n), mode.c_str(), summary.density, summary.stripe_density,
                  ident * 1e3, compute * 1e3, best_total * 1e3, gflops, gflops / threads);
      summaries[mode] = summary;
      if (mode == "anchor" && outs.count("dense")) {
        const RecallStats recall = ComputeRecall(task, outs["dense"].data(), lses["dense"].data());
        std::printf(
            "#   recall vs dense: output(0.01) %.4f output(0.005) %.4f mass mean %.5f min %.5f\n",
            recall.output_recall_tau_0_01, recall.output_recall_tau_0_005,
            recall.attention_mass_mean, recall.attention_mass_min);
      }
    }
    if (summaries.count("anchor") && !qkv->head_kinds.empty()) {
      // Density by head kind, to see what the structured generator's heads keep.
      std::map<std::string, std::pair<double, int>> by_kind;
      const RequestSummary& summary = summaries["anchor"];
      for (int h = 0; h < o.hq; ++h) {
        auto& entry = by_kind[std::string(StructuredHeadKindName(qkv->head_kinds[h]))];
        entry.first += summary.heads[h].density;
        ++entry.second;
      }
      std::printf("#   density by head kind:");
      for (const auto& [kind, entry] : by_kind) {
        std::printf(" %s=%.3f (%d)", kind.c_str(), entry.first / entry.second, entry.second);
      }
      std::printf("; stripes/group min %lld mean %.1f max %lld\n",
                  static_cast<long long>(summary.stripes.min), summary.stripes.mean,
                  static_cast<long long>(summary.stripes.max));
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) { return anchorserve::Main(argc, argv); }
