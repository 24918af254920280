// Hopper instantiations of the block-sparse forward for __nv_bfloat16, head dim 64: the
// wgmma kernel and the warp-specialized (TMA + wgmma) kernel.
#include "block_sparse_fwd_sm90ws.cuh"

namespace hcs {
cudaError_t launch_fwd_sm90_bf16_d64(const FwdParams& p, cudaStream_t stream) {
  return sm90::launch_block_sparse_fwd_sm90<__nv_bfloat16, 64>(p, stream);
}
cudaError_t launch_fwd_sm90ws_bf16_d64(const FwdParams& p, cudaStream_t stream, bool overlap) {
  return overlap ? sm90ws::launch_block_sparse_fwd_ws<__nv_bfloat16, 64, true>(p, stream)
                 : sm90ws::launch_block_sparse_fwd_ws<__nv_bfloat16, 64, false>(p, stream);
}
}  // namespace hcs
