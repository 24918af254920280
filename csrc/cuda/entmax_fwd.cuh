// alpha-entmax attention forward, sm_80-style (mma.sync m16n8k16, ldmatrix, cp.async
// double buffering); runs on Ampere and Hopper. Algorithm: hf_creative_sparse/ops/entmax.py.
//
// One CTA per (query block of 128 rows, q head, batch); 8 warps of 16 rows. In order:
//   1. seeds: score the (at most 2) seed key blocks; tau(row) >= max X - 1 (X = (alpha-1) s);
//   2. candidates: key blocks whose bound (alpha - 1) U exceeds the smallest tau of the
//      CTA's rows (others hold only exact zeros); compacted in shared memory;
//   3. Newton passes over the candidates (Q K^T recomputed each pass). Each pass evaluates
//      f(t) = sum [X - t]_+^beta and f' at kPoints thresholds per row spread over a bracket
//      [lo, lo + w) (lo a lower bound of tau; the first bracket is [seed max - 1, seed max),
//      the interval tau lies in when the seed holds the row max), then steps Newton from the
//      largest threshold with f >= 1: that point and the Newton step from it (f is convex
//      and decreasing) are lower bounds, the next threshold an upper one. The bracket
//      shrinks kPoints-fold a pass on top of Newton's own convergence. A row is done when
//      f(lo) - 1 <= tol, or when it was <= kNear before its last step (Newton from there
//      lands within ~kNear^2). Blocks entirely under lo leave the list;
//   4. the final pass: p = [X - tau]_+^beta, O += P V, out = O / sum p (0 for keyless rows).
#pragma once

#include <cmath>

#include "common.cuh"
#include "entmax_fwd.h"

namespace hcs_entmax {

using hcs::cp_async16;
using hcs::cp_async_commit;
using hcs::cp_async_wait_all;
using hcs::ldmatrix_x4;
using hcs::ldmatrix_x4_trans;
using hcs::MmaOp;

template <int D>
struct Traits {
  static constexpr int kLd = D + 8;  // smem row stride (elements): 16-byte pad, conflict-free ldmatrix
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kLd;  // Q + 2 stages of K and V
  static constexpr int kMinBlocks = 2;
};

template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int row0, int rows, int nvalid,
                                          int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = Traits<D>::kLd;
  for (int c = tid; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = row0 + r < nvalid;
    const T* src = ok ? g + (int64_t)(row0 + r) * row_stride + cc * 8 : g;
    cp_async16(s + r * kLd + cc * 8, src, ok ? 16 : 0);
  }
}

// z^beta and z^(beta - 1) for z > 0; alpha 1.5 (beta 2) and 2 (beta 1) without MUFU.
struct PowBeta {
  float beta;
  int mode;  // 0: beta == 2, 1: beta == 1, 2: general
  __device__ __forceinline__ float p(float z) const {
    return mode == 0 ? z * z : (mode == 1 ? z : exp2f(beta * __log2f(z)));
  }
  __device__ __forceinline__ float p1(float z) const {
    return mode == 0 ? z : (mode == 1 ? 1.f : exp2f((beta - 1.f) * __log2f(z)));
  }
};

enum PassKind { kMaxPass = 0, kNewtonPass = 1, kFinalPass = 2 };

constexpr int kPoints = 8;      // thresholds evaluated per row and Newton pass
constexpr float kNear = 2e-2f;  // f(lo) - 1 under this: one more Newton step, no further pass

// Per-thread state of its two rows (row0 = g, row1 = g + 8 of the warp's 16).
template <int D>
struct RowAcc {
  float tau0, tau1;      // lower bounds of tau (the final tau after the Newton passes)
  float w0, w1;          // bracket widths: thresholds tau + m w / kPoints, m < kPoints
  float a0, a1;          // max pass: row max; final pass: sum p
  float f0[kPoints], f1[kPoints], d0[kPoints], d1[kPoints];  // Newton: f and sum z^(beta-1)
  float o[D / 8][4];
  unsigned nnz;
};

