// Mask-prediction helpers on the GPU:
//  * pool_blocks: one pass over Q or K computing, per block of tokens, the mean vector, the
//    mean pairwise cosine similarity (|sum of unit vectors|^2 / count^2) and the token
//    count. This is the bulk of the prediction's memory traffic (it reads Q and K once).
//  * mask_to_lut: bool block mask -> kv_counts and ascending kv_indices (tail zero), by
//    warp ballots instead of a sort.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

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

// Per-warp partial sums of one block of tokens, combined by the epilogue below.
struct PoolShared {
  float x[kPoolWarps][256];  // sum of the tokens, per warp and dim (head dims up to 256)
  float u[kPoolWarps][256];  // sum of the unit-normalized tokens
  float cnt[kPoolWarps];     // tokens counted
  float red[kPoolWarps];
};

// Both pooling kernels end alike: once each warp has stored its sums in `sh` (and passes
// its token count `cnt`), write the block's mean, mean cosine similarity and count.
__device__ __forceinline__ void pool_block_epilogue(const PoolParams& p, PoolShared& sh, float cnt) {
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sh.cnt[warp] = cnt;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kPoolWarps; ++w) total += sh.cnt[w];
  float usq = 0.f;
  const int64_t out_row = ((int64_t)b * p.H + h) * p.nb + blk;
  for (int d = threadIdx.x; d < p.D; d += kPoolWarps * 32) {
    float x = 0.f, u = 0.f;
#pragma unroll
    for (int w = 0; w < kPoolWarps; ++w) {
      x += sh.x[w][d];
      u += sh.u[w][d];
    }
    p.pooled[out_row * p.D + d] = x / fmaxf(total, 1.f);
    usq += u * u;
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) usq += __shfl_xor_sync(0xffffffffu, usq, off);
  if (lane == 0) sh.red[warp] = usq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kPoolWarps; ++w) acc += sh.red[w];
    p.sim[out_row] = acc / fmaxf(total * total, 1.f);
    if (h == 0) p.count[(int64_t)b * p.nb + blk] = total;
  }
}

__global__ void __launch_bounds__(kPoolWarps * 32) pool_blocks_kernel(const PoolParams p) {
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ PoolShared sh;

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
      sh.x[warp][d] = sx[i];
      sh.u[warp][d] = su[i];
    }
  }
  pool_block_epilogue(p, sh, cnt);
}

// ---------------------------------------------------------------------------------------
// Block selection: one CTA per (b, h, query block) row of the compressed map.
constexpr int kSelThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kSelThreads / 32; ++w) t += red[w];
  return t;
}

__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = -INFINITY;
#pragma unroll
  for (int w = 0; w < kSelThreads / 32; ++w) t = fmaxf(t, red[w]);
  return t;
}

// a precedes b in the selection order: larger probability first, then smaller index.
__device__ __forceinline__ bool precedes(float pa, int ia, float pb, int ib) {
  return pa > pb || (pa == pb && ia < ib);
}

// One (b, h, query block) row of the compressed map and the rules of
// masks.predict_from_inputs that do not depend on the selection: which key blocks are
// allowed (attendable) and k-similar (candidates), and which are kept regardless.
struct SelectRow {
  int i, h, b, hk, last_row, row_lo, col_prefix, col_suffix;
  float simthr;
  bool row_dense;
  const float* score;

