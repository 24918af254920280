// Instantiation of the block-sparse forward for __half, head dim 64 (one file per
// instantiation so ninja compiles them in parallel).
#include "block_sparse_fwd.cuh"

namespace hcs {
cudaError_t launch_fwd_fp16_d64(const FwdParams& p, cudaStream_t stream) {
  return launch_block_sparse_fwd<__half, 64>(p, stream);
}
}  // namespace hcs
