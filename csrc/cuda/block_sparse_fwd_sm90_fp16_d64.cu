// Hopper (wgmma) instantiation of the block-sparse forward for __half, head dim 64.
#include "block_sparse_fwd_sm90.cuh"

namespace hcs {
cudaError_t launch_fwd_sm90_fp16_d64(const FwdParams& p, cudaStream_t stream) {
  return sm90::launch_block_sparse_fwd_sm90<__half, 64>(p, stream);
}
}  // namespace hcs