  __device__ SelectRow(const SelectParams& p, int64_t row) {
    i = (int)(row % p.Mq);
    h = (int)((row / p.Mq) % p.H);
    b = (int)(row / ((int64_t)p.Mq * p.H));
    hk = h / (p.H / p.Hkv);
    score = p.score + row * p.Mk;
    simthr = p.simthr[h];
    last_row = min(i * 128 + 127, p.Nq - 1);
    row_lo = i * 128;
    row_dense = !(p.sim_q[row] > simthr);
    if (p.prefix > 0 && i < (min(p.prefix, p.Nq) + 127) / 128) row_dense = true;
    if (p.suffix > 0 && i >= max(p.Nq - p.suffix, 0) / 128) row_dense = true;
    col_prefix = p.prefix > 0 ? (min(p.prefix, p.Nk) + 63) / 64 : 0;
    col_suffix = p.suffix > 0 ? max(p.Nk - p.suffix, 0) / 64 : p.Mk;
  }
  __device__ bool allowed(const SelectParams& p, int j) const {
    return p.count_k[(int64_t)b * p.Mk + j] > 0.f && (!p.causal || j * 64 <= last_row);
  }
  __device__ bool k_similar(const SelectParams& p, int j) const {
    return p.sim_k[((int64_t)b * p.Hkv + hk) * p.Mk + j] > simthr;
  }
  // The mask bit of key block j given whether the selection chose it.
  __device__ uint8_t keep(const SelectParams& p, int j, bool chosen, bool ksim, bool allow) const {
    bool k = row_dense || chosen || !ksim || (p.sink && j == 0) || j < col_prefix || j >= col_suffix;
    if (p.causal) k = k || (j * 64 <= last_row && min(j * 64 + 63, p.Nk - 1) >= row_lo);
    return (k && allow) ? 1 : 0;
  }
};

__global__ void __launch_bounds__(kSelThreads) select_blocks_kernel(const SelectParams p) {
  extern __shared__ unsigned char sel_smem[];
  float* prob = reinterpret_cast<float*>(sel_smem);       // [mkp]
  int* ids = reinterpret_cast<int*>(prob + p.mkp);        // [mkp]
  uint8_t* flags = reinterpret_cast<uint8_t*>(ids + p.mkp);  // [mkp]: 1 allowed, 2 k-similar, 4 chosen
  __shared__ float red[kSelThreads / 32];
  __shared__ int s_nsel;

  const SelectRow rw(p, blockIdx.x);
  const int h = rw.h;
  float mx = -INFINITY, n_allowed = 0.f, n_cand = 0.f;
  for (int j = threadIdx.x; j < p.mkp; j += kSelThreads) {
    float v = -INFINITY;
    uint8_t f = 0;
    if (j < p.Mk) {
      const bool allowed = rw.allowed(p, j);
      const bool ksim = rw.k_similar(p, j);
      f = (allowed ? 1 : 0) | (ksim ? 2 : 0);
      if (allowed && ksim) v = rw.score[j] * p.scale;
      n_allowed += allowed ? 1.f : 0.f;
      n_cand += (allowed && ksim) ? 1.f : 0.f;
    }
    prob[j] = v;
    ids[j] = j;
    flags[j] = f;
    mx = fmaxf(mx, v);
  }
  mx = block_max(mx, red);
  n_allowed = block_sum(n_allowed, red);
  n_cand = block_sum(n_cand, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < p.mkp; j += kSelThreads) {
    const float e = (mx == -INFINITY || prob[j] == -INFINITY) ? 0.f : __expf(prob[j] - mx);
    prob[j] = e;
    sum += e;
  }
  sum = block_sum(sum, red);  // (its barriers also order the writes above)
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int j = threadIdx.x; j < p.mkp; j += kSelThreads) prob[j] *= inv;
  __syncthreads();

  // Bitonic sort of (prob, id) pairs into selection order.
  for (int k = 2; k <= p.mkp; k <<= 1) {
    for (int jj = k >> 1; jj > 0; jj >>= 1) {
      for (int t = threadIdx.x; t < p.mkp; t += kSelThreads) {
        const int u = t ^ jj;
        if (u > t) {
          const bool first_half = (t & k) == 0;
          const bool swap = first_half ? precedes(prob[u], ids[u], prob[t], ids[t])
                                       : precedes(prob[t], ids[t], prob[u], ids[u]);
          if (swap) {
            const float tp = prob[t];
            prob[t] = prob[u];
            prob[u] = tp;
            const int ti = ids[t];
            ids[t] = ids[u];
            ids[u] = ti;
          }
        }
      }
      __syncthreads();
    }
  }

  // How many to select.
  int nsel;
  if (p.topk) {
    nsel = (int)fmaxf(ceilf(p.topk[h] * n_allowed - 1e-6f), 1.f);
    nsel = min(nsel, (int)n_cand);
  } else {
    const float thr = p.cdf[h];
    if (thr >= 1.f) {
      nsel = (int)n_cand;
    } else {
      // Inclusive scan of the sorted probabilities; count positions with cdf < thr.
      const int per = (p.mkp + kSelThreads - 1) / kSelThreads;
      const int lo = threadIdx.x * per, hi = min(lo + per, p.mkp);
      float seg = 0.f;
      for (int j = lo; j < hi; ++j) seg += prob[j];
      // exclusive prefix of segment sums across the block
      float incl = seg;
      const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      __syncthreads();
      if (lane == 31) red[w] = incl;
      __syncthreads();
      float before = 0.f;
      for (int q = 0; q < w; ++q) before += red[q];
      float run = before + incl - seg;
      float cnt = 0.f;
      for (int j = lo; j < hi; ++j) {
        run += prob[j];
        cnt += run < thr ? 1.f : 0.f;
      }
      cnt = block_sum(cnt, red);
      nsel = min((int)cnt + 1, (int)n_cand);
    }
  }
  if (threadIdx.x == 0) s_nsel = nsel;
  __syncthreads();
  nsel = s_nsel;
  for (int t = threadIdx.x; t < nsel; t += kSelThreads) flags[ids[t]] |= 4;
  __syncthreads();

  uint8_t* out = p.mask + (int64_t)blockIdx.x * p.Mk;
  for (int j = threadIdx.x; j < p.Mk; j += kSelThreads) {
    const uint8_t f = flags[j];
    out[j] = rw.keep(p, j, (f & 4) != 0, (f & 2) != 0, (f & 1) != 0);
  }
}

