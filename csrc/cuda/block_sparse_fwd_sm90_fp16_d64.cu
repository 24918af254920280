// Hopper (warp-specialized TMA + wgmma) instantiation of the block-sparse forward for
// __half, head dim 64.
#include "block_sparse_fwd_sm90ws.cuh"

namespace hcs {
cudaError_t launch_fwd_sm90_fp16_d64(const FwdParams& p, cudaStream_t stream) {
  return sm90ws::launch_block_sparse_fwd_ws<__half, 64>(p, stream);
}
}  // namespace hcs
