// The four compiled instantiations of the attention kernels, one translation unit each
// (attention_<dtype>_d<head_dim>.cu) so that builds stay parallel and bounded.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/anchor_params.h"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionBf16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionBf16D128(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionFp16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionFp16D128(const AttentionParams& params, cudaStream_t stream);

}  // namespace anchorserve::cuda::attention_detail
