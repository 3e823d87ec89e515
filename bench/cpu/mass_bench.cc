// anchor_mass_bench: fixed theta against per-request mass targets, per head kind of the
// structured generator: kept work (density), true kept attention mass, output recall, and in
// mass-target mode how honest the estimate of kept mass is.
//
//   anchor_mass_bench [--backend=cpu|cuda] [--n=8192,16384] [--hq=32] [--hkv=8] [--d=128]
//                     [--dtype=bf16] [--seeds=0,1] [--thetas=8,10,12,15]
//                     [--targets=0.9,0.95,0.98] [--density_cap=1] [--min_theta=0]
//                     [--question_rows=128] [--threads=0] [--repeats=1] [--oracle_rows=0]
//                     [--groups=128:16]
//
// --groups=B:s,... runs every threshold and target with each group shape (block_size B, step s):
// a group of B*s rows shares one stripe set, and every row computes its anchor region (the first
// group and its own), so smaller groups lower that fixed share of the work. "work vs theta 12"
// is relative to theta 12 with the first shape.
//
// Every configuration runs on the same inputs as one dense run, which gives the true kept mass
// (exp(lse - lse_dense) per row) and the output recall. Times: the CPU backend's wall time per
// run; the CUDA backend's identification and attention kernel times (CUDA events, no host
// copies), the fastest of --repeats runs.
//
// --oracle_rows=R adds, per head kind, the density a per-row oracle needs: for R rows per head
// (evenly spaced in the second half of the sequence), the fewest keys of [0, i] whose dense
// softmax mass reaches each target, as a fraction of i + 1. No selection that keeps a set of
// keys per row can reach the target with less; AnchorAttention's sets are coarser (shared by a
// group's rows, always including the anchor region).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/sparsity_stats.h"
#include "kernels/structured_inputs.h"

ABSL_FLAG(std::string, n, "8192,16384", "sequence lengths");
ABSL_FLAG(int, hq, 32, "query heads");
ABSL_FLAG(int, hkv, 8, "KV heads");
ABSL_FLAG(int, d, 128, "head dim");
ABSL_FLAG(std::string, dtype, "bf16", "bf16, fp16 or fp32");
ABSL_FLAG(std::string, seeds, "0,1", "generator seeds");
ABSL_FLAG(std::string, thetas, "8,10,12,15", "fixed thresholds (nats)");
ABSL_FLAG(std::string, targets, "0.9,0.95,0.98", "mass targets p");
ABSL_FLAG(double, density_cap, 1.0, "mass_density_cap of the mass-target runs");
ABSL_FLAG(double, min_theta, 0.0, "mass_min_theta of the mass-target runs");
ABSL_FLAG(int, question_rows, 128, "generator: rows at the end that look up a far needle");
ABSL_FLAG(int, threads, 0, "CPU threads (0 = all)");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda");
ABSL_FLAG(int, repeats, 1, "runs per configuration and input (the fastest counts)");
ABSL_FLAG(int, oracle_rows, 0, "rows per head of the per-row oracle (0 = off)");
ABSL_FLAG(std::string, groups, "128:16", "group shapes block_size:step, comma-separated");

