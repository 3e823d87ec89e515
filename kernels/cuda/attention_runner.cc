#include "kernels/cuda/attention_runner.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <limits>
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

static_assert(static_cast<int>(ElemType::kBf16) == static_cast<int>(DType::kBf16) &&
                  static_cast<int>(ElemType::kFp16) == static_cast<int>(DType::kFp16),
              "ElemType mirrors the 16-bit DTypes");

static_assert(kMassGridLevels == kMassThetaBins + 1 && kMassGridStep == kMassThetaStep &&
                  kMassWeightCeiling == kMassGapCeiling,
              "the device mass-target grid mirrors kernels/attention_types.h");

// The ElemType of a 16-bit DType.
ElemType ToElemType(DType dtype) { return static_cast<ElemType>(dtype); }

// A launcher's result as a Status: the failed precondition as INVALID_ARGUMENT (arguments) or
// FAILED_PRECONDITION (GPU), a CUDA error as INTERNAL (marked DeviceUnusable when sticky).
absl::Status LaunchStatus(const LaunchResult& result, const char* launcher) {
  if (result.ok()) return absl::OkStatus();
  if (result.precondition_failed()) {
    const std::string message = absl::StrCat(launcher, ": ", result.what);
    return result.code == cudaErrorInvalidDevice ? absl::FailedPreconditionError(message)
                                                 : absl::InvalidArgumentError(message);
  }
  return CudaErrorToStatus(result.code, launcher, __FILE__, __LINE__);
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

absl::Status AttentionRunner::ReserveArena(int64_t bytes) {
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (bytes <= arena_bytes_) return absl::OkStatus();
  // Grow-only: the old arena's contents are not needed across batches.
  if (arena_ != nullptr) {
    // The last batch may still run on the caller's stream.
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(active_stream_));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaFree(arena_));
    arena_ = nullptr;
    arena_bytes_ = 0;
  }
  void* memory = nullptr;
  const cudaError_t error = cudaMalloc(&memory, bytes);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda workspace of ", bytes, " bytes: ", cudaGetErrorString(error)));
  }
  arena_ = memory;
  arena_bytes_ = bytes;
  return absl::OkStatus();
}

absl::Status AttentionRunner::UploadPlan() {
  kv_tensor_ = UniformKvTensor(plan_.seqs);
  ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.seqs, plan_.seqs, active_stream_));
  ANCHOR_RETURN_IF_ERROR(
      Upload(base_, layout_.attention_tiles, plan_.attention_tiles, active_stream_));
  ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.groups, plan_.groups, active_stream_));
  if (plan_.sparse) {
    ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.anchor_tiles, plan_.anchor_tiles, active_stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.blocks, plan_.blocks, active_stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.list_offset, plan_.list_offset, active_stream_));
    ANCHOR_RETURN_IF_ERROR(Upload(base_, layout_.stripe_items, plan_.stripe_items, active_stream_));
  }
  return absl::OkStatus();
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
  config_ = request.config;
  layout_ = LayoutWorkspace(plan_, static_cast<int>(ElementSize(dtype)), keep_row_anchor);
  ANCHOR_RETURN_IF_ERROR(ReserveArena(layout_.total_bytes));
  active_stream_ = stream_;
  base_ = arena_;
  q_ = At(layout_.q);
  k_ = At(layout_.k);
  v_ = At(layout_.v);
  out_ = At(layout_.out);
  lse_ = static_cast<float*>(At(layout_.lse));
  ANCHOR_RETURN_IF_ERROR(UploadPlan());
  // Callers may overwrite the packed tensors from the host right after this returns.
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  prepared_ = true;
  return absl::OkStatus();
}

namespace {

BatchPlanRequest DeviceRequest(const AttentionShape& shape, const AnchorConfig& config,
                               absl::Span<const int64_t> seq_lens) {
  BatchPlanRequest request;
  request.seq_lens.assign(seq_lens.begin(), seq_lens.end());
  request.num_q_heads = shape.num_q_heads;
  request.num_kv_heads = shape.num_kv_heads;
  request.head_dim = shape.head_dim;
  request.config = config;
  request.sparse = SelectKernel(config) == KernelChoice::kSparse;
  request.attention_tile_rows = kAttentionTileRows;
  return request;
}

}  // namespace

absl::StatusOr<int64_t> AttentionRunner::DeviceWorkspaceBytes(const AttentionShape& shape,
                                                              const AnchorConfig& config,
                                                              DType dtype,
                                                              absl::Span<const int64_t> seq_lens) {
  ANCHOR_ASSIGN_OR_RETURN(BatchPlan plan, PlanBatch(DeviceRequest(shape, config, seq_lens)));
  return LayoutWorkspace(plan, static_cast<int>(ElementSize(dtype)), false,
                         TensorPlacement::kCallerOwned)
      .total_bytes;
}

