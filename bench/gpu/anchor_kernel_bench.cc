// End-to-end kernel benchmark of the CUDA AnchorAttention path on the Llama-3.1-8B attention
// shape (Hq 32, Hkv 8, d 128, bf16, batch 1, token-major), structured inputs
// (kernels/structured_inputs.h): per-stage times (anchor, stripes, sparse attention), TFLOP/s on
// kept work, density, output and attention-mass recall against our dense kernel, our dense
// kernel's time, and the speedup over cuDNN (torch SDPA, measured in the same device run by
// bench/gpu/sdpa_baseline.py and passed in with --sdpa_log).
//
// Accuracy: on sampled (head, row) pairs, an fp64 evaluation of the spec with the GPU's own
// stripe selection; the target is at most 0.01% of output elements off by more than 0.01.
//
// Timing: CUDA events around each stage on the runner's stream, one warm-up, median of --reps.
// Inputs are uploaded once per N; outputs are poisoned (0xff = NaN) before the warm-up.
//
// Stage parts (--stage_lengths, at the main theta): the stage launchers of identification.h timed
// one at a time, so that pooling and stripe compaction show apart from the anchor and stripe
// stages they end.
//
// Usage: anchor_kernel_bench [--out=DIR] [--lengths=4096,...] [--theta=12]
//          [--sweep_thetas=8,12,15,20] [--sweep_lengths=32768,131072] [--reps=5]
//          [--sample_rows=256] [--sdpa_log=FILE] [--seed=0] [--stage_lengths=32768,131072]
//          [--q_heads=32 --kv_heads=8]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/gpu/bench_recall.h"
#include "bench/gpu/bench_util.h"
#include "kernels/attention_types.h"
#include "kernels/cuda/attention_runner.h"
#include "kernels/cuda/identification.h"
#include "kernels/cuda/identification_types.h"
#include "kernels/sparsity_stats.h"
#include "kernels/structured_inputs.h"

namespace anchorserve {
namespace {

constexpr int kD = 128;

#define BENCH_OK(expr)                                                                           \
  do {                                                                                           \
    const absl::Status bench_status_ = (expr);                                                   \
    if (!bench_status_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, bench_status_.ToString().c_str()); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (false)

struct Options {
  std::string out_dir = ".";
  std::vector<int64_t> lengths = {4096, 8192, 16384, 32768, 65536, 131072};
  float theta = 12;
  std::vector<float> sweep_thetas = {8, 12, 15, 20};
  std::vector<int64_t> sweep_lengths = {32768, 131072};
  int reps = 5;
  int sample_rows = 256;
  std::string sdpa_log;
  uint64_t seed = 0;
  std::vector<int64_t> stage_lengths;
  int q_heads = 32;  // Llama-3.1-8B; Qwen2.5-7B is 28 over 4
  int kv_heads = 8;
};

template <typename T>
std::vector<T> ParseList(const std::string& text) {
  std::vector<T> values;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) values.push_back(static_cast<T>(std::stod(item)));
  }
  return values;
}

Options ParseOptions(int argc, char** argv) {
  Options options;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (key == "--out") {
      options.out_dir = value;
    } else if (key == "--lengths") {
      options.lengths = ParseList<int64_t>(value);
    } else if (key == "--theta") {
      options.theta = std::stof(value);
    } else if (key == "--sweep_thetas") {
      options.sweep_thetas = ParseList<float>(value);
    } else if (key == "--sweep_lengths") {
      options.sweep_lengths = ParseList<int64_t>(value);
    } else if (key == "--reps") {
      options.reps = std::max(1, std::stoi(value));
    } else if (key == "--sample_rows") {
      options.sample_rows = std::stoi(value);
    } else if (key == "--sdpa_log") {
      options.sdpa_log = value;
    } else if (key == "--seed") {
      options.seed = std::stoull(value);
    } else if (key == "--q_heads") {
      options.q_heads = std::stoi(value);
    } else if (key == "--kv_heads") {
      options.kv_heads = std::stoi(value);
    } else if (key == "--stage_lengths") {
      options.stage_lengths = ParseList<int64_t>(value);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      std::exit(2);
    }
  }
  return options;
}

