// Mask-prediction helpers on the GPU:
//  * pool_blocks: one pass over Q or K computing, per block of tokens, the mean vector, the
//    mean pairwise cosine similarity (|sum of unit vectors|^2 / count^2) and the token
//    count. This is the bulk of the prediction's memory traffic (it reads Q and K once).
//  * mask_to_lut: bool block mask -> kv_counts and ascending kv_indices (tail zero), by
//    warp ballots instead of a sort.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block_sparse_fwd.h"

namespace hcs {

namespace {

constexpr int kPoolWarps = 4;
constexpr int kMaxDPerLane = 8;  // head dims up to 256

__device__ __forceinline__ float load_as_float(const void* base, int64_t i, int dtype) {
  if (dtype == 0) return static_cast<const float*>(base)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(base)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__global__ void __launch_bounds__(kPoolWarps * 32) pool_blocks_kernel(const PoolParams p) {
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ float s_x[kPoolWarps][256];
  __shared__ float s_u[kPoolWarps][256];
  __shared__ float s_cnt[kPoolWarps];
  __shared__ float s_red[kPoolWarps];

  float sx[kMaxDPerLane], su[kMaxDPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDPerLane; ++i) sx[i] = su[i] = 0.f;
  float cnt = 0.f;
  const int64_t base = b * p.x_bs + h * p.x_hs;
  const int tok0 = blk * p.block;
  for (int r = warp; r < p.block; r += kPoolWarps) {
    const int tok = tok0 + r;
    if (tok >= p.N) break;
    if (p.valid && !p.valid[b * p.valid_bs + tok]) continue;
    float xv[kMaxDPerLane];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxDPerLane; ++i) {
      const int d = lane + 32 * i;
      xv[i] = d < p.D ? load_as_float(p.x, base + (int64_t)tok * p.x_rs + d, p.dtype) : 0.f;
      ss += xv[i] * xv[i];
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float inv = 1.f / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
    for (int i = 0; i < kMaxDPerLane; ++i) {
      sx[i] += xv[i];
      su[i] += xv[i] * inv;
    }
    cnt += 1.f;
  }
#pragma unroll
  for (int i = 0; i < kMaxDPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.D) {
      s_x[warp][d] = sx[i];
      s_u[warp][d] = su[i];
    }
  }
  if (lane == 0) s_cnt[warp] = cnt;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kPoolWarps; ++w) total += s_cnt[w];
  float usq = 0.f;
  const int64_t out_row = ((int64_t)b * p.H + h) * p.nb + blk;
  for (int d = threadIdx.x; d < p.D; d += kPoolWarps * 32) {
    float x = 0.f, u = 0.f;
#pragma unroll
    for (int w = 0; w < kPoolWarps; ++w) {
      x += s_x[w][d];
      u += s_u[w][d];
    }
    p.pooled[out_row * p.D + d] = x / fmaxf(total, 1.f);
    usq += u * u;
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) usq += __shfl_xor_sync(0xffffffffu, usq, off);
  if (lane == 0) s_red[warp] = usq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kPoolWarps; ++w) acc += s_red[w];
    p.sim[out_row] = acc / fmaxf(total * total, 1.f);
    if (h == 0) p.count[(int64_t)b * p.nb + blk] = total;
  }
}

// One warp per mask row.
__global__ void mask_to_lut_kernel(const uint8_t* mask, int64_t rows, int mk, int32_t* counts, int32_t* indices) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint8_t* m = mask + row * mk;
  int32_t* out = indices + row * mk;
  int n = 0;
  for (int c0 = 0; c0 < mk; c0 += 32) {
    const int c = c0 + lane;
    const bool keep = c < mk && m[c] != 0;
    const unsigned bal = __ballot_sync(0xffffffffu, keep);
    if (keep) out[n + __popc(bal & ((1u << lane) - 1u))] = c;
    n += __popc(bal);
  }
  for (int c = n + lane; c < mk; c += 32) out[c] = 0;
  if (lane == 0) counts[row] = n;
}

}  // namespace

cudaError_t launch_pool_blocks(const PoolParams& p, cudaStream_t stream) {
  if (p.D > 32 * kMaxDPerLane) return cudaErrorInvalidValue;
  dim3 grid(p.nb, p.H, p.B);
  pool_blocks_kernel<<<grid, kPoolWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_mask_to_lut(const uint8_t* mask, int64_t rows, int mk, int32_t* counts, int32_t* indices,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  mask_to_lut_kernel<<<(unsigned)blocks, kWarps * 32, 0, stream>>>(mask, rows, mk, counts, indices);
  return cudaGetLastError();
}

}  // namespace hcs