namespace anchorserve {
namespace {

template <typename T>
bool ParseList(const std::string& text, std::vector<T>* out) {
  out->clear();
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    double value = 0;
    if (!absl::SimpleAtod(part, &value)) return false;
    out->push_back(static_cast<T>(value));
  }
  return !out->empty();
}

struct Config {
  std::string name;
  AnchorConfig config;
};

// Per-head results of one configuration on one input.
struct HeadResult {
  double density = 0;
  double true_mass = 0;       // mean over rows of exp(lse - lse_dense), clamped to 1
  double output_recall = 0;   // fraction of the head's elements within 0.01 of dense
  double estimated_mass = 0;  // mass-target mode only
  double theta_mean = 0;      // mean chosen theta over groups with a finite one
  double full_groups = 0;     // fraction of identifying groups that kept everything
};

float ElementAsFloat(const std::vector<uint8_t>& data, DType dtype, size_t index) {
  switch (dtype) {
    case DType::kFp32:
      return reinterpret_cast<const float*>(data.data())[index];
    case DType::kBf16:
      return Bf16ToFloat(reinterpret_cast<const uint16_t*>(data.data())[index]);
    case DType::kFp16:
      return Fp16ToFloat(reinterpret_cast<const uint16_t*>(data.data())[index]);
  }
  return NAN;
}

std::vector<HeadResult> PerHead(const AttentionTask& task, const std::vector<uint8_t>& out,
                                const std::vector<float>& lse,
                                const std::vector<uint8_t>& dense_out,
                                const std::vector<float>& dense_lse) {
  const AttentionShape& shape = task.shape;
  const int64_t n = shape.seq_len;
  const RequestSummary summary = SummarizeHeads(n, task.head_stats);
  AttentionTask with_outputs = task;  // the sparse run's buffers, for ComputeRecall
  with_outputs.out = const_cast<uint8_t*>(out.data());
  with_outputs.maybe_lse = const_cast<float*>(lse.data());
  const RecallStats recall = ComputeRecall(with_outputs, dense_out.data(), dense_lse.data());
  std::vector<HeadResult> heads(shape.num_q_heads);
  for (int h = 0; h < shape.num_q_heads; ++h) {
    HeadResult& head = heads[h];
    const MassSummary& mass = summary.heads[h].mass;
    head.density = summary.heads[h].density;
    head.true_mass = recall.head_attention_mass[h];
    // Output recall per head (ComputeRecall reports it for the whole request only).
    int64_t within = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int e = 0; e < shape.head_dim; ++e) {
        const size_t index = (static_cast<size_t>(i) * shape.num_q_heads + h) * shape.head_dim + e;
        within += std::fabs(ElementAsFloat(out, task.dtype, index) -
                            ElementAsFloat(dense_out, task.dtype, index)) < 0.01f;
      }
    }
    head.output_recall = static_cast<double>(within) / static_cast<double>(n * shape.head_dim);
    if (task.config.UsesMassTarget()) {
      head.estimated_mass = mass.estimated_kept_mass;
      head.theta_mean = mass.theta_mean;
      const int64_t groups = mass.groups + mass.full_groups;
      head.full_groups =
          groups > 0 ? static_cast<double>(mass.full_groups) / static_cast<double>(groups) : 0;
    }
  }
  return heads;
}

struct Aggregate {
  double seconds = 0;
  double identification_seconds = 0;  // cuda only
  int runs = 0;
  std::map<std::string, std::vector<HeadResult>> by_kind;  // every head of every input
  std::vector<HeadResult> all;
};

double Mean(const std::vector<HeadResult>& heads, double HeadResult::*field) {
  double sum = 0;
  for (const HeadResult& head : heads) sum += head.*field;
  return heads.empty() ? 0 : sum / static_cast<double>(heads.size());
}

double Min(const std::vector<HeadResult>& heads, double HeadResult::*field) {
  double best = 1e300;
  for (const HeadResult& head : heads) best = std::min(best, head.*field);
  return best;
}

