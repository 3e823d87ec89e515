#include "kernels/cpu/cpu_backend.h"

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "kernels/cpu/cpu_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tile_kernels.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

// "model name" from /proc/cpuinfo, or "unknown CPU".
std::string CpuModelName() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    absl::string_view view(line);
    if (!absl::ConsumePrefix(&view, "model name")) continue;
    const size_t colon = view.find(':');
    if (colon == absl::string_view::npos) continue;
    view.remove_prefix(colon + 1);
    return std::string(absl::StripAsciiWhitespace(view));
  }
  return "unknown CPU";
}

class CpuBackend : public AttentionBackend {
 public:
  CpuBackend(int threads, const cpu::TileKernels& kernels)
      : pool_(threads), kernels_(kernels), model_(CpuModelName()) {}

  BackendInfo Info() const override {
    return DescribeBackend(
        *this, "cpu",
        absl::StrCat("CPU: ", model_, ", ", pool_.num_threads(), " threads, ", kernels_.name,
                     " kernels (any head_dim 1..", kMaxHeadDim, ")"));
  }

  absl::Status CanRun(const AttentionProblem& problem) const override {
    ANCHOR_RETURN_IF_ERROR(ValidateProblem(problem));
    if (problem.shape.seq_len > cpu::kMaxCpuSeqLen) {
      return absl::FailedPreconditionError(absl::StrCat(
          "seq_len ", problem.shape.seq_len, " exceeds the cpu backend's ", cpu::kMaxCpuSeqLen));
    }
    return absl::OkStatus();
  }

  absl::Status Run(absl::Span<AttentionTask* const> batch) override {
    ANCHOR_RETURN_IF_ERROR(CheckBatch(*this, batch));
    for (AttentionTask* task : batch) {
      if (task->Cancelled()) {
        task->status = absl::CancelledError("attention task cancelled before it started");
        continue;
      }
      ANCHOR_RETURN_IF_ERROR(cpu::RunCpuAttention(task, &pool_, kernels_));
    }
    return absl::OkStatus();
  }

 private:
  cpu::ThreadPool pool_;
  const cpu::TileKernels& kernels_;
  const std::string model_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackendWithKernels(
    int threads, std::string_view kernels) {
  if (threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu threads must be >= 0 (0 = all hardware threads), got ", threads));
  }
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (const cpu::TileKernels* candidate : cpu::SupportedTileKernels()) {
    if (kernels.empty() || kernels == candidate->name) {
      return std::unique_ptr<AttentionBackend>(new CpuBackend(threads, *candidate));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("cpu kernels '", std::string(kernels),
                                                 "' unknown or not supported by this CPU"));
}

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackend(int threads) {
  return CreateCpuBackendWithKernels(threads, "");
}

}  // namespace anchorserve