// ---------------------------------------------------------------------------------------
// Vectorised pooling: a team of L lanes reads one token with 16-byte loads (VPL values per
// lane), and each lane loads U tokens before reducing, so many loads are in flight (the
// scalar kernel above waits on one token at a time and is latency-bound).
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kVals = 4;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&v)[4]) {
    v[0] = __uint_as_float(r.x), v[1] = __uint_as_float(r.y), v[2] = __uint_as_float(r.z), v[3] = __uint_as_float(r.w);
  }
};
template <>
struct Vec16<__half> {
  static constexpr int kVals = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&v)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kVals = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&v)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  }
};

template <typename T, int L>
__global__ void __launch_bounds__(kPoolWarps * 32) pool_blocks_vec_kernel(const PoolParams p) {
  constexpr int VPL = Vec16<T>::kVals;
  constexpr int TPW = 32 / L;  // tokens per warp per step
  constexpr int U = 4;         // steps loaded before reducing
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int team = lane / L, tl = lane % L;
  __shared__ PoolShared sh;

  const T* base = static_cast<const T*>(p.x) + b * p.x_bs + h * p.x_hs + tl * VPL;
  const int tok0 = blk * p.block;
  float sx[VPL], su[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) sx[i] = su[i] = 0.f;
  float cnt = 0.f;
  for (int r0 = 0; r0 < p.block; r0 += kPoolWarps * TPW * U) {
    uint4 raw[U];
    float w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = r0 + (u * kPoolWarps + warp) * TPW + team;
      const int tok = tok0 + r;
      const bool ok = r < p.block && tok < p.N && (p.valid == nullptr || p.valid[b * p.valid_bs + tok] != 0);
      raw[u] = ok ? __ldg(reinterpret_cast<const uint4*>(base + (int64_t)tok * p.x_rs)) : make_uint4(0, 0, 0, 0);
      w[u] = ok ? 1.f : 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float v[VPL];
      Vec16<T>::unpack(raw[u], v);
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < VPL; ++i) ss += v[i] * v[i];
#pragma unroll
      for (int off = L / 2; off >= 1; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      const float inv = w[u] / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        sx[i] += v[i];  // zero for masked tokens
        su[i] += v[i] * inv;
      }
      cnt += (tl == 0) ? w[u] : 0.f;
    }
  }
  // Sum over the teams of the warp (lanes with the same tl hold the same dims).
