// The CUDA AttentionBackend: uploads a batch's host tensors into its packed device buffers, runs
// them as caller-owned device tensors through AttentionRunner::PrepareOnDevice (the path the
// prefill engine takes on tensors already on the GPU), and copies outputs and metrics back.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/cuda/attention_runner.h"
#include "kernels/cuda/pinned_staging.h"

namespace anchorserve {

// CUDA devices visible to this process; 0 when there is no driver or device (never an error).
int CudaDeviceCount();

// CudaBackend::CanRun without a device: what the kernels support.
absl::Status CanRunOnCuda(const AttentionProblem& problem);

// The backend on `device`. FAILED_PRECONDITION without such a device.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaBackend(int device);

class CudaBackend : public AttentionBackend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int device);
  ~CudaBackend() override;

  BackendInfo Info() const override;
  absl::Status CanRun(const AttentionProblem& problem) const override;
  absl::Status Run(absl::Span<AttentionTask* const> batch) override;
  HostMemoryPinner* host_memory_pinner() override { return pinned_.get(); }

  // Device bytes one Run of these sequences needs (packed q/k/v/out, LSE, work lists, stripe
  // lists sized by their bound, identification scratch): the arena's peak for that batch.
  static absl::StatusOr<int64_t> WorkspaceBytes(absl::Span<const int64_t> seq_lens,
                                                const AttentionShape& shape, DType dtype,
                                                const AnchorConfig& config);

  // Test hook: after each sparse Run, keep the stripe lists (and x(i)) of the batch.
  struct StripeSnapshot {
    cuda::BatchPlan plan;
    std::vector<int32_t> counts;    // [groups * Hq]
    std::vector<int32_t> index;     // lists at plan.list_offset
    std::vector<float> row_anchor;  // [Hq, N] per sequence at SeqDesc::lse_offset
    std::vector<float> mass_theta;  // mass targets: [groups * Hq] chosen theta (NaN: no C_g)
  };
  void KeepStripesForTesting(bool keep);
  StripeSnapshot LastStripesForTesting() const;

 private:
  CudaBackend(int device, std::unique_ptr<cuda::AttentionRunner> runner,
              std::unique_ptr<cuda::PinnedHostRanges> pinned,
              std::unique_ptr<cuda::PinnedStaging> staging, std::string device_name)
      : device_(device),
        runner_(std::move(runner)),
        pinned_(std::move(pinned)),
        staging_(std::move(staging)),
        device_name_(std::move(device_name)) {}
  absl::Status RunLocked(absl::Span<AttentionTask* const> tasks) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Grows the packed q/k/v/out/lse buffer of uploaded batches to `bytes`.
  absl::Status ReserveTensorBuffer(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int device_;
  mutable absl::Mutex mu_;
  std::unique_ptr<cuda::AttentionRunner> runner_ ABSL_GUARDED_BY(mu_);
  // Host buffers the server pinned (its reused request buffers); before staging_, which reads it.
  const std::unique_ptr<cuda::PinnedHostRanges> pinned_;
  // Copies of other (pageable) request tensors go through these pinned buffers.
  std::unique_ptr<cuda::PinnedStaging> staging_ ABSL_GUARDED_BY(mu_);
  const std::string device_name_;
  bool keep_stripes_ ABSL_GUARDED_BY(mu_) = false;
  void* tensor_buffer_ ABSL_GUARDED_BY(mu_) = nullptr;  // packed tensors of the last batch
  int64_t tensor_buffer_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  StripeSnapshot snapshot_ ABSL_GUARDED_BY(mu_);
};

}  // namespace anchorserve
