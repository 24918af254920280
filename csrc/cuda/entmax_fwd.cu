// Instances of the alpha-entmax attention forward (entmax_fwd.cuh): bf16/fp16 x head dim 64/128.
#include "entmax_fwd.cuh"

namespace hcs_entmax {

cudaError_t launch_entmax_fwd(const EntmaxParams& p, int dtype, int head_dim, cudaStream_t stream) {
  if (dtype == 0 && head_dim == 64) return launch<__nv_bfloat16, 64>(p, stream);
  if (dtype == 0 && head_dim == 128) return launch<__nv_bfloat16, 128>(p, stream);
  if (dtype == 1 && head_dim == 64) return launch<__half, 64>(p, stream);
  if (dtype == 1 && head_dim == 128) return launch<__half, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace hcs_entmax
