// LaunchAttention: argument checks and the flat (dtype, head_dim) dispatch.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention_instances.h"
#include "kernels/cuda/attention_launch.h"

namespace anchorserve::cuda {
namespace {

bool Aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

cudaError_t CheckParams(const AttentionParams& p) {
  if (p.elem_type != ElemType::kBf16 && p.elem_type != ElemType::kFp16) {
    return cudaErrorInvalidValue;
  }
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.num_q_heads < 1 || p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 ||
      p.num_q_heads > 65535) {
    return cudaErrorInvalidValue;
  }
  if (!std::isfinite(p.softmax_scale) || p.softmax_scale <= 0.0f) return cudaErrorInvalidValue;
  if (p.num_tiles < 0) return cudaErrorInvalidValue;
  if (p.num_tiles == 0) return cudaSuccess;
  if (p.tiles == nullptr || p.seqs == nullptr || p.num_seqs < 1) return cudaErrorInvalidValue;
  if (!Aligned16(p.q) || !Aligned16(p.k) || !Aligned16(p.v) || !Aligned16(p.out) ||
      p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.sparse) {
    const AnchorGeometry& g = p.geometry;
    if (g.group_size < 1 || g.init_groups < 0 || g.local_groups < 1) return cudaErrorInvalidValue;
    if (p.stripes.list_offset == nullptr || p.stripes.count == nullptr ||
        p.stripes.index == nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  return cudaSuccess;
}

cudaError_t CheckDevice() {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  int major = 0;
  int minor = 0;
  error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (error != cudaSuccess) return error;
  error = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (error != cudaSuccess) return error;
  return major == 9 && minor == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t LaunchInstance(const AttentionParams& params, cudaStream_t stream) {
  const bool bf16 = params.elem_type == ElemType::kBf16;
  switch (params.head_dim) {
    case 64:
      return bf16 ? attention_detail::LaunchAttentionBf16D64(params, stream)
                  : attention_detail::LaunchAttentionFp16D64(params, stream);
    case 128:
      return bf16 ? attention_detail::LaunchAttentionBf16D128(params, stream)
                  : attention_detail::LaunchAttentionFp16D128(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t LaunchAttention(const AttentionParams& params, cudaStream_t stream) {
  cudaError_t error = CheckParams(params);
  if (error != cudaSuccess || params.num_tiles == 0) return error;
  error = CheckDevice();
  if (error != cudaSuccess) return error;
  return LaunchInstance(params, stream);
}

}  // namespace anchorserve::cuda
