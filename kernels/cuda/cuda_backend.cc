#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_event.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

using cuda::AttentionRunner;
using cuda::KernelChoice;

using cuda::Event;
using cuda::PinnedStaging;
using cuda::SecondsBetween;

cuda::BatchPlanRequest RequestFor(absl::Span<const int64_t> seq_lens, const AttentionShape& shape,
                                  Layout layout, const AnchorConfig& config) {
  cuda::BatchPlanRequest request;
  request.seq_lens.assign(seq_lens.begin(), seq_lens.end());
  request.num_q_heads = shape.num_q_heads;
  request.num_kv_heads = shape.num_kv_heads;
  request.head_dim = shape.head_dim;
  request.layout = layout;
  request.config = config;
  request.sparse = cuda::SelectKernel(config) == KernelChoice::kSparse;
  request.attention_tile_rows = cuda::kAttentionTileRows;
  return request;
}

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller
    return 0;
  }
  return count;
}

// Pinned staging slices: large enough that per-slice overheads vanish, small enough that the
// first DMA starts soon.
constexpr int64_t kStagingSliceBytes = int64_t{8} << 20;

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaBackend(int device) {
  ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend, CudaBackend::Create(device));
  return std::unique_ptr<AttentionBackend>(std::move(backend));
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda device ", device, " requested but ", count, " device(s) are visible"));
  }
  cudaDeviceProp properties{};
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, device));
  if (properties.major != 9 || properties.minor != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda device ", device, " (", properties.name, ") has compute capability ",
                     properties.major, ".", properties.minor,
                     "; the kernels are built for 9.0 (sm_90a: H100/H200)"));
  }
  ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<AttentionRunner> runner, AttentionRunner::Create(device));
  auto pinned = std::make_unique<cuda::PinnedHostRanges>(device);
  ANCHOR_ASSIGN_OR_RETURN(std::unique_ptr<PinnedStaging> staging,
                          PinnedStaging::Create(kStagingSliceBytes, pinned.get()));
  const std::string name =
      absl::StrCat(properties.name, " (device ", device, ", sm_", properties.major,
                   properties.minor, ", ", properties.totalGlobalMem >> 20, " MiB)");
  return std::unique_ptr<CudaBackend>(
      new CudaBackend(device, std::move(runner), std::move(pinned), std::move(staging), name));
}

BackendInfo CudaBackend::Info() const { return DescribeBackend(*this, "cuda", device_name_); }

absl::Status CudaBackend::CanRun(const AttentionProblem& problem) const {
  return CanRunOnCuda(problem);
}

absl::Status CanRunOnCuda(const AttentionProblem& problem) {
  ANCHOR_RETURN_IF_ERROR(ValidateProblem(problem));
  if (problem.dtype != DType::kBf16 && problem.dtype != DType::kFp16) {
    return absl::FailedPreconditionError(
        absl::StrCat("dtype ", std::string(DTypeName(problem.dtype)),
                     " is not supported by the cuda backend (bf16, fp16)"));
  }
  if (problem.shape.head_dim != 64 && problem.shape.head_dim != 128) {
    return absl::FailedPreconditionError(absl::StrCat(
        "head_dim ", problem.shape.head_dim, " is not supported by the cuda backend (64, 128)"));
  }
  if (problem.shape.seq_len > std::numeric_limits<int32_t>::max()) {
    return absl::FailedPreconditionError(
        absl::StrCat("seq_len ", problem.shape.seq_len, " exceeds the cuda backend's 2^31 - 1"));
  }
  if (problem.shape.num_q_heads > 65535) {
    return absl::FailedPreconditionError(absl::StrCat("num_q_heads ", problem.shape.num_q_heads,
                                                      " exceeds the cuda backend's 65535"));
  }
  if (problem.config.UsesMassTarget() && problem.config.step > cuda::kPooledRowTile) {
    // The level pass takes each head's pooled rows in one 16-row tensor-core tile.
    return absl::FailedPreconditionError(absl::StrCat("config.step ", problem.config.step,
                                                      " with config.mass_target: the cuda "
                                                      "backend's mass targets support step <= ",
                                                      cuda::kPooledRowTile));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaBackend::WorkspaceBytes(absl::Span<const int64_t> seq_lens,
                                                    const AttentionShape& shape, DType dtype,
                                                    const AnchorConfig& config) {
  for (int64_t seq_len : seq_lens) {
    AttentionShape one = shape;
    one.seq_len = seq_len;
    ANCHOR_RETURN_IF_ERROR(CanRunOnCuda(AttentionProblem{one, dtype, Layout::kTokenMajor, config}));
  }
  ANCHOR_ASSIGN_OR_RETURN(cuda::BatchPlan plan, cuda::PlanBatch(RequestFor(
                                                    seq_lens, shape, Layout::kTokenMajor, config)));
  return cuda::LayoutWorkspace(plan, static_cast<int>(ElementSize(dtype)), false).total_bytes;
}

CudaBackend::~CudaBackend() {
  if (tensor_buffer_ != nullptr) {
    cudaSetDevice(device_);
    cudaFree(tensor_buffer_);
  }
}

absl::Status CudaBackend::ReserveTensorBuffer(int64_t bytes) {
  if (bytes <= tensor_buffer_bytes_) return absl::OkStatus();
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (tensor_buffer_ != nullptr) {
    // A batch that failed midway may still run.
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(runner_->stream()));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaFree(tensor_buffer_));
    tensor_buffer_ = nullptr;
    tensor_buffer_bytes_ = 0;
  }
  void* memory = nullptr;
  const cudaError_t error = cudaMalloc(&memory, bytes);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda tensors of ", bytes, " bytes: ", cudaGetErrorString(error)));
  }
  tensor_buffer_ = memory;
  tensor_buffer_bytes_ = bytes;
  return absl::OkStatus();
}

