// The compiled instantiations of the attention kernel, one translation unit each
// (attention_ws_<dtype>_d<head_dim>.cu) so that builds stay parallel and bounded.
// attention_launch.cu picks one per launch.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/attention_params.h"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionWsBf16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionWsBf16D128(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionWsFp16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionWsFp16D128(const AttentionParams& params, cudaStream_t stream);

}  // namespace anchorserve::cuda::attention_detail
