// Instantiation of the attention kernel for fp16, head_dim 128.
#include "kernels/cuda/attention_instances.h"
#include "kernels/cuda/attention_kernel_ws.cuh"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionWsFp16D128(const AttentionParams& params, cudaStream_t stream) {
  return LaunchAttentionWsTyped<__half, 128>(params, stream);
}

}  // namespace anchorserve::cuda::attention_detail
