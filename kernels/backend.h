// The interface every compute backend (CPU, CUDA) implements.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/attention_types.h"

namespace anchorserve {

struct BackendInfo {
  std::string name;    // "cpu" or "cuda"
  std::string device;  // human-readable device description
  // Derived from CanRun (DescribeBackend): the dtypes, and every head_dim in 1..kMaxHeadDim
  // it accepts (for the first dtype).
  std::vector<DType> dtypes;
  std::vector<int> head_dims;
};

// Page-locks host memory so that a device's copies can read and write it directly, without
// staging. Thread-safe; Pin and Unpin may run while the backend computes.
class HostMemoryPinner {
 public:
  virtual ~HostMemoryPinner() = default;
  // `data` page-aligned, `bytes` a whole number of pages. False when the range stays pageable.
  virtual bool Pin(void* data, size_t bytes) = 0;
  // A range Pin accepted, before its memory is unmapped.
  virtual void Unpin(void* data) = 0;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  // Name, device and capabilities; implementations build it with DescribeBackend.
  virtual BackendInfo Info() const = 0;

  // The one answer to "can this run here?": OK, INVALID_ARGUMENT naming the field when the
  // problem itself is invalid (ValidateProblem), FAILED_PRECONDITION naming the condition when
  // it is valid but this backend lacks it (a dtype, a head_dim, a length limit).
  virtual absl::Status CanRun(const AttentionProblem& problem) const = 0;

  // Runs every task. Tasks of one call share AttentionBatchKey (the batcher groups them so) but
  // may differ in seq_len; each must pass CanRun. A non-OK return means the batch
  // failed as a whole; per-task outcomes (cancellation) go to task->status.
  virtual absl::Status Run(absl::Span<AttentionTask* const> batch) = 0;

  // Pins host buffers whose copies to and from this backend's device would otherwise be staged;
  // null when host memory is used as it is (the CPU backend). Lives as long as the backend.
  virtual HostMemoryPinner* host_memory_pinner() { return nullptr; }
};

// A failure after which this process cannot use its device again (a sticky CUDA error: an illegal
// address, an uncorrectable ECC error, ...): INTERNAL, marked so that the server can report
// NOT_SERVING and let the orchestrator restart it.
absl::Status DeviceUnusableError(absl::string_view message);
bool IsDeviceUnusable(const absl::Status& status);

// Info with dtypes and head dims probed through backend.CanRun.
BackendInfo DescribeBackend(const AttentionBackend& backend, std::string name, std::string device);

// CanRun for every task, and that all share the first one's AttentionBatchKey.
absl::Status CheckBatch(const AttentionBackend& backend, absl::Span<AttentionTask* const> batch);

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
