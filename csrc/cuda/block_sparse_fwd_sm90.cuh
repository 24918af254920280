// Block-sparse flash-attention forward for Hopper (sm_90a): warpgroup MMA (wgmma).
//
// One CTA per (query block of 128 rows, q head, batch) with two warpgroups of 64 rows.
// Q, K and V tiles live in shared memory in the 128-byte-swizzled layout wgmma reads
// through descriptors; K/V of the next kept block are prefetched with cp.async while the
// current one is computed (two stages). S = Q K^T is an SS wgmma (m64n64k16), the online
// softmax runs on its accumulators, and P stays in registers as the A operand of the
// O += P V wgmma (m64nDk16, V N-major). Two CTAs share an SM, so one's softmax overlaps
// the other's matrix work.
//
// Semantics as block_sparse_fwd.cuh (hf_creative_sparse/ops/reference.py); the pv skip
// is decided per warpgroup (64 rows): a block's P V is skipped when every row of the
// warpgroup that has a usable key in it would skip it.
#pragma once

#include <cmath>

#include "block_sparse_fwd.h"
#include "common.cuh"
#include "wgmma_ops.cuh"

namespace hcs {
namespace sm90 {

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HCS_SM90_ENABLED 1
#endif

// Byte offset of 16-byte chunk c (0..7) of row r in a [rows][64 x 16-bit] tile with the
// 128-byte swizzle (chunk index XOR row mod 8); tiles start 1024-byte aligned.
__device__ __forceinline__ uint32_t swz(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = (uint64_t)((saddr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

// Ties accumulator registers to this point of the instruction stream, so the compiler
// neither reads them before wgmma_wait nor writes them after wgmma_fence.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int D>
struct Sm90Traits {
  static constexpr int kHalves = D / 64;                    // 64-element column halves
  static constexpr int kQBytes = kBlockM * D * 2;           // 128 rows
  static constexpr int kKVBytes = kBlockN * D * 2;          // 64 rows
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes + 1024;  // + alignment slack
};

// rows x D tile from global (row stride in elements) into swizzled halves at smem byte
// address `s` (half h at s + h * rows * 128). Rows >= nvalid are zero-filled.
template <int D>
__device__ __forceinline__ void load_tile_sw(uint32_t s, const void* g, int64_t row_stride, int row0, int rows,
                                             int nvalid, int tid) {
  constexpr int kChunks = D / 8;
  const char* gb = static_cast<const char*>(g);
  for (int c = tid; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const int half = cc >> 3, ch = cc & 7;
    const bool ok = row0 + r < nvalid;
    const char* src = ok ? gb + ((int64_t)(row0 + r) * row_stride + cc * 8) * 2 : gb;
    const uint32_t dst = s + half * rows * 128 + swz(r, ch);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
  }
}

template <typename T, int D>
struct Wgmma;

template <int D>
struct Wgmma<__nv_bfloat16, D> {
  static __device__ __forceinline__ void qk(float (&s)[32], uint64_t da, uint64_t db, int acc) {
    wgmma_ss_m64n64k16_bf16(s, da, db, acc);
  }
  static __device__ __forceinline__ void pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t db) {
    if constexpr (D == 64) wgmma_rs_m64n64k16_bf16_tnspb(o, a, db, 1);
    else wgmma_rs_m64n128k16_bf16_tnspb(o, a, db, 1);
  }
};

template <int D>
struct Wgmma<__half, D> {
  static __device__ __forceinline__ void qk(float (&s)[32], uint64_t da, uint64_t db, int acc) {
    wgmma_ss_m64n64k16_f16(s, da, db, acc);
  }
  static __device__ __forceinline__ void pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t db) {
    if constexpr (D == 64) wgmma_rs_m64n64k16_f16_tnspb(o, a, db, 1);
    else wgmma_rs_m64n128k16_f16_tnspb(o, a, db, 1);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) block_sparse_fwd_sm90_kernel(const FwdParams p) {
#ifdef HCS_SM90_ENABLED
  using Tr = Sm90Traits<D>;
  using Mma = MmaOp<T>;
  using W = Wgmma<T, D>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ unsigned long long s_counts[2];
  __shared__ int s_vote[2][8];  // per-warp skip votes, double-buffered by iteration parity

  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base;
  const uint32_t sK0 = sQ + Tr::kQBytes;                 // stage s at sK0 + s * kKVBytes
  const uint32_t sV0 = sK0 + 2 * Tr::kKVBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2, wwarp = warp & 3;  // warpgroup, warp within it
  const int qb = p.causal ? (p.Mq - 1 - (int)blockIdx.x) : (int)blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int64_t row_id = ((int64_t)b * p.Hq + h) * p.Mq + qb;
  const int count = p.kv_counts[row_id];
  const int32_t* idx = p.kv_indices + row_id * p.lut_stride;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs;
  const uint8_t* kpm = p.kpm ? p.kpm + b * p.kpm_bs : nullptr;

  if (tid < 2) s_counts[tid] = 0;
  load_tile_sw<D>(sQ, qg + (int64_t)qb * kBlockM * p.q_rs, p.q_rs, 0, kBlockM, p.Nq - qb * kBlockM, tid);
  if (count > 0) {
    const int j0 = idx[0];
    load_tile_sw<D>(sK0, kg, p.k_rs, j0 * kBlockN, kBlockN, p.Nk, tid);
    load_tile_sw<D>(sV0, vg, p.v_rs, j0 * kBlockN, kBlockN, p.Nk, tid);
  }
  cp_async_commit();

  const int g = lane >> 2, t4 = lane & 3;
  const int wg_row0 = qb * kBlockM + wg * 64;
  const int warp_row0 = wg_row0 + wwarp * 16;
  const int row0 = warp_row0 + g, row1 = row0 + 8;
  const bool rv0 = row0 < p.Nq, rv1 = row1 < p.Nq;
  const bool wg_live = wg_row0 < p.Nq;
  const float neg_thr2 = -p.pvthreshd[h] * 1.4426950408889634f;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  unsigned my_visited = 0, my_skipped = 0;

  for (int it = 0; it < count; ++it) {
    const int j = idx[it];
    cp_async_wait_all();
    fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
    __syncthreads();
    if (it + 1 < count) {
      const int jn = idx[it + 1];
      const uint32_t st = (uint32_t)((it + 1) & 1) * Tr::kKVBytes;
      load_tile_sw<D>(sK0 + st, kg, p.k_rs, jn * kBlockN, kBlockN, p.Nk, tid);
      load_tile_sw<D>(sV0 + st, vg, p.v_rs, jn * kBlockN, kBlockN, p.Nk, tid);
    }
    cp_async_commit();

    const int kb0 = j * kBlockN;
    // Warpgroup-uniform: no usable key for any of its 64 rows.
    if (!wg_live || (p.causal && kb0 > wg_row0 + 63)) continue;
    const uint32_t sK = sK0 + (uint32_t)(it & 1) * Tr::kKVBytes;
    const uint32_t sV = sV0 + (uint32_t)(it & 1) * Tr::kKVBytes;

    // S = Q K^T (64 x 64 per warpgroup).
    float s[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.f;
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t half = (uint32_t)(kk >> 2), koff = (uint32_t)(kk & 3) * 32;
      const uint64_t da = make_desc(sQ + half * kBlockM * 128 + wg * 64 * 128 + koff, 16, 1024);
      const uint64_t db = make_desc(sK + half * kBlockN * 128 + koff, 16, 1024);
      W::qk(s, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);

    const bool need_mask = (kb0 + kBlockN > p.Nk) || (p.causal && kb0 + kBlockN - 1 > warp_row0) || kpm != nullptr;
    float bm0 = -INFINITY, bm1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt * 4 + e] * p.scale_log2;
        if (need_mask) {
          const int col = kb0 + nt * 8 + t4 * 2 + (e & 1);
          const int row = (e < 2) ? row0 : row1;
          const bool ok = col < p.Nk && (!p.causal || col <= row) && (kpm == nullptr || __ldg(kpm + col) != 0);
          x = ok ? x : -INFINITY;
        }
        s[nt * 4 + e] = x;
      }
      bm0 = fmaxf(bm0, fmaxf(s[nt * 4 + 0], s[nt * 4 + 1]));
      bm1 = fmaxf(bm1, fmaxf(s[nt * 4 + 2], s[nt * 4 + 3]));
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
    // Warpgroup vote: skip P V when all of its rows with keys would skip it.
    const int warp_skip = __all_sync(0xffffffffu, (!has0 || skip0) && (!has1 || skip1));
    if (lane == 0) s_vote[it & 1][warp] = warp_skip;
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    const int* vote = &s_vote[it & 1][wg * 4];
    if (vote[0] && vote[1] && vote[2] && vote[3]) {
      if (t4 == 0) my_skipped += (unsigned)has0 + (unsigned)has1;
      continue;
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
      s[nt * 4 + 0] = exp2f(s[nt * 4 + 0] - ms0);
      s[nt * 4 + 1] = exp2f(s[nt * 4 + 1] - ms0);
      s[nt * 4 + 2] = exp2f(s[nt * 4 + 2] - ms1);
      s[nt * 4 + 3] = exp2f(s[nt * 4 + 3] - ms1);
      rs0 += s[nt * 4 + 0] + s[nt * 4 + 1];
      rs1 += s[nt * 4 + 2] + s[nt * 4 + 3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i * 4 + 0] *= al0;
      o[i * 4 + 1] *= al0;
      o[i * 4 + 2] *= al1;
      o[i * 4 + 3] *= al1;
    }

    // O += P V, P from registers.
    uint32_t pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = Mma::pack(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
      pa[kk][1] = Mma::pack(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
      pa[kk][2] = Mma::pack(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
      pa[kk][3] = Mma::pack(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
    }
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t db = make_desc(sV + (uint32_t)kk * 16 * 128, (uint32_t)kBlockN * 128, 1024);
      W::pv(o, pa[kk], db);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
  }
  cp_async_wait_all();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  T* og = static_cast<T*>(p.o) + b * p.o_bs + h * p.o_hs;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + t4 * 2;
    if (rv0) *reinterpret_cast<uint32_t*>(og + (int64_t)row0 * p.o_rs + col) = Mma::pack(o[i * 4] * inv0, o[i * 4 + 1] * inv0);
    if (rv1) *reinterpret_cast<uint32_t*>(og + (int64_t)row1 * p.o_rs + col) = Mma::pack(o[i * 4 + 2] * inv1, o[i * 4 + 3] * inv1);
  }

  unsigned sk = my_skipped, vi = my_visited;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    sk += __shfl_xor_sync(0xffffffffu, sk, off);
    vi += __shfl_xor_sync(0xffffffffu, vi, off);
  }
  __syncthreads();
  if (lane == 0) {
    if (sk) atomicAdd(&s_counts[0], (unsigned long long)sk);
    if (vi) atomicAdd(&s_counts[1], (unsigned long long)vi);
  }
  __syncthreads();
  if (tid == 0) {
    if (s_counts[0]) atomicAdd(&p.pv_counts[0], s_counts[0]);
    if (s_counts[1]) atomicAdd(&p.pv_counts[1], s_counts[1]);
  }
#endif
}

// cudaErrorNotSupported when this build holds no sm_90a code for the device (e.g. built
// without the 90a target, or not a compute-capability 9.0 GPU): the caller falls back.
template <typename T, int D>
cudaError_t launch_block_sparse_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  const size_t smem = (size_t)Sm90Traits<D>::kSmemBytes;
  auto kernel = block_sparse_fwd_sm90_kernel<T, D>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (attr.binaryVersion != 90) return cudaErrorNotSupported;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(p.Mq, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace hcs
