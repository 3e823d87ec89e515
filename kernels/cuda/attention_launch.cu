// LaunchAttention: argument checks and the flat (dtype, head_dim) dispatch.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention_instances.h"
#include "kernels/cuda/attention_launch.h"

namespace anchorserve::cuda {
namespace {

bool Aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// The first argument precondition that does not hold; Ok() when there is nothing to launch.
LaunchResult CheckParams(const AttentionParams& p) {
  using R = LaunchResult;
  if (p.elem_type != ElemType::kBf16 && p.elem_type != ElemType::kFp16) {
    return R::InvalidArgument("elem_type must be bf16 or fp16");
  }
  if (p.head_dim != 64 && p.head_dim != 128)
    return R::InvalidArgument("head_dim must be 64 or 128");
  if (p.num_q_heads < 1 || p.num_kv_heads < 1) {
    return R::InvalidArgument("num_q_heads and num_kv_heads must be >= 1");
  }
  if (p.num_q_heads % p.num_kv_heads != 0) {
    return R::InvalidArgument("num_q_heads must be a multiple of num_kv_heads");
  }
  if (p.num_q_heads > 65535) return R::InvalidArgument("num_q_heads must be <= 65535 (grid.y)");
  if (!std::isfinite(p.softmax_scale) || p.softmax_scale <= 0.0f) {
    return R::InvalidArgument("softmax_scale must be finite and > 0");
  }
  if (p.num_tiles < 0) return R::InvalidArgument("num_tiles must be >= 0");
  if (p.num_tiles == 0) return R::Ok();
  if (p.tiles == nullptr) return R::InvalidArgument("tiles must not be null");
  if (p.seqs == nullptr || p.num_seqs < 1) {
    return R::InvalidArgument("seqs must not be null and num_seqs must be >= 1");
  }
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr) {
    return R::InvalidArgument("q, k, v and out must not be null");
  }
  if (!Aligned16(p.q) || !Aligned16(p.k) || !Aligned16(p.v) || !Aligned16(p.out)) {
    return R::InvalidArgument("q, k, v and out must be 16-byte aligned");
  }
  if (p.sparse) {
    const AnchorGeometry& g = p.geometry;
    if (g.group_size < 1 || g.init_groups < 0 || g.local_groups < 1) {
      return R::InvalidArgument(
          "sparse geometry needs group_size >= 1, init_groups >= 0 and local_groups >= 1");
    }
    if (p.stripes.list_offset == nullptr || p.stripes.count == nullptr ||
        p.stripes.index == nullptr) {
      return R::InvalidArgument("sparse attention needs stripe lists (list_offset, count, index)");
    }
  }
  return R::Ok();
}

// The kernels are compiled for sm_90a only.
LaunchResult CheckDevice() {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return LaunchResult::Cuda(error);
  int major = 0;
  int minor = 0;
  error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (error != cudaSuccess) return LaunchResult::Cuda(error);
  error = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (error != cudaSuccess) return LaunchResult::Cuda(error);
  if (major != 9 || minor != 0) {
    return LaunchResult::UnsupportedDevice(
        "the attention kernels need a GPU of compute capability 9.0 (sm_90a)");
  }
  return LaunchResult::Ok();
}

cudaError_t LaunchInstance(const AttentionParams& params, cudaStream_t stream) {
  const KvTensorMaps maps = BuildKvTensorMaps(
      params.elem_type, params.head_dim, params.num_kv_heads, params.kv_tensor, params.k, params.v);
  const bool bf16 = params.elem_type == ElemType::kBf16;
  if (params.head_dim == 64) {
    return bf16 ? attention_detail::LaunchAttentionBf16D64(params, maps, stream)
                : attention_detail::LaunchAttentionFp16D64(params, maps, stream);
  }
  return bf16 ? attention_detail::LaunchAttentionBf16D128(params, maps, stream)
              : attention_detail::LaunchAttentionFp16D128(params, maps, stream);
}

}  // namespace

LaunchResult LaunchAttention(const AttentionParams& params, cudaStream_t stream) {
  LaunchResult result = CheckParams(params);
  if (!result.ok() || params.num_tiles == 0) return result;
  result = CheckDevice();
  if (!result.ok()) return result;
  return LaunchResult::Cuda(LaunchInstance(params, stream));
}

}  // namespace anchorserve::cuda