// "sdpa   N=  4096            ms=    0.900  TFLOP/s=..." lines of sdpa_baseline.py.
std::map<int64_t, double> ReadSdpaLog(const std::string& path) {
  std::map<int64_t, double> ms_by_n;
  if (path.empty()) return ms_by_n;
  std::ifstream file(path);
  std::string line;
  while (std::getline(file, line)) {
    const size_t n_at = line.find("N=");
    const size_t ms_at = line.find("ms=");
    if (line.rfind("sdpa", 0) != 0 || n_at == std::string::npos || ms_at == std::string::npos) {
      continue;
    }
    ms_by_n[std::stoll(line.substr(n_at + 2))] = std::stod(line.substr(ms_at + 3));
  }
  return ms_by_n;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

class EventTimer {
 public:
  explicit EventTimer(int count) : events_(count) {
    for (cudaEvent_t& event : events_) BENCH_CUDA(cudaEventCreate(&event));
  }
  ~EventTimer() {
    for (cudaEvent_t event : events_) cudaEventDestroy(event);
  }
  void Record(int i, cudaStream_t stream) { BENCH_CUDA(cudaEventRecord(events_[i], stream)); }
  double Ms(int from, int to) const {
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, events_[from], events_[to]));
    return ms;
  }

 private:
  std::vector<cudaEvent_t> events_;
};

struct Row {
  int64_t n = 0;
  float theta = 0;
  double anchor_ms = 0, stripes_ms = 0, sparse_ms = 0, dense_ms = 0, cudnn_ms = 0;
  double anchor_tflops = 0, stripe_tflops = 0, sparse_tflops = 0, dense_tflops = 0;
  double cudnn_tflops = 0;
  double density = 0, stripe_density = 0, stripes_mean = 0;
  double recall_0_01 = 0, recall_0_005 = 0, mass_mean = 0, mass_min = 0;
  int64_t accuracy_elements = 0, accuracy_off = 0;
  double accuracy_max_err = 0;
  int64_t workspace_bytes = 0;

  // Mode auto (the service default) at this N and the benchmark's region parameters: dense
  // without identification, or identification plus the sparse pass.
  bool AutoIsDense() const {
    AnchorConfig config;
    config.mode = AttentionMode::kAuto;
    return ResolveMode(config, n).mode == AttentionMode::kDense;
  }
  double AutoMs() const { return AutoIsDense() ? dense_ms : anchor_ms + stripes_ms + sparse_ms; }
};

