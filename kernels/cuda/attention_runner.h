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
#include "kernels/attention_types.h"
#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/batch_plan.h"
#include "kernels/cuda/identification_types.h"

namespace anchorserve::cuda {

// Which attention kernel serves a config: the one place that decides.
enum class KernelChoice { kDense, kSparse };
KernelChoice SelectKernel(const AnchorConfig& config);

class AttentionRunner {
 public:
  static absl::StatusOr<std::unique_ptr<AttentionRunner>> Create(int device);
  ~AttentionRunner();
  AttentionRunner(const AttentionRunner&) = delete;
  AttentionRunner& operator=(const AttentionRunner&) = delete;

  // Plans the batch, grows the arena when needed and uploads the plan (synchronously). The
  // tensor buffers below are valid (uninitialised) until the next Prepare.
  absl::Status Prepare(const BatchPlanRequest& request, DType dtype, bool keep_row_anchor = false);

  // Changes theta for the next stripe stage (the plan does not depend on it).
  void set_theta(float theta) { theta_ = theta; }

  const BatchPlan& plan() const { return plan_; }
  const WorkspaceLayout& layout() const { return layout_; }
  int64_t arena_bytes() const { return arena_bytes_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }

  // Packed device tensors, per the plan's SeqDesc offsets and strides.
  void* q() const { return At(layout_.q); }
  void* k() const { return At(layout_.k); }
  void* v() const { return At(layout_.v); }
  void* out() const { return At(layout_.out); }
  float* lse() const { return static_cast<float*>(At(layout_.lse)); }

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
  // x(i) per head and row, [Hq, N] per sequence at lse_offset (needs keep_row_anchor).
  absl::Status CopyRowAnchor(std::vector<float>* row_anchor) const;

  IdentificationParams identification_params() const;
  AttentionParams attention_params(KernelChoice choice) const;

 private:
  AttentionRunner(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  void* At(int64_t offset) const { return static_cast<char*>(arena_) + offset; }

  int device_;
  cudaStream_t stream_;
  void* arena_ = nullptr;
  int64_t arena_bytes_ = 0;
  BatchPlan plan_;
  WorkspaceLayout layout_;
  ElemType elem_type_ = ElemType::kBf16;
  float softmax_scale_ = 0;
  float theta_ = 0;
  bool prepared_ = false;
};

}  // namespace anchorserve::cuda
