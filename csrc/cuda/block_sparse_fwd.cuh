// Block-sparse flash-attention forward, sm_80-style (mma.sync m16n8k16, ldmatrix,
// cp.async double buffering). Runs on Ampere and Hopper.
//
// One CTA per (query block of 128 rows, q head, batch); 8 warps of 16 rows each. The CTA
// walks only the kept key blocks of its query block (kv_indices[..., :kv_counts]), in
// ascending order, with an online softmax in float32. Semantics: hf_creative_sparse/ops/
// reference.py. The pv-threshold skip is decided per warp (16 rows): a block's P@V is
// skipped when every row of the warp that has a usable key in it would skip it; counts
// are per (row, block) pair over the rows of such warps. The epilogue also writes each
// row's log-sum-exp over the keys it used (FwdParams::lse).
#pragma once

#include <cmath>

#include "block_sparse_fwd.h"
#include "common.cuh"

namespace hcs {

template <int D>
struct FwdTraits {
  static constexpr int kLd = D + 8;  // smem row stride (elements): 16-byte pad, conflict-free ldmatrix
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kLd;  // Q + 2 stages of K and V
  static constexpr int kMinBlocks = D <= 128 ? 2 : 1;
};

template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t row_stride, int row0, int rows,
                                                int nvalid, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = FwdTraits<D>::kLd;
  for (int c = tid; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = row0 + r < nvalid;
    const T* src = ok ? g + (int64_t)(row0 + r) * row_stride + cc * 8 : g;
    cp_async16(s + r * kLd + cc * 8, src, ok ? 16 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, FwdTraits<D>::kMinBlocks) block_sparse_fwd_kernel(const FwdParams p) {
  using Mma = MmaOp<T>;
  constexpr int kLd = FwdTraits<D>::kLd;
  constexpr int kDTiles = D / 8;   // n-tiles of the output
  constexpr int kKSteps = D / 16;  // k-steps of Q K^T
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ unsigned long long s_counts[2];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + 2 * kBlockN * kLd;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const LutRow lut(p);
  const int qb = lut.qb, h = lut.h, b = lut.b, hk = lut.hk, count = lut.count;
  const int32_t* idx = lut.idx;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs;
  const uint8_t* kpm = p.kpm ? p.kpm + b * p.kpm_bs : nullptr;

  if (tid < 2) s_counts[tid] = 0;
  load_tile_async<T, D>(sQ, qg, p.q_rs, qb * kBlockM, kBlockM, p.Nq, tid);
  if (count > 0) {
    const int j0 = idx[0];
    load_tile_async<T, D>(sK, kg, p.k_rs, j0 * kBlockN, kBlockN, p.Nk, tid);
    load_tile_async<T, D>(sV, vg, p.v_rs, j0 * kBlockN, kBlockN, p.Nk, tid);
  }
  cp_async_commit();

  const int g = lane >> 2, t4 = lane & 3;
  const int warp_row0 = qb * kBlockM + warp * 16;
  const int row0 = warp_row0 + g, row1 = row0 + 8;
  const bool rv0 = row0 < p.Nq, rv1 = row1 < p.Nq;
  const bool warp_live = warp_row0 < p.Nq;
  const float thr = p.pvthreshd[h];
  const float neg_thr2 = -thr * 1.4426950408889634f;  // in log2 units; -inf when the skip is off

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  unsigned my_visited = 0, my_skipped = 0;

  // ldmatrix row addresses (per lane) relative to a tile.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q (A) and V^T
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;  // K (B)
  const T* sQw = sQ + (warp * 16 + a_row) * kLd + a_col;

  for (int it = 0; it < count; ++it) {
    const int j = idx[it];
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < count) {  // prefetch the next kept block into the other stage
      const int jn = idx[it + 1];
      const int st = (it + 1) & 1;
      load_tile_async<T, D>(sK + st * kBlockN * kLd, kg, p.k_rs, jn * kBlockN, kBlockN, p.Nk, tid);
      load_tile_async<T, D>(sV + st * kBlockN * kLd, vg, p.v_rs, jn * kBlockN, kBlockN, p.Nk, tid);
    }
    cp_async_commit();

    const int kb0 = j * kBlockN;
    if (!warp_live || (p.causal && kb0 > warp_row0 + 15)) continue;  // no usable key for this warp
    const T* sKs = sK + (it & 1) * kBlockN * kLd;
    const T* sVs = sV + (it & 1) * kBlockN * kLd;

    // S = Q K^T for the warp's 16 rows x 64 keys.
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sQw + kk * 16);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sKs + (np * 16 + b_row) * kLd + kk * 16 + b_col);
        Mma::run(s[2 * np], a, bk[0], bk[1]);
        Mma::run(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Scale to log2 units, mask, and take each row's block max.
    const bool need_mask = (kb0 + kBlockN > p.Nk) || (p.causal && kb0 + kBlockN - 1 > warp_row0) || kpm != nullptr;
    float bm0 = -INFINITY, bm1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int col = kb0 + nt * 8 + t4 * 2 + (e & 1);
          const int row = (e < 2) ? row0 : row1;
          const bool ok = col < p.Nk && (!p.causal || col <= row) && (kpm == nullptr || __ldg(kpm + col) != 0);
          x = ok ? x : -INFINITY;
        }
        s[nt][e] = x;
      }
      bm0 = fmaxf(bm0, fmaxf(s[nt][0], s[nt][1]));
      bm1 = fmaxf(bm1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, off));
      bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, off));
    }
    const bool has0 = rv0 && bm0 != -INFINITY, has1 = rv1 && bm1 != -INFINITY;
    const bool skip0 = has0 && m0 != -INFINITY && bm0 - m0 < neg_thr2;
    const bool skip1 = has1 && m1 != -INFINITY && bm1 - m1 < neg_thr2;
    if (t4 == 0) my_visited += (unsigned)has0 + (unsigned)has1;
    if (__all_sync(0xffffffffu, (!has0 || skip0) && (!has1 || skip1))) {
      if (t4 == 0) my_skipped += (unsigned)has0 + (unsigned)has1;
      continue;  // whole warp skips this block's P@V (or has no key in it)
    }

    // Online softmax update.
    const float mn0 = fmaxf(m0, bm0), mn1 = fmaxf(m1, bm1);
    const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
    const float al0 = exp2f(m0 - ms0), al1 = exp2f(m1 - ms1);
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - ms0);
      s[nt][1] = exp2f(s[nt][1] - ms0);
      s[nt][2] = exp2f(s[nt][2] - ms1);
      s[nt][3] = exp2f(s[nt][3] - ms1);
      rs0 += s[nt][0] + s[nt][1];
      rs1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) {
      o[i][0] *= al0;
      o[i][1] *= al0;
      o[i][2] *= al1;
      o[i][3] *= al1;
    }

    // O += P V: P's accumulator layout is the A-operand layout of the next mma.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      a[0] = Mma::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Mma::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const T* vrow = sVs + (kk * 16 + a_row) * kLd + a_col;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, vrow + dp * 16);
        Mma::run(o[2 * dp], a, bv[0], bv[1]);
        Mma::run(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // every copy into sQ has landed before warps reuse their rows below

  // Normalise; rows without any usable key get zeros.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  if (t4 == 0) {  // the quad's four lanes hold the same row state
    // The (b, h) offset derived from o's (FwdParams::lse): a separate (b * Hq + h) * Nq
    // costs D128 spill loads inside the main loop (ptxas, CUDA 13).
    float* lse = p.lse + (b * p.o_bs + h * p.o_hs) / D;
    if (rv0) lse[row0] = row_lse(m0, l0);
    if (rv1) lse[row1] = row_lse(m1, l1);
  }

  // Stage the warp's 16 output rows in its own rows of sQ, then write 16-byte chunks.
  __syncwarp();
  T* sO = sQ + warp * 16 * kLd;
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
    const int col = i * 8 + t4 * 2;
    *reinterpret_cast<uint32_t*>(sO + g * kLd + col) = Mma::pack(o[i][0] * inv0, o[i][1] * inv0);
    *reinterpret_cast<uint32_t*>(sO + (g + 8) * kLd + col) = Mma::pack(o[i][2] * inv1, o[i][3] * inv1);
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + b * p.o_bs + h * p.o_hs;
  constexpr int kChunks = D / 8;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, cc = c % kChunks;
    const int grow = warp_row0 + r;
    if (grow < p.Nq)
      *reinterpret_cast<uint4*>(og + (int64_t)grow * p.o_rs + cc * 8) =
          *reinterpret_cast<const uint4*>(sO + r * kLd + cc * 8);
  }

  // (row, block) counters: warp sums, then one atomic per CTA and counter.
  unsigned sk = my_skipped, vi = my_visited;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    sk += __shfl_xor_sync(0xffffffffu, sk, off);
    vi += __shfl_xor_sync(0xffffffffu, vi, off);
  }
  __syncthreads();  // s_counts initialised (before the loop) and visible
  if (lane == 0) {
    if (sk) atomicAdd(&s_counts[0], (unsigned long long)sk);
    if (vi) atomicAdd(&s_counts[1], (unsigned long long)vi);
  }
  __syncthreads();
  if (tid == 0) {
    if (s_counts[0]) atomicAdd(&p.pv_counts[0], s_counts[0]);
    if (s_counts[1]) atomicAdd(&p.pv_counts[1], s_counts[1]);
  }
}

template <typename T, int D>
cudaError_t launch_block_sparse_fwd(const FwdParams& p, cudaStream_t stream) {
  const size_t smem = (size_t)FwdTraits<D>::kSmemElems * sizeof(T);
  auto kernel = block_sparse_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(p.Mq, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hcs
