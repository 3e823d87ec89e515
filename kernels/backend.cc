#include "kernels/backend.h"

#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

constexpr char kDeviceUnusablePayload[] = "type.anchorserve.dev/DeviceUnusable";

}  // namespace

absl::Status DeviceUnusableError(absl::string_view message) {
  absl::Status status = absl::InternalError(message);
  status.SetPayload(kDeviceUnusablePayload, absl::Cord("1"));
  return status;
}

bool IsDeviceUnusable(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kDeviceUnusablePayload).has_value();
}

BackendInfo DescribeBackend(const AttentionBackend& backend, std::string name, std::string device) {
  BackendInfo info;
  info.name = std::move(name);
  info.device = std::move(device);
  AttentionProblem probe;
  probe.shape = AttentionShape{.seq_len = 1, .num_q_heads = 1, .num_kv_heads = 1, .head_dim = 128};
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    probe.dtype = dtype;
    if (backend.CanRun(probe).ok()) info.dtypes.push_back(dtype);
  }
  if (!info.dtypes.empty()) probe.dtype = info.dtypes.front();
  // Every head_dim a request may carry: the list is exactly what CanRun accepts.
  for (int head_dim = 1; head_dim <= kMaxHeadDim; ++head_dim) {
    probe.shape.head_dim = head_dim;
    if (backend.CanRun(probe).ok()) info.head_dims.push_back(head_dim);
  }
  return info;
}

absl::Status CheckBatch(const AttentionBackend& backend, absl::Span<AttentionTask* const> batch) {
  if (batch.empty()) return absl::OkStatus();
  for (const AttentionTask* task : batch) {
    if (task == nullptr) return absl::InvalidArgumentError("null task in batch");
    ANCHOR_RETURN_IF_ERROR(ValidateTask(*task));
    if (task->config.mode == AttentionMode::kAuto) {
      return absl::InvalidArgumentError(
          "config.mode auto reached a backend unresolved; ResolveMode picks anchor or dense per "
          "sequence first");
    }
    ANCHOR_RETURN_IF_ERROR(backend.CanRun(ProblemOf(*task)));
  }
  const std::string key = AttentionBatchKey(ProblemOf(*batch[0]));
  for (const AttentionTask* task : batch) {
    if (AttentionBatchKey(ProblemOf(*task)) != key) {
      return absl::InvalidArgumentError(
          "tasks of one batch must share dtype, layout, head counts, head_dim and config");
    }
  }
  return absl::OkStatus();
}

}  // namespace anchorserve
