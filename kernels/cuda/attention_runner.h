// The device side of one CUDA batch: a grow-only workspace arena (cudaMalloc, no managed memory),
// the batch plan uploaded next to the tensors, and the stages (anchor, stripes, attention,
// metrics) as separate asynchronous calls on one stream, so that the backend, the tests and the
// kernel benchmark all drive the same code. Not thread-safe; one runner per device and caller.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention_types.h"
#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/batch_plan.h"
#include "kernels/cuda/identification_types.h"

namespace anchorserve::cuda {

// Which attention kernel serves a config: the one place that decides.
enum class KernelChoice { kDense, kSparse };
KernelChoice SelectKernel(const AnchorConfig& config);

// One sequence of a batch over device tensors the caller owns. Offsets and strides count
// elements: q/out row i, head h at q + q_offset + i * q_token_stride + h * q_head_stride (k/v
// alike with kv_*); rows must be 16-byte aligned. lse: [Hq, seq_len] at maybe_lse + lse_offset.
struct DeviceSequence {
  int64_t seq_len = 0;
  int64_t q_offset = 0;
  int64_t kv_offset = 0;
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  int64_t kv_token_stride = 0;
  int64_t kv_head_stride = 0;
  int64_t lse_offset = 0;
};

// Caller-owned device tensors of one batch: q/out [N, Hq, d], k/v [N, Hkv, d] per sequence.
struct DeviceTensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* maybe_lse = nullptr;
  std::vector<DeviceSequence> seqs;
};

// The packed layout of host tensors uploaded into one device buffer per tensor: sequence after
// sequence, each in `layout` ([N, H, d] or [H, N, d]). Fills `tensors->seqs`; returns the
// element counts of q (and out), k (and v) and lse.
struct PackedCounts {
  int64_t q_elements = 0;
  int64_t kv_elements = 0;
  int64_t lse_elements = 0;
};
PackedCounts PackSequences(absl::Span<const int64_t> seq_lens, const AttentionShape& shape,
                           Layout layout, DeviceTensors* tensors);

class AttentionRunner {
 public:
  static absl::StatusOr<std::unique_ptr<AttentionRunner>> Create(int device);
  ~AttentionRunner();
  AttentionRunner(const AttentionRunner&) = delete;
  AttentionRunner& operator=(const AttentionRunner&) = delete;

  // Plans the batch, grows the arena when needed and uploads the plan (synchronously). The
  // tensor buffers below are valid (uninitialised) until the next Prepare.
  absl::Status Prepare(const BatchPlanRequest& request, DType dtype, bool keep_row_anchor = false);

  // Plans the batch of `tensors.seqs` (shape.seq_len is ignored) over caller-owned device
  // tensors: nothing is copied, the workspace holds only the plan and scratch. `workspace`:
  // the caller's device memory of at least WorkspaceBytes(...) bytes, or null for this runner's
  // arena; `stream`: the caller's stream, or null for the runner's. The plan upload is
  // asynchronous (pageable host memory is staged before cudaMemcpyAsync returns).
  absl::Status PrepareOnDevice(const AttentionShape& shape, const AnchorConfig& config, DType dtype,
                               const DeviceTensors& tensors, void* workspace,
                               int64_t workspace_bytes, cudaStream_t stream,
                               bool keep_row_anchor = false);

  // The whole attention of a batch on caller-owned device tensors: PrepareOnDevice, then
  // identification (sparse configs), head statistics and attention on `stream`. No host copies
  // of tensors and no synchronisation, except one copy back of the head statistics when
  // `maybe_head_stats` is non-null ([num_seqs * Hq], sequence-major).
  absl::Status RunOnDevice(const AttentionProblem& problem, const DeviceTensors& tensors,
                           void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                           std::vector<HeadStats>* maybe_head_stats);

  // Device bytes PrepareOnDevice needs for these sequence lengths.
  static absl::StatusOr<int64_t> DeviceWorkspaceBytes(const AttentionShape& shape,
                                                      const AnchorConfig& config, DType dtype,
                                                      absl::Span<const int64_t> seq_lens);

  // Changes theta for the next stripe stage (the plan does not depend on it).
  void set_theta(float theta) { theta_ = theta; }

  const BatchPlan& plan() const { return plan_; }
  const WorkspaceLayout& layout() const { return layout_; }
  int64_t arena_bytes() const { return arena_bytes_; }
  // The stream the stages run on: the caller's of PrepareOnDevice, else the runner's own.
  cudaStream_t stream() const { return active_stream_; }
  int device() const { return device_; }

  // Device tensors, per the plan's SeqDesc offsets and strides: packed in the arena after
  // Prepare, the caller's after PrepareOnDevice.
  void* q() const { return q_; }
  void* k() const { return k_; }
  void* v() const { return v_; }
  void* out() const { return out_; }
  float* lse() const { return lse_; }

  // Asynchronous stages on stream(). Identification = anchor + stripes (sparse plans only).
  absl::Status RunAnchorStage();
  absl::Status RunStripeStage();
  // Dense or sparse attention into out()/lse(), or into the overrides when non-null (same
  // packing as out()/lse()).
  absl::Status RunAttention(KernelChoice choice, void* out_override = nullptr,
                            float* lse_override = nullptr);
  // Per-head metrics into the device table; `dense`: every causal entry computed, no stripes.
  absl::Status RunHeadStats(bool dense);

  // Synchronous copies to the host.
  // [num_seqs * Hq], sequence-major.
  absl::Status CopyHeadStats(std::vector<HeadStats>* stats) const;
  // counts [groups * Hq]; index: the whole list buffer (list_entries), lists at plan offsets.
  absl::Status CopyStripeLists(std::vector<int32_t>* counts, std::vector<int32_t>* index) const;
  // Mass-target plans: each list's chosen threshold, [groups * Hq] (batch group major; NaN for
  // groups without candidates, +inf where every candidate was kept).
  absl::Status CopyMassThetas(std::vector<float>* thetas) const;
  // x(i) per head and row, [Hq, N] per sequence at lse_offset (needs keep_row_anchor).
  absl::Status CopyRowAnchor(std::vector<float>* row_anchor) const;

  IdentificationParams identification_params() const;
  AttentionParams attention_params(KernelChoice choice) const;

 private:
  AttentionRunner(int device, cudaStream_t stream)
      : device_(device), stream_(stream), active_stream_(stream) {}
  void* At(int64_t offset) const { return static_cast<char*>(base_) + offset; }
  // Grows the arena to `bytes` (contents are not kept).
  absl::Status ReserveArena(int64_t bytes);
  // Uploads the plan's work lists to base_ on active_stream_.
  absl::Status UploadPlan();

  int device_;
  cudaStream_t stream_;         // owned
  cudaStream_t active_stream_;  // stream_ or the caller's
  void* arena_ = nullptr;       // owned, grow-only
  int64_t arena_bytes_ = 0;
  void* base_ = nullptr;  // arena_ or the caller's workspace
  void* q_ = nullptr;
  void* k_ = nullptr;
  void* v_ = nullptr;
  void* out_ = nullptr;
  float* lse_ = nullptr;
  BatchPlan plan_;
  KvTensorShape kv_tensor_{};  // of plan_.seqs (UniformKvTensor), set by UploadPlan
  WorkspaceLayout layout_;
  ElemType elem_type_ = ElemType::kBf16;
  float softmax_scale_ = 0;
  float theta_ = 0;
  AnchorConfig config_;  // of the last Prepare: the mass-target fields
  bool prepared_ = false;
};

}  // namespace anchorserve::cuda
