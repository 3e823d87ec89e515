// LaunchAttention: argument checks and the flat (dtype, head_dim) dispatch.
#include <cmath>
#include <cstdint>
#include <cstring>

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

using attention_detail::KvTensorMaps;

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's tensor-map encoder, looked up once through the runtime (no link against libcuda);
// null when the driver does not have it.
EncodeTiledFn TensorMapEncoder() {
  static const EncodeTiledFn encoder = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t error = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry,
                                                               12000, cudaEnableDefault, &status);
    if (error != cudaSuccess || status != cudaDriverEntryPointSuccess) return EncodeTiledFn{};
    return reinterpret_cast<EncodeTiledFn>(entry);
  }();
  return encoder;
}

// K/V tensor maps for params.kv_tensor. Leaves maps.enabled = 0 (row-by-row copies, always
// correct) when there is no shared tensor, the driver has no encoder, or the shape is outside
// what a tensor map addresses.
KvTensorMaps BuildKvTensorMaps(const AttentionParams& p) {
  KvTensorMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  const KvTensorShape& shape = p.kv_tensor;
  if (shape.num_tokens <= 0 || shape.num_tokens > INT32_MAX || shape.token_stride <= 0 ||
      shape.head_stride <= 0 || shape.base_offset < 0 || shape.base_offset % 8 != 0) {
    return maps;
  }
  const EncodeTiledFn encode = TensorMapEncoder();
  if (encode == nullptr) return maps;
  constexpr uint64_t kElemBytes = 2;
  const bool token_first = shape.token_stride < shape.head_stride;
  const uint64_t inner_count = token_first ? shape.num_tokens : p.num_kv_heads;
  const uint64_t outer_count = token_first ? p.num_kv_heads : shape.num_tokens;
  const uint64_t inner_stride = kElemBytes * (token_first ? shape.token_stride : shape.head_stride);
  const uint64_t outer_stride = kElemBytes * (token_first ? shape.head_stride : shape.token_stride);
  // Strides must be 16-byte multiples below 2^40 and nest (no dimension overlapping the next).
  if (inner_stride % 16 != 0 || outer_stride % 16 != 0 || outer_stride >= (uint64_t{1} << 40) ||
      inner_stride < kElemBytes * p.head_dim || outer_stride < inner_stride * inner_count) {
    return maps;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(p.head_dim), inner_count, outer_count};
  const cuuint64_t strides[2] = {inner_stride, outer_stride};
  const cuuint32_t box[3] = {64, token_first ? 128u : 1u, token_first ? 1u : 128u};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type = p.elem_type == ElemType::kBf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  auto encode_one = [&](CUtensorMap* map, const void* tensor) {
    void* base = static_cast<uint16_t*>(const_cast<void*>(tensor)) + shape.base_offset;
    return encode(map, type, 3, base, dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  if (encode_one(&maps.k, p.k) != CUDA_SUCCESS || encode_one(&maps.v, p.v) != CUDA_SUCCESS) {
    std::memset(&maps, 0, sizeof(maps));
    return maps;
  }
  maps.enabled = 1;
  maps.token_dim = token_first ? 1 : 2;
  return maps;
}

cudaError_t LaunchInstance(const AttentionParams& params, cudaStream_t stream) {
  const KvTensorMaps maps = BuildKvTensorMaps(params);
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
