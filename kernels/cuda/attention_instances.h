// The compiled instantiations of the attention kernel, one translation unit each
// (attention_<dtype>_d<head_dim>.cu) so that builds stay parallel and bounded.
// attention_launch.cu picks one per launch.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/attention_params.h"
#include "kernels/cuda/kv_tensor_map.h"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionBf16D64(const AttentionParams& params, const KvTensorMaps& maps,
                                   cudaStream_t stream);
cudaError_t LaunchAttentionBf16D128(const AttentionParams& params, const KvTensorMaps& maps,
                                    cudaStream_t stream);
cudaError_t LaunchAttentionFp16D64(const AttentionParams& params, const KvTensorMaps& maps,
                                   cudaStream_t stream);
cudaError_t LaunchAttentionFp16D128(const AttentionParams& params, const KvTensorMaps& maps,
                                    cudaStream_t stream);

}  // namespace anchorserve::cuda::attention_detail
