// The interface every compute backend (CPU, CUDA) implements.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention_types.h"

namespace anchorserve {

struct BackendInfo {
  std::string name;    // "cpu" or "cuda"
  std::string device;  // human-readable device description
  std::vector<DType> dtypes;
  std::vector<int> head_dims;  // supported head dims
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  virtual BackendInfo Info() const = 0;

  // OK when this backend can run `task`; INVALID_ARGUMENT naming the field otherwise.
  virtual absl::Status Supports(const AttentionTask& task) const = 0;

  // Runs every task. Tasks of one call share dtype, layout, head counts, head_dim and config
  // (the batcher groups them so) but may differ in seq_len. A non-OK return means the batch
  // failed as a whole; per-task outcomes (cancellation) go to task->status.
  virtual absl::Status Run(absl::Span<AttentionTask* const> batch) = 0;
};

enum class BackendKind { kAuto, kCpu, kCuda };

struct BackendOptions {
  BackendKind kind = BackendKind::kAuto;  // kAuto: CUDA when a device is present, else CPU
  int cpu_threads = 0;                    // 0 = all hardware threads
  int cuda_device = 0;
  // kAuto only: set to why a present GPU was not used (e.g. not an sm_90 part) when the CPU
  // backend was chosen instead; left empty otherwise.
  std::string* maybe_fallback_reason = nullptr;
};

// The one place that decides which backend runs.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateBackend(const BackendOptions& options);

}  // namespace anchorserve
