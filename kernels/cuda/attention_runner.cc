#include "kernels/cuda/attention_runner.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/identification.h"
#include "kernels/cuda/launch_result.h"
#include "kernels/status_macros.h"

namespace anchorserve::cuda {
namespace {

static_assert(sizeof(DeviceHeadStats) == sizeof(HeadStats) &&
                  std::is_trivially_copyable_v<HeadStats>,
              "DeviceHeadStats mirrors HeadStats");
static_assert(static_cast<int>(ElemType::kBf16) == static_cast<int>(DType::kBf16) &&
                  static_cast<int>(ElemType::kFp16) == static_cast<int>(DType::kFp16),
              "ElemType mirrors the 16-bit DTypes");

// The ElemType of a 16-bit DType.
ElemType ToElemType(DType dtype) { return static_cast<ElemType>(dtype); }

// A launcher's result as a Status: the failed precondition as INVALID_ARGUMENT (arguments) or
// FAILED_PRECONDITION (GPU), a CUDA error as INTERNAL.
absl::Status LaunchStatus(const LaunchResult& result, const char* launcher) {
  if (result.ok()) return absl::OkStatus();
  if (result.precondition_failed()) {
    const std::string message = absl::StrCat(launcher, ": ", result.what);
    return result.code == cudaErrorInvalidDevice ? absl::FailedPreconditionError(message)
                                                 : absl::InvalidArgumentError(message);
  }
  return absl::InternalError(absl::StrCat(launcher, ": ", cudaGetErrorName(result.code), ": ",
                                          cudaGetErrorString(result.code)));
}

template <typename T>
absl::Status Upload(void* base, int64_t offset, const std::vector<T>& values, cudaStream_t stream) {
  if (values.empty()) return absl::OkStatus();
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(base) + offset, values.data(),
                                              values.size() * sizeof(T), cudaMemcpyHostToDevice,
                                              stream));
  return absl::OkStatus();
}

}  // namespace

KernelChoice SelectKernel(const AnchorConfig& config) {
  return config.IsDense() ? KernelChoice::kDense : KernelChoice::kSparse;
}

absl::StatusOr<std::unique_ptr<AttentionRunner>> AttentionRunner::Create(int device) {
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaStream_t stream = nullptr;
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return std::unique_ptr<AttentionRunner>(new AttentionRunner(device, stream));
}

AttentionRunner::~AttentionRunner() {
  cudaSetDevice(device_);
  if (arena_ != nullptr) cudaFree(arena_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status AttentionRunner::Prepare(const BatchPlanRequest& request, DType dtype,
                                      bool keep_row_anchor) {
  prepared_ = false;
  if (dtype != DType::kBf16 && dtype != DType::kFp16) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ", std::string(DTypeName(dtype)),
                                                   " is not supported by the cuda backend"));
  }
  ANCHOR_ASSIGN_OR_RETURN(plan_, PlanBatch(request));
  elem_type_ = ToElemType(dtype);
  softmax_scale_ = request.config.ScaleFor(request.head_dim);
  theta_ = request.config.theta;
  layout_ = LayoutWorkspace(plan_, static_cast<int>(ElementSize(dtype)), keep_row_anchor);

  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (layout_.total_bytes > arena_bytes_) {
    // Grow-only: the old arena's contents are not needed across batches.
    if (arena_ != nullptr) {
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      ANCHOR_CUDA_RETURN_IF_ERROR(cudaFree(arena_));
      arena_ = nullptr;
      arena_bytes_ = 0;
    }
    void* memory = nullptr;
    const cudaError_t error = cudaMalloc(&memory, layout_.total_bytes);
    if (error != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free allocation error
      return absl::ResourceExhaustedError(absl::StrCat("cuda workspace of ", layout_.total_bytes,
                                                       " bytes: ", cudaGetErrorString(error)));
    }
    arena_ = memory;
    arena_bytes_ = layout_.total_bytes;
  }
  ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.seqs, plan_.seqs, stream_));
  ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.attention_tiles, plan_.attention_tiles, stream_));
  ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.groups, plan_.groups, stream_));
  if (plan_.sparse) {
    ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.anchor_tiles, plan_.anchor_tiles, stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.blocks, plan_.blocks, stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.list_offset, plan_.list_offset, stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(arena_, layout_.stripe_items, plan_.stripe_items, stream_));
  }
  // The host vectors are pageable: wait so that they may change after we return.
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  prepared_ = true;
  return absl::OkStatus();
}