absl::Status AttentionRunner::PrepareOnDevice(const AttentionShape& shape,
                                              const AnchorConfig& config, DType dtype,
                                              const DeviceTensors& tensors, void* workspace,
                                              int64_t workspace_bytes, cudaStream_t stream,
                                              bool keep_row_anchor) {
  prepared_ = false;
  if (dtype != DType::kBf16 && dtype != DType::kFp16) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ", std::string(DTypeName(dtype)),
                                                   " is not supported by the cuda backend"));
  }
  if (tensors.q == nullptr || tensors.k == nullptr || tensors.v == nullptr ||
      tensors.out == nullptr) {
    return absl::InvalidArgumentError("device tensors q, k, v and out must be non-null");
  }
  std::vector<int64_t> seq_lens;
  for (const DeviceSequence& seq : tensors.seqs) seq_lens.push_back(seq.seq_len);
  ANCHOR_ASSIGN_OR_RETURN(plan_, PlanBatch(DeviceRequest(shape, config, seq_lens)));
  for (size_t i = 0; i < tensors.seqs.size(); ++i) {
    const DeviceSequence& from = tensors.seqs[i];
    SeqDesc& desc = plan_.seqs[i];
    desc.q_offset = from.q_offset;
    desc.kv_offset = from.kv_offset;
    desc.q_token_stride = from.q_token_stride;
    desc.q_head_stride = from.q_head_stride;
    desc.kv_token_stride = from.kv_token_stride;
    desc.kv_head_stride = from.kv_head_stride;
    desc.lse_offset = from.lse_offset;
  }
  elem_type_ = ToElemType(dtype);
  softmax_scale_ = config.ScaleFor(shape.head_dim);
  theta_ = config.theta;
  config_ = config;
  layout_ = LayoutWorkspace(plan_, static_cast<int>(ElementSize(dtype)), keep_row_anchor,
                            TensorPlacement::kCallerOwned);
  if (workspace != nullptr) {
    if (workspace_bytes < layout_.total_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "workspace of ", workspace_bytes, " bytes, the batch needs ", layout_.total_bytes));
    }
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    base_ = workspace;
  } else {
    ANCHOR_RETURN_IF_ERROR(ReserveArena(layout_.total_bytes));
    base_ = arena_;
  }
  active_stream_ = stream != nullptr ? stream : stream_;
  q_ = const_cast<void*>(tensors.q);
  k_ = const_cast<void*>(tensors.k);
  v_ = const_cast<void*>(tensors.v);
  out_ = tensors.out;
  lse_ = tensors.maybe_lse;
  ANCHOR_RETURN_IF_ERROR(UploadPlan());
  prepared_ = true;
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunOnDevice(const AttentionProblem& problem,
                                          const DeviceTensors& tensors, void* workspace,
                                          int64_t workspace_bytes, cudaStream_t stream,
                                          std::vector<HeadStats>* maybe_head_stats) {
  ANCHOR_RETURN_IF_ERROR(PrepareOnDevice(problem.shape, problem.config, problem.dtype, tensors,
                                         workspace, workspace_bytes, stream));
  const KernelChoice choice = SelectKernel(problem.config);
  if (choice == KernelChoice::kSparse) {
    ANCHOR_RETURN_IF_ERROR(RunAnchorStage());
    ANCHOR_RETURN_IF_ERROR(RunStripeStage());
  }
  ANCHOR_RETURN_IF_ERROR(RunHeadStats(choice == KernelChoice::kDense));
  ANCHOR_RETURN_IF_ERROR(RunAttention(choice));
  if (maybe_head_stats != nullptr) ANCHOR_RETURN_IF_ERROR(CopyHeadStats(maybe_head_stats));
  return absl::OkStatus();
}

