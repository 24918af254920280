// Instantiation of the block-sparse forward for __nv_bfloat16, head dim 128 (one file per
// instantiation so ninja compiles them in parallel).
#include "block_sparse_fwd.cuh"

namespace hcs {
cudaError_t launch_fwd_bf16_d128(const FwdParams& p, cudaStream_t stream) {
  return launch_block_sparse_fwd<__nv_bfloat16, 128>(p, stream);
}
}  // namespace hcs
