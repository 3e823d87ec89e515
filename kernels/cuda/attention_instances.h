// The compiled instantiations of the attention kernel, one translation unit each
// (attention_<dtype>_d<head_dim>.cu) so that builds stay parallel and bounded.
// attention_launch.cu picks one per launch.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda/attention_params.h"

namespace anchorserve::cuda::attention_detail {

// Tensor maps of K and V for bulk (TMA) copies of whole contiguous key tiles, built by the
// launcher from AttentionParams::kv_tensor; enabled = 0 when there are none. Dimension 0 is d
// (boxes of 64 elements, 128-byte swizzle: the tiles' shared-memory layout); dimensions 1 and 2
// are the token (box of 128) and the KV head (box of 1), in the order of their strides.
struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
  int32_t enabled;
  int32_t token_dim;  // 1 or 2
};

cudaError_t LaunchAttentionBf16D64(const AttentionParams& params, const KvTensorMaps& maps,
                                   cudaStream_t stream);
cudaError_t LaunchAttentionBf16D128(const AttentionParams& params, const KvTensorMaps& maps,
                                    cudaStream_t stream);
cudaError_t LaunchAttentionFp16D64(const AttentionParams& params, const KvTensorMaps& maps,
                                   cudaStream_t stream);
cudaError_t LaunchAttentionFp16D128(const AttentionParams& params, const KvTensorMaps& maps,
                                    cudaStream_t stream);

}  // namespace anchorserve::cuda::attention_detail