void CudaBackend::KeepStripesForTesting(bool keep) {
  absl::MutexLock lock(&mu_);
  keep_stripes_ = keep;
}

CudaBackend::StripeSnapshot CudaBackend::LastStripesForTesting() const {
  absl::MutexLock lock(&mu_);
  return snapshot_;
}

absl::Status CudaBackend::Run(absl::Span<AttentionTask* const> batch) {
  absl::MutexLock lock(&mu_);
  absl::Status status = RunLocked(batch);
  // A failure may leave copies of pinned task memory queued; the caller frees it on return.
  if (!status.ok()) cudaStreamSynchronize(runner_->stream());
  return status;
}

absl::Status CudaBackend::RunLocked(absl::Span<AttentionTask* const> batch) {
  if (batch.empty()) return absl::OkStatus();
  ANCHOR_RETURN_IF_ERROR(CheckBatch(*this, batch));
  std::vector<AttentionTask*> tasks;
  for (AttentionTask* task : batch) {
    task->status = absl::OkStatus();
    task->head_stats.clear();
    task->times = StageTimes{};
    if (task->Cancelled()) {
      task->status = absl::CancelledError("cancelled before the cuda backend started it");
    } else {
      tasks.push_back(task);
    }
  }
  auto all_cancelled = [&tasks](const char* stage) {
    bool all = true;
    for (AttentionTask* task : tasks) all = all && task->Cancelled();
    if (all) {
      for (AttentionTask* task : tasks) {
        task->status = absl::CancelledError(absl::StrCat("cancelled ", stage));
      }
    }
    return all;
  };
  if (tasks.empty()) return absl::OkStatus();

  const AttentionTask& first = *tasks[0];
  const AttentionShape& shape = first.shape;
  const KernelChoice choice = cuda::SelectKernel(first.config);
  const size_t element_bytes = ElementSize(first.dtype);
  std::vector<int64_t> seq_lens;
  for (AttentionTask* task : tasks) seq_lens.push_back(task->shape.seq_len);
  // Upload into this backend's packed tensors, then run on them as on any device tensors.
  cuda::DeviceTensors device;
  const cuda::PackedCounts counts = cuda::PackSequences(seq_lens, shape, first.layout, &device);
  const int64_t q_bytes_all = counts.q_elements * static_cast<int64_t>(element_bytes);
  const int64_t kv_bytes_all = counts.kv_elements * static_cast<int64_t>(element_bytes);
  const int64_t offsets[5] = {0, q_bytes_all, q_bytes_all + kv_bytes_all,
                              q_bytes_all + 2 * kv_bytes_all, 2 * q_bytes_all + 2 * kv_bytes_all};
  ANCHOR_RETURN_IF_ERROR(
      ReserveTensorBuffer(offsets[4] + counts.lse_elements * static_cast<int64_t>(sizeof(float))));
  char* base = static_cast<char*>(tensor_buffer_);
  device.q = base + offsets[0];
  device.k = base + offsets[1];
  device.v = base + offsets[2];
  device.out = base + offsets[3];
  device.maybe_lse = reinterpret_cast<float*>(base + offsets[4]);
  ANCHOR_RETURN_IF_ERROR(runner_->PrepareOnDevice(shape, first.config, first.dtype, device, nullptr,
                                                  0, nullptr, keep_stripes_));
  const cuda::BatchPlan& plan = runner_->plan();
  const cudaStream_t stream = runner_->stream();
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));

  Event start, uploaded, identified, attended, done;
  ANCHOR_RETURN_IF_ERROR(start.Record(stream));
  for (size_t t = 0; t < tasks.size(); ++t) {
    const AttentionTask& task = *tasks[t];
    const cuda::SeqDesc& seq = plan.seqs[t];
    const int64_t q_bytes = task.shape.seq_len * shape.num_q_heads * shape.head_dim * element_bytes;
    const int64_t kv_bytes =
        task.shape.seq_len * shape.num_kv_heads * shape.head_dim * element_bytes;
    char* q = static_cast<char*>(runner_->q()) + seq.q_offset * element_bytes;
    char* k = static_cast<char*>(runner_->k()) + seq.kv_offset * element_bytes;
    char* v = static_cast<char*>(runner_->v()) + seq.kv_offset * element_bytes;
    ANCHOR_RETURN_IF_ERROR(staging_->Upload(q, task.q, q_bytes, stream));
    ANCHOR_RETURN_IF_ERROR(staging_->Upload(k, task.k, kv_bytes, stream));
    ANCHOR_RETURN_IF_ERROR(staging_->Upload(v, task.v, kv_bytes, stream));
  }
  ANCHOR_RETURN_IF_ERROR(uploaded.Record(stream));
  if (choice == KernelChoice::kSparse) {
    ANCHOR_RETURN_IF_ERROR(runner_->RunAnchorStage());
    ANCHOR_RETURN_IF_ERROR(runner_->RunStripeStage());
  }
  ANCHOR_RETURN_IF_ERROR(runner_->RunHeadStats(choice == KernelChoice::kDense));
  ANCHOR_RETURN_IF_ERROR(identified.Record(stream));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (all_cancelled("after stripe identification")) return absl::OkStatus();

  ANCHOR_RETURN_IF_ERROR(runner_->RunAttention(choice));
  ANCHOR_RETURN_IF_ERROR(attended.Record(stream));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (all_cancelled("after attention")) return absl::OkStatus();

  for (size_t t = 0; t < tasks.size(); ++t) {
    AttentionTask& task = *tasks[t];
    if (task.Cancelled()) continue;
    const cuda::SeqDesc& seq = plan.seqs[t];
    const int64_t q_bytes = task.shape.seq_len * shape.num_q_heads * shape.head_dim * element_bytes;
    ANCHOR_RETURN_IF_ERROR(staging_->Download(
        task.out, static_cast<const char*>(runner_->out()) + seq.q_offset * element_bytes, q_bytes,
        stream));
    if (task.maybe_lse != nullptr) {
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          task.maybe_lse, runner_->lse() + seq.lse_offset,
          task.shape.seq_len * shape.num_q_heads * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
  }
  std::vector<HeadStats> stats;
  ANCHOR_RETURN_IF_ERROR(runner_->CopyHeadStats(&stats));  // one copy for the batch
  ANCHOR_RETURN_IF_ERROR(done.Record(stream));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));

  StageTimes times;
  times.identification_seconds = SecondsBetween(uploaded, identified);
  times.compute_seconds = SecondsBetween(identified, attended);
  times.transfer_seconds = SecondsBetween(start, uploaded) + SecondsBetween(attended, done);
  for (size_t t = 0; t < tasks.size(); ++t) {
    AttentionTask& task = *tasks[t];
    if (task.Cancelled()) {
      task.status = absl::CancelledError("cancelled during the cuda batch");
      continue;
    }
    // The batch ran as one launch per stage: every task reports the batch's stage times.
    task.times = times;
    task.head_stats.assign(stats.begin() + t * shape.num_q_heads,
                           stats.begin() + (t + 1) * shape.num_q_heads);
  }

  if (keep_stripes_ && choice == KernelChoice::kSparse) {
    snapshot_ = StripeSnapshot{};
    snapshot_.plan = plan;
    ANCHOR_RETURN_IF_ERROR(runner_->CopyStripeLists(&snapshot_.counts, &snapshot_.index));
    ANCHOR_RETURN_IF_ERROR(runner_->CopyRowAnchor(&snapshot_.row_anchor));
    if (plan.mass) ANCHOR_RETURN_IF_ERROR(runner_->CopyMassThetas(&snapshot_.mass_theta));
  }
  return absl::OkStatus();
}

}  // namespace anchorserve