// Per-row oracle: for `rows` rows of head h (evenly spaced over [N/2, N)), the fraction of keys
// [0, i] that the largest dense softmax probabilities need to reach each target, averaged over
// the rows. fp64 scores from the bf16/fp16/fp32 inputs.
std::vector<double> OracleDensity(const HostQkv& qkv, int h, int rows,
                                  const std::vector<float>& targets) {
  const AttentionShape& shape = qkv.shape;
  const int64_t n = shape.seq_len;
  const int d = shape.head_dim;
  const int kv_head = h / shape.GqaRatio();
  const TensorStrides q_strides = StridesFor(qkv.layout, n, shape.num_q_heads, d);
  const TensorStrides kv_strides = StridesFor(qkv.layout, n, shape.num_kv_heads, d);
  const size_t element = ElementSize(qkv.dtype);
  std::vector<float> q(d), k(static_cast<size_t>(n) * d);
  for (int64_t j = 0; j < n; ++j) {
    ConvertToFloat(qkv.k.data() + (j * kv_strides.token + kv_head * kv_strides.head) * element,
                   qkv.dtype, d, k.data() + j * d);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> sums(targets.size(), 0.0), p;
  for (int r = 0; r < rows; ++r) {
    const int64_t i = n / 2 + (n / 2) * r / std::max(rows, 1);
    ConvertToFloat(qkv.q.data() + (i * q_strides.token + h * q_strides.head) * element, qkv.dtype,
                   d, q.data());
    p.assign(static_cast<size_t>(i + 1), 0.0);
    double best = -1e300;
    for (int64_t j = 0; j <= i; ++j) {
      double dot = 0;
      for (int e = 0; e < d; ++e) dot += static_cast<double>(q[e]) * k[j * d + e];
      p[j] = scale * dot;
      best = std::max(best, p[j]);
    }
    double total = 0;
    for (double& value : p) total += (value = std::exp(value - best));
    std::sort(p.begin(), p.end(), std::greater<>());
    for (size_t t = 0; t < targets.size(); ++t) {
      double kept = 0;
      int64_t count = 0;
      while (count <= i && kept < static_cast<double>(targets[t]) * total) kept += p[count++];
      sums[t] += static_cast<double>(count) / static_cast<double>(i + 1);
    }
  }
  for (double& sum : sums) sum /= std::max(rows, 1);
  return sums;
}

struct RunTimes {
  double seconds = 0;                 // cpu: wall; cuda: identification + attention kernels
  double identification_seconds = 0;  // cuda only
};

// The fastest of --repeats runs of `task`.
absl::Status TimedRun(AttentionBackend& backend, bool cuda, AttentionTask* task, RunTimes* times) {
  *times = RunTimes{1e300, 1e300};
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_repeats)); ++r) {
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = backend.Run({task});
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!status.ok()) return status;
    if (!task->status.ok()) return task->status;
    const StageTimes& stages = task->times;
    times->seconds = std::min(times->seconds,
                              cuda ? stages.identification_seconds + stages.compute_seconds : wall);
    times->identification_seconds =
        std::min(times->identification_seconds, cuda ? stages.identification_seconds : 0.0);
  }
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<int64_t> lengths;
  std::vector<uint64_t> seeds;
  std::vector<float> thetas, targets;
  if (!ParseList(absl::GetFlag(FLAGS_n), &lengths) ||
      !ParseList(absl::GetFlag(FLAGS_seeds), &seeds) ||
      !ParseList(absl::GetFlag(FLAGS_thetas), &thetas) ||
      !ParseList(absl::GetFlag(FLAGS_targets), &targets)) {
    std::fprintf(stderr, "--n, --seeds, --thetas and --targets take comma-separated numbers\n");
    return 2;
  }
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  const DType dtype = dtype_name == "fp32"   ? DType::kFp32
                      : dtype_name == "fp16" ? DType::kFp16
                                             : DType::kBf16;
  const bool cuda = absl::GetFlag(FLAGS_backend) == "cuda";
  if (!cuda && absl::GetFlag(FLAGS_backend) != "cpu") {
    std::fprintf(stderr, "--backend must be cpu or cuda\n");
    return 2;
  }
  BackendOptions backend_options;
  backend_options.kind = BackendKind::kCuda;
  auto backend_or = cuda ? CreateBackend(backend_options)
                         : CreateCpuBackendWithKernels(absl::GetFlag(FLAGS_threads), "");
  if (!backend_or.ok()) {
    std::fprintf(stderr, "%s\n", backend_or.status().ToString().c_str());
    return 1;
  }
  std::vector<std::pair<int, int>> group_shapes;  // (block_size, step)
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_groups), ',', absl::SkipEmpty())) {
    std::pair<std::string, std::string> fields = absl::StrSplit(part, ':');
    int block_size = 0, step = 0;
    if (!absl::SimpleAtoi(fields.first, &block_size) || !absl::SimpleAtoi(fields.second, &step)) {
      std::fprintf(stderr, "--groups takes block_size:step pairs, e.g. 128:16,128:4\n");
      return 2;
    }
    group_shapes.emplace_back(block_size, step);
  }
  if (group_shapes.empty()) group_shapes.emplace_back(128, 16);
  AttentionBackend& backend = **backend_or;
  std::vector<Config> configs;
  for (const auto& [block_size, step] : group_shapes) {
    const std::string suffix =
        group_shapes.size() > 1 ? absl::StrFormat(", B %d s %d", block_size, step) : "";
    std::vector<Config> shape_configs;
    for (float theta : thetas) {
      Config c{"theta " + std::to_string(theta).substr(0, 4) + suffix, {}};
      c.config.theta = theta;
      shape_configs.push_back(c);
    }
    for (float p : targets) {
      Config c{"p " + std::to_string(p).substr(0, 4) + suffix, {}};
      c.config.mass_target = p;
      c.config.mass_density_cap = static_cast<float>(absl::GetFlag(FLAGS_density_cap));
      c.config.mass_min_theta = static_cast<float>(absl::GetFlag(FLAGS_min_theta));
      shape_configs.push_back(c);
    }
    for (Config& c : shape_configs) {
      c.config.block_size = block_size;
      c.config.step = step;
      configs.push_back(c);
    }
  }
  std::printf("# %s; Hq=%d Hkv=%d d=%d %s, structured generator (question_rows=%d), seeds %s\n",
              backend.Info().device.c_str(), absl::GetFlag(FLAGS_hq), absl::GetFlag(FLAGS_hkv),
              absl::GetFlag(FLAGS_d), dtype_name.c_str(), absl::GetFlag(FLAGS_question_rows),
              absl::GetFlag(FLAGS_seeds).c_str());
  for (int64_t n : lengths) {
    const AttentionShape shape{n, absl::GetFlag(FLAGS_hq), absl::GetFlag(FLAGS_hkv),
                               absl::GetFlag(FLAGS_d)};
    std::vector<Aggregate> results(configs.size());
    double dense_seconds = 0;
    const int oracle_rows = absl::GetFlag(FLAGS_oracle_rows);
    std::map<std::string, std::vector<std::vector<double>>> oracle_by_kind;  // per head: [target]
    for (uint64_t seed : seeds) {
      StructuredInputOptions options;
      options.seed = seed;
      options.question_rows = absl::GetFlag(FLAGS_question_rows);
      absl::StatusOr<HostQkv> qkv =
          GenerateStructuredQkv(shape, dtype, Layout::kTokenMajor, options);
      if (!qkv.ok()) {
        std::fprintf(stderr, "%s\n", qkv.status().ToString().c_str());
        return 1;
      }
      if (oracle_rows > 0) {
        for (int h = 0; h < shape.num_q_heads; ++h) {
          oracle_by_kind[std::string(StructuredHeadKindName(qkv->head_kinds[h]))].push_back(
              OracleDensity(*qkv, h, oracle_rows, targets));
        }
      }
      std::vector<uint8_t> dense_out(qkv->q.size()), out(qkv->q.size());
      std::vector<float> dense_lse(static_cast<size_t>(n) * shape.num_q_heads), lse(dense_lse);
      AttentionTask dense;
      BindInputs(*qkv, &dense);
      dense.out = dense_out.data();
      dense.maybe_lse = dense_lse.data();
      dense.config.mode = AttentionMode::kDense;
      RunTimes times;
      absl::Status status = TimedRun(backend, cuda, &dense, &times);
      dense_seconds += times.seconds;
      if (!status.ok()) {
        std::fprintf(stderr, "%s\n", status.ToString().c_str());
        return 1;
      }
      for (size_t c = 0; c < configs.size(); ++c) {
        AttentionTask task;
        BindInputs(*qkv, &task);
        task.out = out.data();
        task.maybe_lse = lse.data();
        task.config = configs[c].config;
        status = TimedRun(backend, cuda, &task, &times);
        results[c].seconds += times.seconds;
        results[c].identification_seconds += times.identification_seconds;
        if (!status.ok()) {
          std::fprintf(stderr, "%s\n", status.ToString().c_str());
          return 1;
        }
        ++results[c].runs;
        const std::vector<HeadResult> heads = PerHead(task, out, lse, dense_out, dense_lse);
        for (int h = 0; h < shape.num_q_heads; ++h) {
          results[c].by_kind[std::string(StructuredHeadKindName(qkv->head_kinds[h]))].push_back(
              heads[h]);
          results[c].all.push_back(heads[h]);
        }
      }
    }
    const double runs = static_cast<double>(seeds.size());
    // cuda: milliseconds of GPU kernels; cpu: seconds of wall time.
    const double unit = cuda ? 1e3 : 1.0;
    std::printf("\n## N = %lld (dense %.3f %s per run)\n\n", static_cast<long long>(n),
                unit * dense_seconds / runs, cuda ? "GPU ms" : "CPU s");
    std::printf(
        "| config | %s | density | work vs theta 12 | mass recall mean | worst kind mean | "
        "worst head | output recall 0.01 | estimated mass | mean abs(est - true) | worst head "
        "est - true |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        cuda ? "GPU ms (identification)" : "CPU s");
    double theta12_density = 0;
    for (size_t c = 0; c < configs.size(); ++c) {
      if (configs[c].name.rfind("theta 12", 0) == 0 && theta12_density == 0) {
        theta12_density = Mean(results[c].all, &HeadResult::density);
      }
    }
    for (size_t c = 0; c < configs.size(); ++c) {
      const Aggregate& a = results[c];
      double worst_kind = 1e300;
      for (const auto& [kind, heads] : a.by_kind) {
        worst_kind = std::min(worst_kind, Mean(heads, &HeadResult::true_mass));
      }
      const double density = Mean(a.all, &HeadResult::density);
      if (cuda) {
        std::printf("| %s | %.3f (%.3f) |", configs[c].name.c_str(), unit * a.seconds / runs,
                    unit * a.identification_seconds / runs);
      } else {
        std::printf("| %s | %.2f |", configs[c].name.c_str(), a.seconds / runs);
      }
      std::printf(" %.4f | %.3f | %.4f | %.4f | %.4f | %.4f |", density,
                  theta12_density > 0 ? density / theta12_density : 0,
                  Mean(a.all, &HeadResult::true_mass), worst_kind,
                  Min(a.all, &HeadResult::true_mass), Mean(a.all, &HeadResult::output_recall));
      if (configs[c].config.UsesMassTarget()) {
        double abs_error = 0, worst = -1e300;
        for (const HeadResult& head : a.all) {
          abs_error += std::fabs(head.estimated_mass - head.true_mass);
          worst = std::max(worst, head.estimated_mass - head.true_mass);
        }
        std::printf(" %.4f | %.4f | %+.4f |\n", Mean(a.all, &HeadResult::estimated_mass),
                    abs_error / static_cast<double>(a.all.size()), worst);
      } else {
        std::printf(" | | |\n");
      }
    }
    std::printf(
        "\nBy head kind (mean over heads and seeds): density / true mass / output recall "
        "[/ estimated mass / mean theta / full groups]\n\n| config |");
    for (const auto& [kind, heads] : results[0].by_kind) {
      std::printf(" %s (%zu) |", kind.c_str(), heads.size());
    }
    std::printf("\n|---|");
    for (size_t k = 0; k < results[0].by_kind.size(); ++k) std::printf("---|");
    std::printf("\n");
    for (size_t c = 0; c < configs.size(); ++c) {
      std::printf("| %s |", configs[c].name.c_str());
      for (const auto& [kind, heads] : results[c].by_kind) {
        std::printf(" %.3f / %.4f / %.3f", Mean(heads, &HeadResult::density),
                    Mean(heads, &HeadResult::true_mass), Mean(heads, &HeadResult::output_recall));
        if (configs[c].config.UsesMassTarget()) {
          std::printf(" / %.4f / %.1f / %.2f", Mean(heads, &HeadResult::estimated_mass),
                      Mean(heads, &HeadResult::theta_mean), Mean(heads, &HeadResult::full_groups));
        }
        std::printf(" |");
      }
      std::printf("\n");
    }
    if (oracle_rows > 0) {
      std::printf(
          "\nPer-row oracle (%d rows per head in [N/2, N)): mean fraction of keys [0, i] whose "
          "dense mass reaches the target\n\n| target |",
          oracle_rows);
      for (const auto& [kind, heads] : oracle_by_kind) {
        std::printf(" %s (%zu) |", kind.c_str(), heads.size());
      }
      std::printf(" all |\n|---|");
      for (size_t k = 0; k <= oracle_by_kind.size(); ++k) std::printf("---|");
      std::printf("\n");
      for (size_t t = 0; t < targets.size(); ++t) {
        std::printf("| p %.2f |", targets[t]);
        double all = 0;
        size_t count = 0;
        for (const auto& [kind, heads] : oracle_by_kind) {
          double sum = 0;
          for (const std::vector<double>& head : heads) sum += head[t];
          std::printf(" %.4f |", sum / static_cast<double>(heads.size()));
          all += sum;
          count += heads.size();
        }
        std::printf(" %.4f |\n", all / static_cast<double>(count));
      }
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) { return anchorserve::Main(argc, argv); }
