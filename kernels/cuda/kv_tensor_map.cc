#include "kernels/cuda/kv_tensor_map.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

namespace anchorserve::cuda {
namespace {

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

}  // namespace

KvTensorMaps BuildKvTensorMaps(ElemType type, int32_t head_dim, int32_t num_kv_heads,
                               const KvTensorShape& shape, const void* k, const void* v) {
  KvTensorMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  if (shape.num_tokens <= 0 || shape.num_tokens > INT32_MAX || shape.token_stride <= 0 ||
      shape.head_stride <= 0 || shape.base_offset < 0 || shape.base_offset % 8 != 0 ||
      (head_dim != 64 && head_dim != 128) || num_kv_heads < 1 || k == nullptr) {
    return maps;
  }
  const EncodeTiledFn encode = TensorMapEncoder();
  if (encode == nullptr) return maps;
  constexpr uint64_t kElemBytes = 2;
  const bool token_first = shape.token_stride < shape.head_stride;
  const uint64_t inner_count = token_first ? shape.num_tokens : num_kv_heads;
  const uint64_t outer_count = token_first ? num_kv_heads : shape.num_tokens;
  const uint64_t inner_stride = kElemBytes * (token_first ? shape.token_stride : shape.head_stride);
  const uint64_t outer_stride = kElemBytes * (token_first ? shape.head_stride : shape.token_stride);
  // Strides must be 16-byte multiples below 2^40 and nest (no dimension overlapping the next).
  if (inner_stride % 16 != 0 || outer_stride % 16 != 0 || outer_stride >= (uint64_t{1} << 40) ||
      inner_stride < kElemBytes * head_dim || outer_stride < inner_stride * inner_count) {
    return maps;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), inner_count, outer_count};
  const cuuint64_t strides[2] = {inner_stride, outer_stride};
  const cuuint32_t box[3] = {64, token_first ? 128u : 1u, token_first ? 1u : 128u};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType data_type =
      type == ElemType::kBf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  auto encode_one = [&](CUtensorMap* map, const void* tensor) {
    void* base = static_cast<uint16_t*>(const_cast<void*>(tensor)) + shape.base_offset;
    return encode(map, data_type, 3, base, dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  if (encode_one(&maps.k, k) != CUDA_SUCCESS ||
      (v != nullptr && encode_one(&maps.v, v) != CUDA_SUCCESS)) {
    std::memset(&maps, 0, sizeof(maps));
    return maps;
  }
  maps.enabled = 1;
  maps.token_dim = token_first ? 1 : 2;
  return maps;
}

}  // namespace anchorserve::cuda