IdentificationParams AttentionRunner::identification_params() const {
  IdentificationParams p{};
  p.elem_type = elem_type_;
  p.num_q_heads = plan_.num_q_heads;
  p.num_kv_heads = plan_.num_kv_heads;
  p.head_dim = plan_.head_dim;
  p.softmax_scale = softmax_scale_;
  p.theta = theta_;
  p.geometry = plan_.geometry;
  p.pooled_rows = plan_.pooled_rows;
  p.q = q();
  p.k = k();
  p.seqs = static_cast<const SeqDesc*>(At(layout_.seqs));
  p.num_seqs = static_cast<int32_t>(plan_.seqs.size());
  p.groups = static_cast<const IdGroup*>(At(layout_.groups));
  p.num_groups = static_cast<int32_t>(plan_.groups.size());
  p.head_stats = static_cast<DeviceHeadStats*>(At(layout_.head_stats));
  if (plan_.sparse) {
    p.anchor_tiles = static_cast<const QueryTile*>(At(layout_.anchor_tiles));
    p.num_anchor_tiles = static_cast<int32_t>(plan_.anchor_tiles.size());
    p.blocks = static_cast<const IdBlock*>(At(layout_.blocks));
    p.items = static_cast<const StripeItem*>(At(layout_.stripe_items));
    p.num_items = static_cast<int32_t>(plan_.stripe_items.size());
    p.lists.list_offset = static_cast<const int64_t*>(At(layout_.list_offset));
    p.lists.count = static_cast<int32_t*>(At(layout_.counts));
    p.lists.index = static_cast<int32_t*>(At(layout_.index));
    p.tile_qsum = static_cast<double*>(At(layout_.tile_qsum));
    p.tile_xsum = static_cast<double*>(At(layout_.tile_xsum));
    p.pooled_split = At(layout_.pooled_split);
    p.pooled_unscale = static_cast<float*>(At(layout_.pooled_unscale));
    p.pooled_anchor = static_cast<float*>(At(layout_.pooled_anchor));
    p.bitmask = static_cast<uint32_t*>(At(layout_.bitmask));
    p.bitmask_words = layout_.bitmask_words;
    p.maybe_row_anchor =
        layout_.row_anchor != 0 ? static_cast<float*>(At(layout_.row_anchor)) : nullptr;
  }
  return p;
}

AttentionParams AttentionRunner::attention_params(KernelChoice choice) const {
  AttentionParams p{};
  p.elem_type = elem_type_;
  p.num_q_heads = plan_.num_q_heads;
  p.num_kv_heads = plan_.num_kv_heads;
  p.head_dim = plan_.head_dim;
  p.softmax_scale = softmax_scale_;
  p.q = q();
  p.k = k();
  p.v = v();
  p.out = out();
  p.maybe_lse = lse();
  p.seqs = static_cast<const SeqDesc*>(At(layout_.seqs));
  p.num_seqs = static_cast<int32_t>(plan_.seqs.size());
  p.tiles = static_cast<const QueryTile*>(At(layout_.attention_tiles));
  p.num_tiles = static_cast<int32_t>(plan_.attention_tiles.size());
  p.sparse = choice == KernelChoice::kSparse;
  p.geometry = plan_.geometry;
  if (p.sparse) {
    const IdentificationParams id = identification_params();
    p.stripes = id.lists;
  }
  return p;
}

absl::Status AttentionRunner::RunAnchorStage() {
  if (!prepared_ || !plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_RETURN_IF_ERROR(
      LaunchStatus(LaunchAnchorStage(identification_params(), stream_), "LaunchAnchorStage"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunStripeStage() {
  if (!prepared_ || !plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_RETURN_IF_ERROR(
      LaunchStatus(LaunchStripeStage(identification_params(), stream_), "LaunchStripeStage"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunAttention(KernelChoice choice, void* out_override,
                                           float* lse_override) {
  if (!prepared_) return absl::FailedPreconditionError("Prepare first");
  if (choice == KernelChoice::kSparse && !plan_.sparse) {
    return absl::FailedPreconditionError("sparse attention needs a sparse plan");
  }
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  AttentionParams params = attention_params(choice);
  if (out_override != nullptr) params.out = out_override;
  if (lse_override != nullptr) params.maybe_lse = lse_override;
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(LaunchAttention(params, stream_), "LaunchAttention"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunHeadStats(bool dense) {
  if (!prepared_) return absl::FailedPreconditionError("Prepare first");
  if (!dense && !plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_RETURN_IF_ERROR(
      LaunchStatus(LaunchHeadStats(identification_params(), dense, stream_), "LaunchHeadStats"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyHeadStats(std::vector<HeadStats>* stats) const {
  std::vector<DeviceHeadStats> device_stats(plan_.seqs.size() * plan_.num_q_heads);
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_stats.data(), At(layout_.head_stats),
                                              device_stats.size() * sizeof(DeviceHeadStats),
                                              cudaMemcpyDeviceToHost, stream_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  stats->resize(device_stats.size());
  for (size_t i = 0; i < device_stats.size(); ++i) {
    HeadStats& s = (*stats)[i];
    s.computed_entries = device_stats[i].computed_entries;
    s.stripe_entries = device_stats[i].stripe_entries;
    s.stripe_groups = device_stats[i].stripe_groups;
    s.stripes_total = device_stats[i].stripes_total;
    s.stripes_min = device_stats[i].stripes_min;
    s.stripes_max = device_stats[i].stripes_max;
  }
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyStripeLists(std::vector<int32_t>* counts,
                                              std::vector<int32_t>* index) const {
  if (!plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  counts->resize(plan_.list_offset.size());
  index->resize(plan_.list_entries);
  if (!counts->empty()) {
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(counts->data(), At(layout_.counts),
                                                counts->size() * sizeof(int32_t),
                                                cudaMemcpyDeviceToHost, stream_));
  }
  if (!index->empty()) {
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(index->data(), At(layout_.index),
                                                index->size() * sizeof(int32_t),
                                                cudaMemcpyDeviceToHost, stream_));
  }
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyRowAnchor(std::vector<float>* row_anchor) const {
  if (layout_.row_anchor == 0) return absl::FailedPreconditionError("keep_row_anchor was off");
  row_anchor->resize(plan_.lse_elements);
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row_anchor->data(), At(layout_.row_anchor),
                                              row_anchor->size() * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace anchorserve::cuda
