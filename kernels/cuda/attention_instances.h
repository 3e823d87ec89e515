// The compiled instantiations of the attention kernels, one translation unit each
// (attention_<dtype>_d<head_dim>.cu: baseline mainloop; attention_ws_<dtype>_d<head_dim>.cu:
// warp-specialized mainloop) so that builds stay parallel and bounded. attention_launch.cu
// picks one per launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/attention_params.h"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionBf16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionBf16D128(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionFp16D64(const AttentionParams& params, cudaStream_t stream);
cudaError_t LaunchAttentionFp16D128(const AttentionParams& params, cudaStream_t stream);

// tiles_per_chunk: block order of AttentionKernelWs (0 = baseline order).
cudaError_t LaunchAttentionWsBf16D64(const AttentionParams& params, int32_t tiles_per_chunk,
                                     cudaStream_t stream);
cudaError_t LaunchAttentionWsBf16D128(const AttentionParams& params, int32_t tiles_per_chunk,
                                      cudaStream_t stream);
cudaError_t LaunchAttentionWsFp16D64(const AttentionParams& params, int32_t tiles_per_chunk,
                                     cudaStream_t stream);
cudaError_t LaunchAttentionWsFp16D128(const AttentionParams& params, int32_t tiles_per_chunk,
                                      cudaStream_t stream);

}  // namespace anchorserve::cuda::attention_detail