template <typename T, int D>
struct Cta {
  const EntmaxParams& p;
  T *sQ, *sK, *sV;
  int* s_list;
  unsigned char* s_alive;
  const T *kg, *vg;
  const uint8_t* kpm;
  int tid, warp, lane, g, t4, warp_row0, row0, row1;
  bool warp_live;
  float xs;  // scale * (alpha - 1): raw score -> entmax units
  PowBeta pw;

  // One pass over the key blocks s_list[0, n): K (and V in the final pass) double-buffered.
  template <int kKind>
  __device__ void pass(int n, RowAcc<D>& acc) {
    using Mma = MmaOp<T>;
    constexpr int kLd = Traits<D>::kLd;
    constexpr int kKSteps = D / 16;
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    const T* sQw = sQ + (warp * 16 + a_row) * kLd + a_col;
    __syncthreads();  // the stages' previous readers are done
    if (n > 0) {
      load_tile<T, D>(sK, kg, p.k_rs, s_list[0] * kBlockN, kBlockN, p.Nk, tid);
      if (kKind == kFinalPass) load_tile<T, D>(sV, vg, p.v_rs, s_list[0] * kBlockN, kBlockN, p.Nk, tid);
    }
    cp_async_commit();
    for (int it = 0; it < n; ++it) {
      const int j = s_list[it];
      cp_async_wait_all();
      __syncthreads();
      if (it + 1 < n) {
        const int jn = s_list[it + 1], st = (it + 1) & 1;
        load_tile<T, D>(sK + st * kBlockN * kLd, kg, p.k_rs, jn * kBlockN, kBlockN, p.Nk, tid);
        if (kKind == kFinalPass) load_tile<T, D>(sV + st * kBlockN * kLd, vg, p.v_rs, jn * kBlockN, kBlockN, p.Nk, tid);
      }
      cp_async_commit();
      const int kb0 = j * kBlockN;
      if (!warp_live || (p.causal && kb0 > warp_row0 + 15)) continue;  // no usable key for this warp
      const T* sKs = sK + (it & 1) * kBlockN * kLd;

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
      // Entmax units; -inf where the key is not usable (or the row does not exist).
      const bool need_mask = (kb0 + kBlockN > p.Nk) || (p.causal && kb0 + kBlockN - 1 > warp_row0) ||
                             kpm != nullptr || warp_row0 + 16 > p.Nq;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nt][e] * xs;
          if (need_mask) {
            const int col = kb0 + nt * 8 + t4 * 2 + (e & 1);
            const int row = (e < 2) ? row0 : row1;
            const bool ok = row < p.Nq && col < p.Nk && (!p.causal || col <= row) && (kpm == nullptr || __ldg(kpm + col) != 0);
            x = ok ? x : -INFINITY;
          }
          s[nt][e] = x;
        }

