// Hopper (warp-specialized TMA + wgmma) instantiation of the block-sparse forward for
// __nv_bfloat16, head dim 64.
#include "block_sparse_fwd_sm90ws.cuh"

namespace hcs {
cudaError_t launch_fwd_sm90_bf16_d64(const FwdParams& p, cudaStream_t stream) {
  return sm90ws::launch_block_sparse_fwd_ws<__nv_bfloat16, 64>(p, stream);
}
}  // namespace hcs