PackedCounts PackSequences(absl::Span<const int64_t> seq_lens, const AttentionShape& shape,
                           Layout layout, DeviceTensors* tensors) {
  PackedCounts counts;
  tensors->seqs.clear();
  for (int64_t seq_len : seq_lens) {
    const TensorStrides q = StridesFor(layout, seq_len, shape.num_q_heads, shape.head_dim);
    const TensorStrides kv = StridesFor(layout, seq_len, shape.num_kv_heads, shape.head_dim);
    DeviceSequence seq;
    seq.seq_len = seq_len;
    seq.q_offset = counts.q_elements;
    seq.kv_offset = counts.kv_elements;
    seq.q_token_stride = q.token;
    seq.q_head_stride = q.head;
    seq.kv_token_stride = kv.token;
    seq.kv_head_stride = kv.head;
    seq.lse_offset = counts.lse_elements;
    tensors->seqs.push_back(seq);
    counts.q_elements += seq_len * shape.num_q_heads * shape.head_dim;
    counts.kv_elements += seq_len * shape.num_kv_heads * shape.head_dim;
    counts.lse_elements += seq_len * shape.num_q_heads;
  }
  return counts;
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
  p.kv_tensor = kv_tensor_;
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
  if (plan_.mass) {
    MassTargetParams& mass = p.mass;
    mass.enabled = 1;
    mass.target = config_.mass_target;
    mass.density_cap = config_.mass_density_cap;
    mass.min_theta = config_.mass_min_theta;
    mass.num_items = static_cast<int32_t>(plan_.stripe_items.size());
    p.num_items = plan_.candidate_items;
    mass.levels = static_cast<uint8_t*>(At(layout_.mass_levels));
    mass.level_mass = static_cast<float*>(At(layout_.level_mass));
    mass.candidate_mass = static_cast<float*>(At(layout_.candidate_mass));
    mass.anchor_mass = static_cast<float*>(At(layout_.anchor_mass));
    mass.level_keys = static_cast<int32_t*>(At(layout_.level_keys));
    mass.scratch_bytes = layout_.mass_scratch_bytes;
    mass.choice = static_cast<MassChoiceRecord*>(At(layout_.mass_choice));
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
  p.kv_tensor = kv_tensor_;
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
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(LaunchAnchorStage(identification_params(), active_stream_),
                                      "LaunchAnchorStage"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunStripeStage() {
  if (!prepared_ || !plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(LaunchStripeStage(identification_params(), active_stream_),
                                      "LaunchStripeStage"));
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
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(LaunchAttention(params, active_stream_), "LaunchAttention"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::RunHeadStats(bool dense) {
  if (!prepared_) return absl::FailedPreconditionError("Prepare first");
  if (!dense && !plan_.sparse) return absl::FailedPreconditionError("no sparse plan");
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  ANCHOR_RETURN_IF_ERROR(LaunchStatus(
      LaunchHeadStats(identification_params(), dense, active_stream_), "LaunchHeadStats"));
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyHeadStats(std::vector<HeadStats>* stats) const {
  std::vector<DeviceHeadStats> device_stats(plan_.seqs.size() * plan_.num_q_heads);
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_stats.data(), At(layout_.head_stats),
                                              device_stats.size() * sizeof(DeviceHeadStats),
                                              cudaMemcpyDeviceToHost, active_stream_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(active_stream_));
  stats->resize(device_stats.size());
  for (size_t i = 0; i < device_stats.size(); ++i) {
    HeadStats& s = (*stats)[i];
    s.computed_entries = device_stats[i].computed_entries;
    s.stripe_entries = device_stats[i].stripe_entries;
    s.stripe_groups = device_stats[i].stripe_groups;
    s.stripes_total = device_stats[i].stripes_total;
    s.stripes_min = device_stats[i].stripes_min;
    s.stripes_max = device_stats[i].stripes_max;
    s.mass_groups = device_stats[i].mass_groups;
    s.mass_full_groups = device_stats[i].mass_full_groups;
    s.mass_theta_min = device_stats[i].mass_theta_min;
    s.mass_theta_max = device_stats[i].mass_theta_max;
    s.mass_theta_sum = device_stats[i].mass_theta_sum;
    s.estimated_mass_sum = device_stats[i].estimated_mass_sum;
  }
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyMassThetas(std::vector<float>* thetas) const {
  if (!plan_.mass) return absl::FailedPreconditionError("no mass-target plan");
  std::vector<MassChoiceRecord> records(plan_.list_offset.size());
  if (!records.empty()) {
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(records.data(), At(layout_.mass_choice),
                                                records.size() * sizeof(MassChoiceRecord),
                                                cudaMemcpyDeviceToHost, active_stream_));
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(active_stream_));
  }
  thetas->assign(records.size(), std::numeric_limits<float>::quiet_NaN());
  const int hq = plan_.num_q_heads;
  for (size_t list = 0; list < records.size(); ++list) {
    const IdGroup& group = plan_.groups[list / hq];
    if (group.cand_end > group.cand_begin) (*thetas)[list] = records[list].theta;
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
                                                cudaMemcpyDeviceToHost, active_stream_));
  }
  if (!index->empty()) {
    ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(index->data(), At(layout_.index),
                                                index->size() * sizeof(int32_t),
                                                cudaMemcpyDeviceToHost, active_stream_));
  }
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(active_stream_));
  return absl::OkStatus();
}

absl::Status AttentionRunner::CopyRowAnchor(std::vector<float>* row_anchor) const {
  if (layout_.row_anchor == 0) return absl::FailedPreconditionError("keep_row_anchor was off");
  row_anchor->resize(plan_.lse_elements);
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row_anchor->data(), At(layout_.row_anchor),
                                              row_anchor->size() * sizeof(float),
                                              cudaMemcpyDeviceToHost, active_stream_));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(active_stream_));
  return absl::OkStatus();
}

}  // namespace anchorserve::cuda