      if (kKind == kMaxPass) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          acc.a0 = fmaxf(acc.a0, fmaxf(s[nt][0], s[nt][1]));
          acc.a1 = fmaxf(acc.a1, fmaxf(s[nt][2], s[nt][3]));
        }
        continue;
      }
      // z = X - tau; rows whose tau is -inf (no key seen yet) take no part.
      const bool live0 = acc.tau0 != -INFINITY, live1 = acc.tau1 != -INFINITY;
      bool any = false;
      if (kKind == kNewtonPass) {
        float th0[kPoints], th1[kPoints];
#pragma unroll
        for (int m = 0; m < kPoints; ++m) {
          th0[m] = acc.tau0 + m * (acc.w0 * (1.f / kPoints));
          th1[m] = acc.tau1 + m * (acc.w1 * (1.f / kPoints));
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool first = e < 2;
            const float x = s[nt][e];
            any |= (first ? live0 : live1) && x > (first ? acc.tau0 : acc.tau1);
            if (!(first ? live0 : live1)) continue;
#pragma unroll
            for (int m = 0; m < kPoints; ++m) {
              const float z = x - (first ? th0[m] : th1[m]);
              if (pw.mode == 0) {  // beta 2: f += z^2, f'/2 += z
                const float zc = fmaxf(z, 0.f);
                if (first) { acc.f0[m] = fmaf(zc, zc, acc.f0[m]); acc.d0[m] += zc; }
                else { acc.f1[m] = fmaf(zc, zc, acc.f1[m]); acc.d1[m] += zc; }
              } else if (z > 0.f) {
                const float z1 = pw.p1(z);
                if (first) { acc.f0[m] = fmaf(z1, z, acc.f0[m]); acc.d0[m] += z1; }
                else { acc.f1[m] = fmaf(z1, z, acc.f1[m]); acc.d1[m] += z1; }
              }
            }
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool first = e < 2;
            const float z = s[nt][e] - (first ? acc.tau0 : acc.tau1);
            const bool pos = (first ? live0 : live1) && z > 0.f;
            any |= pos;
            const float w = pos ? pw.p(z) : 0.f;
            s[nt][e] = w;
            acc.nnz += pos ? 1u : 0u;
            if (first) acc.a0 += w; else acc.a1 += w;
          }
      }
      if (__any_sync(0xffffffffu, any) && lane == 0) s_alive[it] = 1;
      if (kKind == kFinalPass) {
        const T* sVs = sV + (it & 1) * kBlockN * kLd;
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
            Mma::run(acc.o[2 * dp], a, bv[0], bv[1]);
            Mma::run(acc.o[2 * dp + 1], a, bv[2], bv[3]);
          }
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }

  // Keep the entries of s_list[0, n) whose s_alive flag is set (order kept), clear the
  // flags; returns the new length (all threads).
  __device__ int compact(int n, int* s_count) {
    if (warp == 0) {
      int m = 0;
      for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const bool keep = i < n && s_alive[i] != 0;
        const int j = i < n ? s_list[i] : 0;
        const unsigned bal = __ballot_sync(0xffffffffu, keep);
        __syncwarp();
        if (keep) s_list[m + __popc(bal & ((1u << lane) - 1u))] = j;
        if (i < n) s_alive[i] = 0;
        m += __popc(bal);
        __syncwarp();
      }
      if (lane == 0) *s_count = m;
    }
    __syncthreads();
    return *s_count;
  }
};

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// One row's update after a Newton pass (f[m], d[m]: partial sums of z^beta and z^(beta-1)
// at threshold lo + m w / kPoints, summed over the quad here). Moves lo to the Newton step
// from the largest threshold with f >= 1 and w to the distance to the next threshold (the
// smallest known upper bound). Returns whether the row needs another pass.
__device__ __forceinline__ bool newton_step(float& lo, float& w, float (&f)[kPoints], float (&d)[kPoints], bool valid,
                                            float beta, float tol) {
#pragma unroll
  for (int m = 0; m < kPoints; ++m) {
    f[m] = quad_sum(f[m]) - 1.f;
    d[m] = quad_sum(d[m]) * beta;  // |f'|
  }
  if (!valid || lo == -INFINITY || !(f[0] > tol)) return false;  // converged (or no key)
  int mi = 0;
#pragma unroll
  for (int m = 1; m < kPoints; ++m)
    if (f[m] >= 0.f) mi = m;  // f decreases in t: the last point still at or left of tau
  float fm = f[0], dm = d[0];
#pragma unroll
  for (int m = 1; m < kPoints; ++m)
    if (m == mi) { fm = f[m]; dm = d[m]; }
  const float tm = lo + mi * (w * (1.f / kPoints));
  const bool has_up = mi + 1 < kPoints;
  const float up = lo + (mi + 1) * (w * (1.f / kPoints));
  float tn = dm > 0.f ? tm + fm / dm : tm;
  if (has_up && !(tn < up)) tn = tm;  // rounding only: Newton from the left stays below tau
  w = has_up ? up - tn : w;
  const bool far = f[0] > kNear;
  lo = tn;
  return far;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Traits<D>::kMinBlocks) entmax_fwd_kernel(const __grid_constant__ EntmaxParams p) {
  using Mma = MmaOp<T>;
  constexpr int kLd = Traits<D>::kLd;
  constexpr int kDTiles = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_red[kThreads / 32];
  __shared__ int s_count;
  __shared__ unsigned long long s_nnz;

  Cta<T, D> c{p};
  c.sQ = reinterpret_cast<T*>(smem_raw);
  c.sK = c.sQ + kBlockM * kLd;
  c.sV = c.sK + 2 * kBlockN * kLd;
  c.s_list = reinterpret_cast<int*>(c.sV + 2 * kBlockN * kLd);
  c.s_alive = reinterpret_cast<unsigned char*>(c.s_list + p.Mk);

  const int qb = p.causal ? (p.Mq - 1 - (int)blockIdx.x) : (int)blockIdx.x;  // long causal rows first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.Hq / p.Hkv);
  const int64_t item = ((int64_t)b * p.Hq + h) * p.Mq + qb;
  c.tid = threadIdx.x;
  c.warp = c.tid >> 5;
  c.lane = c.tid & 31;
  c.g = c.lane >> 2;
  c.t4 = c.lane & 3;
  c.warp_row0 = qb * kBlockM + c.warp * 16;
  c.row0 = c.warp_row0 + c.g;
  c.row1 = c.row0 + 8;
  c.warp_live = c.warp_row0 < p.Nq;
  const float am1 = p.alpha[h] - 1.f, beta = 1.f / am1;
  c.xs = am1 * p.scale;
  c.pw = PowBeta{beta, beta == 2.f ? 0 : (beta == 1.f ? 1 : 2)};
  c.kg = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs;
  c.vg = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs;
  c.kpm = p.kpm ? p.kpm + (int64_t)b * p.Nk : nullptr;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs;
  const float* ub = p.bounds + item * p.Mk;
  const int32_t* seed = p.seeds + item * 2;
  const bool rv0 = c.row0 < p.Nq, rv1 = c.row1 < p.Nq;

  if (c.tid == 0) s_nnz = 0;
  for (int i = c.tid; i < p.Mk; i += kThreads) c.s_alive[i] = 0;
  load_tile<T, D>(c.sQ, qg, p.q_rs, qb * kBlockM, kBlockM, p.Nq, c.tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  RowAcc<D> acc;
  acc.tau0 = acc.tau1 = -INFINITY;
  acc.nnz = 0;

  // 1. Seeds: tau >= (max X over the seed blocks) - 1.
  if (c.tid == 0) {
    int n = 0;
    for (int s = 0; s < 2; ++s)
      if (seed[s] >= 0) c.s_list[n++] = seed[s];
    s_count = n;
  }
  __syncthreads();
  acc.a0 = acc.a1 = -INFINITY;
  c.template pass<kMaxPass>(s_count, acc);
  float m0 = quad_max(acc.a0), m1 = quad_max(acc.a1);
  acc.tau0 = m0 == -INFINITY ? -INFINITY : m0 - 1.f;
  acc.tau1 = m1 == -INFINITY ? -INFINITY : m1 - 1.f;

  // Smallest tau over the CTA's existing rows (-inf when a row saw no seed key).
  float mine = INFINITY;
  if (rv0) mine = acc.tau0;
  if (rv1) mine = fminf(mine, acc.tau1);
  for (int off = 16; off >= 1; off >>= 1) mine = fminf(mine, __shfl_xor_sync(0xffffffffu, mine, off));
  if (c.lane == 0) s_red[c.warp] = mine;
  __syncthreads();
  float tau_min = s_red[0];
  for (int w = 1; w < kThreads / 32; ++w) tau_min = fminf(tau_min, s_red[w]);

  // 2. Candidates: bound above tau_min (margin: rounding between the bounds and the mma).
  if (c.warp == 0) {
    int n = 0;
    for (int base = 0; base < p.Mk; base += 32) {
      const int j = base + c.lane;
      bool keep = false;
      if (j < p.Mk) {
        const float u = ub[j];
        if (u != -INFINITY) {
          const float x = am1 * u;
          keep = x + 1e-3f * (1.f + fabsf(x)) > tau_min;
        }
      }
      const unsigned bal = __ballot_sync(0xffffffffu, keep);
      if (keep) c.s_list[n + __popc(bal & ((1u << c.lane) - 1u))] = j;
      n += __popc(bal);
    }
    if (c.lane == 0) s_count = n;
  }
  __syncthreads();
  int n = s_count;
  const int scored = n;

  // Rows without a seed key (causal rows behind padding): their max over all candidates.
  if (tau_min == -INFINITY && n > 0) {
    acc.a0 = acc.a1 = -INFINITY;
    c.template pass<kMaxPass>(n, acc);
    m0 = quad_max(acc.a0);
    m1 = quad_max(acc.a1);
    if (acc.tau0 == -INFINITY && m0 != -INFINITY) acc.tau0 = m0 - 1.f;
    if (acc.tau1 == -INFINITY && m1 != -INFINITY) acc.tau1 = m1 - 1.f;
  }

  // 3. Newton passes; blocks entirely under tau leave the list.
  acc.w0 = acc.w1 = 1.f;  // [max - 1, max): where tau lies if the seed holds the row max
  int passes = 0;
  while (passes < p.max_iters && n > 0) {
#pragma unroll
    for (int m = 0; m < kPoints; ++m) acc.f0[m] = acc.f1[m] = acc.d0[m] = acc.d1[m] = 0.f;
    c.template pass<kNewtonPass>(n, acc);
    ++passes;
    const bool far0 = newton_step(acc.tau0, acc.w0, acc.f0, acc.d0, rv0, beta, p.tol);
    const bool far1 = newton_step(acc.tau1, acc.w1, acc.f1, acc.d1, rv1, beta, p.tol);
    const int any_far = __syncthreads_or(far0 || far1);
    n = c.compact(n, &s_count);
    if (!any_far) break;
  }

  // 4. p V over the blocks still alive.
  acc.a0 = acc.a1 = 0.f;
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc.o[i][0] = acc.o[i][1] = acc.o[i][2] = acc.o[i][3] = 0.f;
  c.template pass<kFinalPass>(n, acc);
  const int alive = c.compact(n, &s_count);
  const float l0 = quad_sum(acc.a0), l1 = quad_sum(acc.a1);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;

  // Stage the warp's 16 output rows in its own rows of sQ, then write 16-byte chunks.
  T* sO = c.sQ + c.warp * 16 * kLd;
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
    const int col = i * 8 + c.t4 * 2;
    *reinterpret_cast<uint32_t*>(sO + c.g * kLd + col) = Mma::pack(acc.o[i][0] * inv0, acc.o[i][1] * inv0);
    *reinterpret_cast<uint32_t*>(sO + (c.g + 8) * kLd + col) = Mma::pack(acc.o[i][2] * inv1, acc.o[i][3] * inv1);
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + b * p.o_bs + h * p.o_hs;
  constexpr int kChunks = D / 8;
  for (int cc = c.lane; cc < 16 * kChunks; cc += 32) {
    const int r = cc / kChunks, ch = cc % kChunks;
    const int grow = c.warp_row0 + r;
    if (grow < p.Nq)
      *reinterpret_cast<uint4*>(og + (int64_t)grow * p.o_rs + ch * 8) =
          *reinterpret_cast<const uint4*>(sO + r * kLd + ch * 8);
  }
  if (c.t4 == 0) {
    float* tau = p.tau + ((int64_t)b * p.Hq + h) * p.Nq;
    if (rv0) tau[c.row0] = l0 > 0.f ? acc.tau0 : -INFINITY;
    if (rv1) tau[c.row1] = l1 > 0.f ? acc.tau1 : -INFINITY;
  }
  unsigned nz = acc.nnz;
  for (int off = 16; off >= 1; off >>= 1) nz += __shfl_xor_sync(0xffffffffu, nz, off);
  if (c.lane == 0 && nz) atomicAdd(&s_nnz, (unsigned long long)nz);
  __syncthreads();
  if (c.tid == 0) {
    int64_t* out = p.counts + item * 4;
    out[0] = scored;
    out[1] = alive;
    out[2] = passes;
    out[3] = (int64_t)s_nnz;
  }
}

template <typename T, int D>
cudaError_t launch(const EntmaxParams& p, cudaStream_t stream) {
  const size_t smem = (size_t)Traits<D>::kSmemElems * sizeof(T) + (size_t)p.Mk * (sizeof(int) + 1);
  auto kernel = entmax_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(p.Mq, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hcs_entmax