// fp64 evaluation of the spec for sampled (head, row) pairs with the GPU's stripe selection.
void CheckAccuracy(const cuda::AttentionRunner& runner, const HostQkv& qkv,
                   const AnchorConfig& config, int sample_rows, uint64_t seed, Row* row) {
  const int64_t n = qkv.shape.seq_len;
  const int64_t group_size = config.GroupSize();
  const int hq = qkv.shape.num_q_heads;
  const int hkv = qkv.shape.num_kv_heads;
  const double scale = config.ScaleFor(kD);
  const cuda::IdentificationParams id = runner.identification_params();
  const cuda::BatchPlan& plan = runner.plan();
  struct Sample {
    int head;
    int64_t row;
    std::vector<int32_t> stripes;
    std::vector<uint16_t> gpu_out;
  };
  std::vector<Sample> samples;
  uint64_t state = seed * 0x9e3779b97f4a7c15ull + 12345;
  const int64_t first_row = n > 2 * group_size ? 2 * group_size : 0;  // rows with candidates
  for (int s = 0; s < sample_rows; ++s) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    Sample sample;
    sample.head = s % hq;
    sample.row = first_row + static_cast<int64_t>((state >> 17) % (n - first_row));
    const int64_t list = (plan.seqs[0].group_begin + sample.row / group_size) * hq + sample.head;
    int32_t count = 0;
    BENCH_CUDA(cudaMemcpy(&count, id.lists.count + list, sizeof(count), cudaMemcpyDeviceToHost));
    sample.stripes.resize(count);
    if (count > 0) {
      BENCH_CUDA(cudaMemcpy(sample.stripes.data(), id.lists.index + plan.list_offset[list],
                            count * sizeof(int32_t), cudaMemcpyDeviceToHost));
    }
    sample.gpu_out.resize(kD);
    BENCH_CUDA(cudaMemcpy(
        sample.gpu_out.data(),
        static_cast<const uint16_t*>(runner.out()) + (sample.row * hq + sample.head) * kD,
        kD * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    samples.push_back(std::move(sample));
  }
  const uint16_t* q = reinterpret_cast<const uint16_t*>(qkv.q.data());
  const uint16_t* k = reinterpret_cast<const uint16_t*>(qkv.k.data());
  const uint16_t* v = reinterpret_cast<const uint16_t*>(qkv.v.data());
  std::atomic<int> next{0};
  std::vector<int64_t> off_by_worker;
  std::vector<double> max_by_worker;
  const int workers = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  off_by_worker.assign(workers, 0);
  max_by_worker.assign(workers, 0);
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      std::vector<int64_t> keys;
      std::vector<double> scores;
      double qrow[kD], acc[kD];
      for (int s = next++; s < static_cast<int>(samples.size()); s = next++) {
        const Sample& sample = samples[s];
        const int64_t i = sample.row;
        const int kv = sample.head / (hq / hkv);
        const int64_t g = i / group_size;
        const int64_t init_end = std::min<int64_t>(int64_t{config.init_groups} * group_size, n);
        const int64_t local_begin = std::max<int64_t>(int64_t{config.init_groups} * group_size,
                                                      (g - config.local_groups + 1) * group_size);
        keys.clear();
        for (int64_t j = 0; j < std::min(init_end, i + 1); ++j) keys.push_back(j);
        for (int32_t j : sample.stripes) keys.push_back(j);
        for (int64_t j = std::max<int64_t>(local_begin, 0); j <= i; ++j) keys.push_back(j);
        for (int e = 0; e < kD; ++e) qrow[e] = Bf16ToFloat(q[(i * hq + sample.head) * kD + e]);
        scores.resize(keys.size());
        double best = -INFINITY;
        for (size_t c = 0; c < keys.size(); ++c) {
          const uint16_t* krow = k + (keys[c] * hkv + kv) * kD;
          double dot = 0;
          for (int e = 0; e < kD; ++e) dot += qrow[e] * Bf16ToFloat(krow[e]);
          scores[c] = scale * dot;
          best = std::max(best, scores[c]);
        }
        double sum = 0;
        std::fill(acc, acc + kD, 0.0);
        for (size_t c = 0; c < keys.size(); ++c) {
          const double p = std::exp(scores[c] - best);
          sum += p;
          const uint16_t* vrow = v + (keys[c] * hkv + kv) * kD;
          for (int e = 0; e < kD; ++e) acc[e] += p * Bf16ToFloat(vrow[e]);
        }
        for (int e = 0; e < kD; ++e) {
          const double err = std::fabs(Bf16ToFloat(sample.gpu_out[e]) - acc[e] / sum);
          if (!(err <= 0.01)) ++off_by_worker[w];
          if (!(err <= max_by_worker[w])) max_by_worker[w] = std::isnan(err) ? INFINITY : err;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  row->accuracy_elements = static_cast<int64_t>(samples.size()) * kD;
  row->accuracy_off = 0;
  row->accuracy_max_err = 0;
  for (int w = 0; w < workers; ++w) {
    row->accuracy_off += off_by_worker[w];
    row->accuracy_max_err = std::max(row->accuracy_max_err, max_by_worker[w]);
  }
}

// Times each stage launcher alone (warm-up, then the median of `reps`) on the runner's current
// inputs and theta, in stage order, so that each finds its inputs; leaves the stages' results in
// place.
void TimeStageParts(cuda::AttentionRunner& runner, int64_t n, int reps) {
  const cudaStream_t stream = runner.stream();
  const cuda::IdentificationParams params = runner.identification_params();
  EventTimer timer(2);
  auto time_ms = [&](auto&& launch) {
    BENCH_LAUNCH(launch());
    BENCH_CUDA(cudaStreamSynchronize(stream));
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      timer.Record(0, stream);
      BENCH_LAUNCH(launch());
      timer.Record(1, stream);
      BENCH_CUDA(cudaStreamSynchronize(stream));
      times.push_back(timer.Ms(0, 1));
    }
    return Median(times);
  };
  const double anchor_ms = time_ms([&] { return cuda::LaunchAnchorStage(params, stream); });
  const double pool_ms = time_ms([&] { return cuda::LaunchPooling(params, stream); });
  const double stripe_ms = time_ms([&] { return cuda::LaunchStripeStage(params, stream); });
  const double compact_ms = time_ms([&] { return cuda::LaunchStripeCompaction(params, stream); });
  std::printf(
      "stages N=%lld: anchor stage %.3f ms (of which pooling %.3f ms), stripe stage %.3f ms (of "
      "which compaction %.3f ms)\n",
      static_cast<long long>(n), anchor_ms, pool_ms, stripe_ms, compact_ms);
  std::fflush(stdout);
}

void PrintTable(const std::vector<Row>& rows, FILE* out) {
  std::fprintf(out,
               "| N | theta | anchor ms | stripes ms | ident. ms | sparse ms | sparse TFLOP/s | "
               "density | recall(0.01) | mass recall (mean/min) | ours dense ms (TFLOP/s) | "
               "cuDNN ms (TFLOP/s) | speedup vs cuDNN | auto mode ms (path) | auto vs cuDNN | "
               "acc. off>0.01 |\n");
  std::fprintf(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    const double total = r.anchor_ms + r.stripes_ms + r.sparse_ms;
    std::string cudnn = "n/a", speedup = "n/a", auto_speedup = "n/a";
    if (r.cudnn_ms > 0) {
      cudnn = absl::StrCat(absl::StrFormat("%.3f (%.0f)", r.cudnn_ms, r.cudnn_tflops));
      speedup = absl::StrFormat("%.2fx", r.cudnn_ms / total);
      auto_speedup = absl::StrFormat("%.2fx", r.cudnn_ms / r.AutoMs());
    }
    const std::string auto_mode =
        absl::StrFormat("%.3f (%s)", r.AutoMs(), r.AutoIsDense() ? "dense" : "anchor");
    std::string accuracy = "-";
    if (r.accuracy_elements > 0) {
      accuracy = absl::StrFormat("%.4f%% (max %.2g)", 100.0 * r.accuracy_off / r.accuracy_elements,
                                 r.accuracy_max_err);
    }
    std::fprintf(out,
                 "| %lld | %g | %.3f | %.3f | %.3f | %.3f | %.0f | %.3f | %.4f | %.5f / %.4f | "
                 "%.3f (%.0f) | %s | %s | %s | %s | %s |\n",
                 static_cast<long long>(r.n), r.theta, r.anchor_ms, r.stripes_ms,
                 r.anchor_ms + r.stripes_ms, r.sparse_ms, r.sparse_tflops, r.density, r.recall_0_01,
                 r.mass_mean, r.mass_min, r.dense_ms, r.dense_tflops, cudnn.c_str(),
                 speedup.c_str(), auto_mode.c_str(), auto_speedup.c_str(), accuracy.c_str());
  }
}

void WriteOutputs(const std::vector<Row>& rows, const std::string& dir) {
  {
    std::ofstream csv(dir + "/anchor_kernel_bench.csv");
    csv << "n,theta,anchor_ms,stripes_ms,sparse_ms,dense_ms,cudnn_ms,anchor_tflops,"
           "stripe_tflops,sparse_tflops,dense_tflops,cudnn_tflops,density,stripe_density,"
           "stripes_mean,recall_0_01,recall_0_005,mass_mean,mass_min,accuracy_elements,"
           "accuracy_off_0_01,accuracy_max_err,workspace_bytes,auto_ms,auto_dense\n";
    for (const Row& r : rows) {
      csv << r.n << ',' << r.theta << ',' << r.anchor_ms << ',' << r.stripes_ms << ','
          << r.sparse_ms << ',' << r.dense_ms << ',' << r.cudnn_ms << ',' << r.anchor_tflops << ','
          << r.stripe_tflops << ',' << r.sparse_tflops << ',' << r.dense_tflops << ','
          << r.cudnn_tflops << ',' << r.density << ',' << r.stripe_density << ',' << r.stripes_mean
          << ',' << r.recall_0_01 << ',' << r.recall_0_005 << ',' << r.mass_mean << ','
          << r.mass_min << ',' << r.accuracy_elements << ',' << r.accuracy_off << ','
          << r.accuracy_max_err << ',' << r.workspace_bytes << ',' << r.AutoMs() << ','
          << (r.AutoIsDense() ? 1 : 0) << '\n';
    }
  }
  std::ofstream json(dir + "/anchor_kernel_bench.json");
  json << "[\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    json << absl::StrFormat(
        "  {\"n\": %d, \"theta\": %g, \"anchor_ms\": %.4f, \"stripes_ms\": %.4f, "
        "\"sparse_ms\": %.4f, \"dense_ms\": %.4f, \"cudnn_ms\": %.4f, \"sparse_tflops\": %.1f, "
        "\"dense_tflops\": %.1f, \"anchor_tflops\": %.1f, \"stripe_tflops\": %.1f, "
        "\"density\": %.5f, \"stripe_density\": %.5f, \"recall_0_01\": %.5f, "
        "\"recall_0_005\": %.5f, \"mass_mean\": %.6f, \"mass_min\": %.5f, "
        "\"accuracy_elements\": %d, \"accuracy_off_0_01\": %d, \"accuracy_max_err\": %.4g, "
        "\"workspace_bytes\": %d}%s\n",
        r.n, r.theta, r.anchor_ms, r.stripes_ms, r.sparse_ms, r.dense_ms, r.cudnn_ms,
        r.sparse_tflops, r.dense_tflops, r.anchor_tflops, r.stripe_tflops, r.density,
        r.stripe_density, r.recall_0_01, r.recall_0_005, r.mass_mean, r.mass_min,
        r.accuracy_elements, r.accuracy_off, r.accuracy_max_err, r.workspace_bytes,
        i + 1 < rows.size() ? "," : "");
  }
  json << "]\n";
}