#pragma unroll
  for (int off = L; off < 32; off <<= 1) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      sx[i] += __shfl_xor_sync(0xffffffffu, sx[i], off);
      su[i] += __shfl_xor_sync(0xffffffffu, su[i], off);
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
  if (team == 0) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      sh.x[warp][tl * VPL + i] = sx[i];
      sh.u[warp][tl * VPL + i] = su[i];
    }
  }
  pool_block_epilogue(p, sh, cnt);
}

template <typename T>
bool launch_pool_vec(const PoolParams& p, cudaStream_t stream) {
  constexpr int VPL = Vec16<T>::kVals;
  if (p.D % VPL != 0 || p.x_rs % VPL != 0 || p.x_hs % VPL != 0 || p.x_bs % VPL != 0 ||
      reinterpret_cast<uintptr_t>(p.x) % 16 != 0)
    return false;
  const int lanes = p.D / VPL;
  dim3 grid(p.nb, p.H, p.B);
  switch (lanes) {
    case 1: pool_blocks_vec_kernel<T, 1><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    case 2: pool_blocks_vec_kernel<T, 2><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    case 4: pool_blocks_vec_kernel<T, 4><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    case 8: pool_blocks_vec_kernel<T, 8><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    case 16: pool_blocks_vec_kernel<T, 16><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    case 32: pool_blocks_vec_kernel<T, 32><<<grid, kPoolWarps * 32, 0, stream>>>(p); return true;
    default: return false;
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


// ---------------------------------------------------------------------------------------
// Sort-free block selection for rows of up to kWarpSelMaxMk key blocks: one warp per row,
// the row in registers (kWarpSelPer values a lane), no shared memory and no block barrier.
// The selection is the sorted one's (probability descending, then index ascending; the
// first nsel): the value v* of the last selected block is found by bisection on the bits
// of the (non-negative) probabilities, every block above v* is selected, and blocks equal
// to v* are taken in index order until the count (top-k) or the mass (cdf) is reached.
// For the cdf the mass is summed in a different order than the sorted scan: a block's
// decision can differ only where the cumulative mass is within float rounding of cdfthreshd.
constexpr int kWarpSelPer = 32;
constexpr int kWarpSelMaxMk = 32 * kWarpSelPer;
constexpr int kWarpSelWarps = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(kWarpSelWarps * 32) select_blocks_warp_kernel(const SelectParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpSelWarps + (threadIdx.x >> 5);
  const int64_t rows = (int64_t)p.B * p.H * p.Mq;
  if (row >= rows) return;  // warp-uniform
  const SelectRow rw(p, row);
  const int h = rw.h;

  float v[kWarpSelPer];
  unsigned allowed_bits = 0, ksim_bits = 0;  // bit r: block lane + 32 r
  float mx = -INFINITY;
  int n_allowed = 0, n_cand = 0;
#pragma unroll
  for (int r = 0; r < kWarpSelPer; ++r) {
    const int j = lane + 32 * r;
    v[r] = -INFINITY;
    if (j < p.Mk) {
      const bool allowed = rw.allowed(p, j);
      const bool ksim = rw.k_similar(p, j);
      allowed_bits |= (unsigned)allowed << r;
      ksim_bits |= (unsigned)ksim << r;
      if (allowed && ksim) v[r] = rw.score[j] * p.scale;
      n_allowed += allowed;
      n_cand += allowed && ksim;
      mx = fmaxf(mx, v[r]);
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  n_allowed = warp_sum_int(n_allowed);
  n_cand = warp_sum_int(n_cand);
  float sum = 0.f;
#pragma unroll
  for (int r = 0; r < kWarpSelPer; ++r) {
    v[r] = (mx == -INFINITY || v[r] == -INFINITY) ? 0.f : __expf(v[r] - mx);
    sum += v[r];
  }
  sum = warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int r = 0; r < kWarpSelPer; ++r) v[r] *= inv;  // blocks past Mk hold 0 and sort last

  // nsel and the predicate "the top nsel reach past value c" for the bisection.
  const bool by_count = p.topk != nullptr;
  const float thr = by_count ? 0.f : p.cdf[h];
  int nsel = n_cand;
  if (by_count) nsel = min(max((int)ceilf(p.topk[h] * (float)n_allowed - 1e-6f), 1), n_cand);
  const bool all = !by_count && thr >= 1.f;
  unsigned sel_bits = 0;
  if (nsel > 0 && !all) {
    // v* = the largest value c with count(p >= c) >= nsel (top-k) or mass(p >= c) >= thr (cdf).
    unsigned t = 0;
    for (int bit = 30; bit >= 0; --bit) {
      const float c = __uint_as_float(t | (1u << bit));
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < kWarpSelPer; ++r) acc += v[r] >= c ? (by_count ? 1.f : v[r]) : 0.f;
      acc = warp_sum(acc);
      if (by_count ? acc >= (float)nsel : acc >= thr) t |= 1u << bit;
    }
    const float vstar = __uint_as_float(t);
    float above_mass = 0.f;
    int above = 0;
#pragma unroll
    for (int r = 0; r < kWarpSelPer; ++r) {
      above += v[r] > vstar;
      above_mass += v[r] > vstar ? v[r] : 0.f;
    }
    above = warp_sum_int(above);
    above_mass = warp_sum(above_mass);
    int take;  // blocks equal to v*, in index order
    if (by_count) {
      take = nsel - above;
    } else {
      take = vstar > 0.f ? max((int)ceilf((thr - above_mass) / vstar), 1) : kWarpSelMaxMk;
      take = min(take, nsel - above);  // nsel = n_cand caps the cdf selection as the scan does
    }
    int seen = 0;  // ties before this r-row, in index order (j = lane + 32 r)
#pragma unroll
    for (int r = 0; r < kWarpSelPer; ++r) {
      const bool tie = v[r] == vstar && lane + 32 * r < p.Mk;
      const unsigned ballot = __ballot_sync(0xffffffffu, tie);
      const int rank = seen + __popc(ballot & ((1u << lane) - 1u));
      if (v[r] > vstar || (tie && rank < take)) sel_bits |= 1u << r;
      seen += __popc(ballot);
    }
  } else if (all) {
    sel_bits = allowed_bits & ksim_bits;
  }

  uint8_t* out = p.mask + row * p.Mk;
#pragma unroll
  for (int r = 0; r < kWarpSelPer; ++r) {
    const int j = lane + 32 * r;
    if (j < p.Mk) out[j] = rw.keep(p, j, (sel_bits >> r) & 1u, (ksim_bits >> r) & 1u, (allowed_bits >> r) & 1u);
  }
}

}  // namespace

cudaError_t launch_pool_blocks(const PoolParams& p, cudaStream_t stream) {
  if (p.D > 32 * kMaxDPerLane) return cudaErrorInvalidValue;
  bool launched = false;  // the vectorised kernel where rows allow 16-byte loads
  if (p.dtype == 0) launched = launch_pool_vec<float>(p, stream);
  else if (p.dtype == 1) launched = launch_pool_vec<__half>(p, stream);
  else launched = launch_pool_vec<__nv_bfloat16>(p, stream);
  if (!launched) {
    dim3 grid(p.nb, p.H, p.B);
    pool_blocks_kernel<<<grid, kPoolWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_select_blocks(const SelectParams& p, cudaStream_t stream) {
  const int64_t rows = (int64_t)p.B * p.H * p.Mq;
  if (rows == 0) return cudaSuccess;
  if (p.Mk <= kWarpSelMaxMk) {
    const int64_t blocks = (rows + kWarpSelWarps - 1) / kWarpSelWarps;
    select_blocks_warp_kernel<<<(unsigned)blocks, kWarpSelWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const size_t smem = (size_t)p.mkp * (sizeof(float) + sizeof(int) + 1);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  select_blocks_kernel<<<(unsigned)rows, kSelThreads, smem, stream>>>(p);
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
