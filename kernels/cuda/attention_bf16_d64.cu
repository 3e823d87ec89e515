// Instantiation of the attention kernel for bf16, head_dim 64.
#include "kernels/cuda/attention_instances.h"
#include "kernels/cuda/attention_kernel.cuh"

namespace anchorserve::cuda::attention_detail {

cudaError_t LaunchAttentionBf16D64(const AttentionParams& params, const KvTensorMaps& maps,
                                   cudaStream_t stream) {
  return LaunchAttentionTyped<__nv_bfloat16, 64>(params, maps, stream);
}

}  // namespace anchorserve::cuda::attention_detail