int Main(int argc, char** argv) {
  const Options options = ParseOptions(argc, argv);
  const std::map<int64_t, double> cudnn_ms = ReadSdpaLog(options.sdpa_log);
  cudaDeviceProp properties{};
  BENCH_CUDA(cudaGetDeviceProperties(&properties, 0));
  std::printf("device: %s, %d SMs, %zu MiB\n", properties.name, properties.multiProcessorCount,
              properties.totalGlobalMem >> 20);
  absl::StatusOr<std::unique_ptr<cuda::AttentionRunner>> runner_or =
      cuda::AttentionRunner::Create(0);
  BENCH_OK(runner_or.status());
  cuda::AttentionRunner& runner = **runner_or;
  const cudaStream_t stream = runner.stream();
  std::vector<Row> rows;
  void* dense_out = nullptr;
  float* dense_lse = nullptr;
  int64_t dense_capacity = 0;

  for (const int64_t n : options.lengths) {
    const AttentionShape shape{n, options.q_heads, options.kv_heads, kD};
    StructuredInputOptions input_options;
    input_options.seed = options.seed;
    absl::StatusOr<HostQkv> qkv =
        GenerateStructuredQkv(shape, DType::kBf16, Layout::kTokenMajor, input_options);
    BENCH_OK(qkv.status());

    AnchorConfig config;
    config.theta = options.theta;
    cuda::BatchPlanRequest request;
    request.seq_lens = {n};
    request.num_q_heads = options.q_heads;
    request.num_kv_heads = options.kv_heads;
    request.head_dim = kD;
    request.config = config;
    BENCH_OK(runner.Prepare(request, DType::kBf16));
    BENCH_CUDA(cudaMemcpy(runner.q(), qkv->q.data(), qkv->q.size(), cudaMemcpyHostToDevice));
    BENCH_CUDA(cudaMemcpy(runner.k(), qkv->k.data(), qkv->k.size(), cudaMemcpyHostToDevice));
    BENCH_CUDA(cudaMemcpy(runner.v(), qkv->v.data(), qkv->v.size(), cudaMemcpyHostToDevice));
    const int64_t out_bytes = n * options.q_heads * kD * 2;
    if (out_bytes > dense_capacity) {
      if (dense_out != nullptr) BENCH_CUDA(cudaFree(dense_out));
      if (dense_lse != nullptr) BENCH_CUDA(cudaFree(dense_lse));
      BENCH_CUDA(cudaMalloc(&dense_out, out_bytes));
      BENCH_CUDA(
          cudaMalloc(reinterpret_cast<void**>(&dense_lse), n * options.q_heads * sizeof(float)));
      dense_capacity = out_bytes;
    }
    BENCH_CUDA(cudaMemset(dense_out, 0xff, out_bytes));
    BENCH_CUDA(cudaMemset(runner.out(), 0xff, out_bytes));

    // Dense (our kernel).
    const double causal = static_cast<double>(CausalEntries(n)) * options.q_heads;
    EventTimer timer(4);
    std::vector<double> dense_times;
    BENCH_OK(runner.RunAttention(cuda::KernelChoice::kDense, dense_out, dense_lse));
    for (int r = 0; r < options.reps; ++r) {
      timer.Record(0, stream);
      BENCH_OK(runner.RunAttention(cuda::KernelChoice::kDense, dense_out, dense_lse));
      timer.Record(1, stream);
      BENCH_CUDA(cudaStreamSynchronize(stream));
      dense_times.push_back(timer.Ms(0, 1));
    }
    const double dense_ms = Median(dense_times);

    const bool sweep = std::find(options.sweep_lengths.begin(), options.sweep_lengths.end(), n) !=
                       options.sweep_lengths.end();
    std::vector<float> thetas = {options.theta};
    if (sweep) {
      for (float theta : options.sweep_thetas) {
        if (theta != options.theta) thetas.push_back(theta);
      }
    }
    for (const float theta : thetas) {
      runner.set_theta(theta);
      config.theta = theta;
      // Warm-up, then timed repeats of the three stages.
      BENCH_OK(runner.RunAnchorStage());
      BENCH_OK(runner.RunStripeStage());
      BENCH_OK(runner.RunAttention(cuda::KernelChoice::kSparse));
      BENCH_CUDA(cudaStreamSynchronize(stream));
      std::vector<double> anchor_times, stripe_times, sparse_times;
      for (int r = 0; r < options.reps; ++r) {
        timer.Record(0, stream);
        BENCH_OK(runner.RunAnchorStage());
        timer.Record(1, stream);
        BENCH_OK(runner.RunStripeStage());
        timer.Record(2, stream);
        BENCH_OK(runner.RunAttention(cuda::KernelChoice::kSparse));
        timer.Record(3, stream);
        BENCH_CUDA(cudaStreamSynchronize(stream));
        anchor_times.push_back(timer.Ms(0, 1));
        stripe_times.push_back(timer.Ms(1, 2));
        sparse_times.push_back(timer.Ms(2, 3));
      }
      BENCH_OK(runner.RunHeadStats(false));
      std::vector<HeadStats> stats;
      BENCH_OK(runner.CopyHeadStats(&stats));
      const RequestSummary summary = SummarizeHeads(n, stats);

      Row row;
      row.n = n;
      row.theta = theta;
      row.anchor_ms = Median(anchor_times);
      row.stripes_ms = Median(stripe_times);
      row.sparse_ms = Median(sparse_times);
      row.dense_ms = dense_ms;
      row.density = summary.density;
      row.stripe_density = summary.stripe_density;
      row.stripes_mean = summary.stripes.mean;
      row.workspace_bytes = runner.layout().total_bytes;
      double computed = 0, anchor_entries = 0;
      for (const HeadStats& s : stats) {
        computed += static_cast<double>(s.computed_entries);
        anchor_entries += static_cast<double>(s.computed_entries - s.stripe_entries);
      }
      double candidate_keys = 0;
      for (const cuda::IdGroup& group : runner.plan().groups) {
        candidate_keys += std::max(0, group.cand_end - group.cand_begin);
      }
      row.anchor_tflops = anchor_entries * 2 * kD / (row.anchor_ms * 1e9);
      row.stripe_tflops =
          candidate_keys * options.q_heads * config.step * 2.0 * kD / (row.stripes_ms * 1e9);
      row.sparse_tflops = computed * 4 * kD / (row.sparse_ms * 1e9);
      row.dense_tflops = causal * 4 * kD / (dense_ms * 1e9);
      if (auto it = cudnn_ms.find(n); it != cudnn_ms.end()) {
        row.cudnn_ms = it->second;
        row.cudnn_tflops = 4.0 * n * n * kD * options.q_heads / 2 / (row.cudnn_ms * 1e9);
      }
      bench::DeviceRecall recall;
      BENCH_CUDA(bench::ComputeDeviceRecall(runner.out(), dense_out, n * options.q_heads * kD,
                                            runner.lse(), dense_lse, n * options.q_heads, &recall));
      row.recall_0_01 = static_cast<double>(recall.within_0_01) / recall.elements;
      row.recall_0_005 = static_cast<double>(recall.within_0_005) / recall.elements;
      row.mass_mean = recall.mass_sum / recall.rows;
      row.mass_min = recall.mass_min;
      if (theta == options.theta && options.sample_rows > 0) {
        CheckAccuracy(runner, *qkv, config, options.sample_rows, options.seed + n, &row);
      }
      if (theta == options.theta &&
          std::find(options.stage_lengths.begin(), options.stage_lengths.end(), n) !=
              options.stage_lengths.end()) {
        TimeStageParts(runner, n, options.reps);
      }
      std::printf(
          "N=%lld theta=%g: anchor %.3f ms (%.0f TFLOP/s), stripes %.3f ms (%.0f TFLOP/s), "
          "sparse %.3f ms (%.0f TFLOP/s), dense %.3f ms (%.0f TFLOP/s), density %.4f, "
          "recall %.4f, mass %.5f, accuracy off %lld/%lld (max %.3g), workspace %.1f MiB\n",
          static_cast<long long>(n), theta, row.anchor_ms, row.anchor_tflops, row.stripes_ms,
          row.stripe_tflops, row.sparse_ms, row.sparse_tflops, dense_ms, row.dense_tflops,
          row.density, row.recall_0_01, row.mass_mean, static_cast<long long>(row.accuracy_off),
          static_cast<long long>(row.accuracy_elements), row.accuracy_max_err,
          row.workspace_bytes / 1048576.0);
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  if (dense_out != nullptr) cudaFree(dense_out);
  if (dense_lse != nullptr) cudaFree(dense_lse);

  std::printf("\n== summary ==\n");
  PrintTable(rows, stdout);
  WriteOutputs(rows, options.out_dir);
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) { return anchorserve::Main(argc, argv); }
