// Block-sparse flash-attention forward for Hopper (sm_90a), warp-specialized in the manner
// of FlashAttention-3.
//
// Persistent: one CTA of 384 threads per SM walks work items (query block of 128 rows, q
// head, batch) with a stride of the grid; the K/V ring and the Q buffer run on from one
// item into the next, so an item's first loads hide under the last one's tail.
// * warpgroup 0 is the producer: one thread issues bulk tensor copies (TMA) of Q and of
//   the kept K/V blocks into a ring of shared-memory stages, completing on mbarriers;
//   the warpgroup gives its registers away (setmaxnreg.dec).
// * warpgroups 1 and 2 are consumers of 64 query rows each (setmaxnreg.inc to 240).
//   Each iteration takes a tile of two kept 64-key blocks (128 keys), so S = Q K^T is one
//   m64n128 wgmma chain and P V a k=128 chain; an odd last block is loaded into both
//   halves and masked in the second (P = 0 there).
// * the next tile's Q K^T is issued before this tile's P V completes, and the softmax of
//   tile t+1 runs while the tensor cores do P_t V_t (FA3's intra-warpgroup pipelining),
//   and the two consumer warpgroups take turns issuing their GEMMs (FA3's ping-pong), so
//   one's softmax runs under the other's GEMMs. (Without the overlap, QK -> softmax -> PV
//   in turn, it measured 472 against 520 TFLOP/s at D128 on an H200: BENCHMARKS.md.)
//
// Semantics as block_sparse_fwd.cuh and ops/reference.py (the epilogue writes each row's
// log-sum-exp, FwdParams::lse, as that kernel does). The pv skip is decided per warp
// (16 rows) and per 64-key block, in ascending block order, as the mma.sync kernel does:
// within a tile, block b's decision uses the running max after block a.
// Thresholds from kPvExactThreshold (20) on cannot change the output and are not tested.
// A tile skipped for all 64 rows still runs its P V with P = 0
// (a branch around the wgmma issue serializes the pipeline); the counts are exact.
// FwdParams::probe (bits for benchmarks/ws_probe.py, 0 in use) can switch the softmax or
// the K/V loads off to measure what bounds the kernel.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "block_sparse_fwd.h"
#include "common.cuh"
#include "wgmma_ops.cuh"

namespace hcs {
namespace sm90ws {

using sm90::fence_regs;
using sm90::make_desc;

constexpr int kTileN = 2 * kBlockN;  // keys per iteration: two kept blocks
constexpr int kWsThreads = 384;      // producer warpgroup + two consumer warpgroups
constexpr int kProducerRegs = 24;    // setmaxnreg: the producer gives registers to the consumers
constexpr int kConsumerRegs = 240;

template <int D>
struct WsTraits {
  static constexpr int kHalves = D / 64;                   // 64-column (128-byte) halves
  static constexpr int kStages = D == 64 ? 4 : 3;          // K/V ring depth
  static constexpr uint32_t kHalfQ = kBlockM * 128;         // one half of the Q tile, bytes
  static constexpr uint32_t kHalfKV = kTileN * 128;         // one half of a K or V tile
  static constexpr uint32_t kBlockBytes = kBlockN * 128;    // one key block of one half: a TMA box
  static constexpr uint32_t kQBytes = kHalves * kHalfQ;
  static constexpr uint32_t kKVBytes = kHalves * kHalfKV;
  static constexpr int kSmemBytes = (int)(kQBytes + 2 * kStages * kKVBytes) + 1024;  // + alignment slack
};

#ifdef HCS_SM90_ENABLED
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// 4-D tiled bulk copy global -> shared (coordinates innermost first), completing on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Ping-pong between the consumer warpgroups (FA3): a warpgroup issues its GEMMs only on
// its turn and then hands the turn over, so one's softmax runs under the other's GEMMs.
constexpr int kSchedBarrier = 4;  // named barriers 4 and 5; 3 (epilogue) elsewhere
__device__ __forceinline__ void sched_wait_turn(int cwg) { named_bar_sync(kSchedBarrier + cwg, 256); }
__device__ __forceinline__ void sched_pass_turn(int cwg) { named_bar_arrive(kSchedBarrier + (1 - cwg), 256); }
template <int N>
__device__ __forceinline__ void fence_uregs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
#endif

// Per-thread state of the consumer: two rows (row0 = lane/4, row1 = row0 + 8 of the warp's
// 16), their running max (log2 units, scaled), row sums, and pv counters.
struct RowState {
  float m0, m1, l0, l1;
  unsigned visited, skipped;
};

// What the softmax needs about a thread's rows and the call, fixed for a work item.
struct ConsumerCtx {
  int row0, row1, warp_row0;  // the thread's two rows and its warp's first row
  bool rv0, rv1;              // rows inside Nq
  int t4;                     // lane % 4: the thread's column pair within 8-column groups
  float neg_thr2;             // -pvthreshd * log2(e)
  bool use_skip;              // pvthreshd < kPvExactThreshold
};

#ifdef HCS_SM90_ENABLED
// S = Q K^T for one tile, issued (not waited). A single-block tile runs the full n128 chain
// too (its block sits in both halves) and softmax_tile masks the second half; an n64
// wgmma on half of the accumulators makes ptxas serialize the whole pipeline.
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t sQw, uint32_t sK) {
  using Tr = WsTraits<D>;
  sm90::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t half = (uint32_t)(kk >> 2), koff = (uint32_t)(kk & 3) * 32;
    sm90::WgmmaOps<T>::qk(s, make_desc(sQw + half * Tr::kHalfQ + koff, 16, 1024),
                   make_desc(sK + half * Tr::kHalfKV + koff, 16, 1024), kk > 0 ? 1 : 0);
  }
  sm90::wgmma_commit();
}

// O += P V for one tile, issued (not waited); P from registers. Always the full k = 128
// chain: a branch inside it would split the commit group, and wgmma_wait<1> would then
// wait for P V too. A single-block tile holds its block twice (the producer loads it into
// both halves) and P = 0 on the second half.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], uint32_t (&pa)[8][4], uint32_t sV) {
  using Tr = WsTraits<D>;
  sm90::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    sm90::WgmmaOps<T>::pv(o, pa[kk], make_desc(sV + (uint32_t)kk * 16 * 128, Tr::kHalfKV, 1024));
  sm90::wgmma_commit();
}

// Masking, the pv-skip vote and the online-softmax update of one tile held in `s`
// (raw scores). On return `s` holds P = exp2(x - m) (zeros where masked or skipped) and
// al0/al1 the factors by which O must be rescaled. Returns false when the warp skipped
// the whole tile (its P is zero). kba/kbb: first key of blocks a and b (kbb < 0: single).
__device__ __forceinline__ bool softmax_tile(float (&s)[64], int kba, int kbb, const FwdParams& p,
                                             const uint8_t* kpm, const ConsumerCtx& c, RowState& st,
                                             float& al0, float& al1) {
  if (p.probe & 1) {
    al0 = al1 = 1.f;
    return true;
  }
  const bool single = kbb < 0;
  const bool mask_a = (kba + kBlockN > p.Nk) || (p.causal && kba + kBlockN - 1 > c.warp_row0) || kpm != nullptr;
  const bool mask_b = !single && ((kbb + kBlockN > p.Nk) || (p.causal && kbb + kBlockN - 1 > c.warp_row0) ||
                                  kpm != nullptr);
  // Raw scores: the softmax scale is folded into the exponent's FFMA below, and the maxima
  // are scaled after the reduction (the scale is positive, so they commute with it).
  // Masked entries go to -inf in a separate pass taken only by tiles that need it
  // (diagonal, ragged end, key padding, single block): the common path has no per-element
  // branches.
  if (mask_a || mask_b || single) {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const bool in_b = nt >= 8;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = (in_b ? kbb : kba) + (nt & 7) * 8 + c.t4 * 2 + (e & 1);
        const int row = (e < 2) ? c.row0 : c.row1;
        bool ok = !(in_b && single) && col < p.Nk && (!p.causal || col <= row);
        if (kpm != nullptr) ok = ok && __ldg(kpm + (ok ? col : 0)) != 0;
        s[nt * 4 + e] = ok ? s[nt * 4 + e] : -INFINITY;
      }
    }
  }
  float bma0 = -INFINITY, bma1 = -INFINITY, bmb0 = -INFINITY, bmb1 = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    bma0 = fmaxf(bma0, fmaxf(s[nt * 4 + 0], s[nt * 4 + 1]));
    bma1 = fmaxf(bma1, fmaxf(s[nt * 4 + 2], s[nt * 4 + 3]));
    bmb0 = fmaxf(bmb0, fmaxf(s[32 + nt * 4 + 0], s[32 + nt * 4 + 1]));
    bmb1 = fmaxf(bmb1, fmaxf(s[32 + nt * 4 + 2], s[32 + nt * 4 + 3]));
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    bma0 = fmaxf(bma0, __shfl_xor_sync(0xffffffffu, bma0, off));
    bma1 = fmaxf(bma1, __shfl_xor_sync(0xffffffffu, bma1, off));
    bmb0 = fmaxf(bmb0, __shfl_xor_sync(0xffffffffu, bmb0, off));
    bmb1 = fmaxf(bmb1, __shfl_xor_sync(0xffffffffu, bmb1, off));
  }
  bma0 *= p.scale_log2;  // log2 units from here on
  bma1 *= p.scale_log2;
  bmb0 *= p.scale_log2;
  bmb1 *= p.scale_log2;
  const bool ha0 = c.rv0 && bma0 != -INFINITY, ha1 = c.rv1 && bma1 != -INFINITY;
  const bool hb0 = c.rv0 && bmb0 != -INFINITY, hb1 = c.rv1 && bmb1 != -INFINITY;
  if (c.t4 == 0) st.visited += (unsigned)ha0 + (unsigned)ha1 + (unsigned)hb0 + (unsigned)hb1;

  bool skip_a = false, skip_b = false;
  if (c.use_skip) {
    const float thr = c.neg_thr2;
    const bool sa0 = ha0 && st.m0 != -INFINITY && bma0 - st.m0 < thr;
    const bool sa1 = ha1 && st.m1 != -INFINITY && bma1 - st.m1 < thr;
    // block b's decision given block a's: a skipped block's max lies below the running max,
    // so it would not have moved it
    const bool sbs0 = hb0 && st.m0 != -INFINITY && bmb0 - st.m0 < thr;
    const bool sbs1 = hb1 && st.m1 != -INFINITY && bmb1 - st.m1 < thr;
    const float mk0 = fmaxf(st.m0, bma0), mk1 = fmaxf(st.m1, bma1);
    const bool sbk0 = hb0 && mk0 != -INFINITY && bmb0 - mk0 < thr;
    const bool sbk1 = hb1 && mk1 != -INFINITY && bmb1 - mk1 < thr;
    // per warp (16 rows), as the mma.sync kernel: P V runs for the whole warpgroup anyway,
    // so a coarser vote would only cost a barrier per tile
    skip_a = __all_sync(0xffffffffu, (!ha0 || sa0) && (!ha1 || sa1));
    skip_b = skip_a ? __all_sync(0xffffffffu, (!hb0 || sbs0) && (!hb1 || sbs1))
                    : __all_sync(0xffffffffu, (!hb0 || sbk0) && (!hb1 || sbk1));
    if (c.t4 == 0) {
      if (skip_a) st.skipped += (unsigned)ha0 + (unsigned)ha1;
      if (skip_b) st.skipped += (unsigned)hb0 + (unsigned)hb1;
    }
    if (skip_a && skip_b) {
      al0 = al1 = 1.f;
      return false;
    }
  }
  const float bm0 = fmaxf(skip_a ? -INFINITY : bma0, skip_b ? -INFINITY : bmb0);
  const float bm1 = fmaxf(skip_a ? -INFINITY : bma1, skip_b ? -INFINITY : bmb1);
  const float mn0 = fmaxf(st.m0, bm0), mn1 = fmaxf(st.m1, bm1);
  const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
  al0 = exp2f(st.m0 - ms0);
  al1 = exp2f(st.m1 - ms1);
  st.m0 = mn0;
  st.m1 = mn1;
  // P = exp2(s * scale - m) as one FFMA and one MUFU per score. A skipped block's offset
  // is +inf, so its P is exactly 0 with no select (a select costs predicated MUFUs, zeroing
  // and register moves in every tile).
  const float sc = p.scale_log2;
  const float oa0 = skip_a ? INFINITY : ms0, oa1 = skip_a ? INFINITY : ms1;
  const float ob0 = skip_b ? INFINITY : ms0, ob1 = skip_b ? INFINITY : ms1;
  float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const float o0 = nt < 8 ? oa0 : ob0, o1 = nt < 8 ? oa1 : ob1;
    s[nt * 4 + 0] = exp2f(fmaf(s[nt * 4 + 0], sc, -o0));
    s[nt * 4 + 1] = exp2f(fmaf(s[nt * 4 + 1], sc, -o0));
    s[nt * 4 + 2] = exp2f(fmaf(s[nt * 4 + 2], sc, -o1));
    s[nt * 4 + 3] = exp2f(fmaf(s[nt * 4 + 3], sc, -o1));
    rs0 += s[nt * 4 + 0] + s[nt * 4 + 1];
    rs1 += s[nt * 4 + 2] + s[nt * 4 + 3];
  }
  st.l0 = st.l0 * al0 + rs0;
  st.l1 = st.l1 * al1 + rs1;
  return true;
}

template <typename T>
__device__ __forceinline__ void pack_p(const float (&s)[64], uint32_t (&pa)[8][4]) {
  using Mma = MmaOp<T>;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    pa[kk][0] = Mma::pack(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
    pa[kk][1] = Mma::pack(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
    pa[kk][2] = Mma::pack(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
    pa[kk][3] = Mma::pack(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
  }
}

__device__ __forceinline__ void zero_p(uint32_t (&pa)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) pa[kk][j] = 0u;
}

template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], float al0, float al1) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    o[i * 4 + 0] *= al0;
    o[i * 4 + 1] *= al0;
    o[i * 4 + 2] *= al1;
    o[i * 4 + 3] *= al1;
  }
}
#endif  // HCS_SM90_ENABLED

// A persistent CTA's work items, in the same order for the producer and the consumers:
// item w = x + Mq * (h + Hq * b), consecutive items share a head (and its K/V in L2).
struct WorkItem {
  int x, h, b;
  __device__ WorkItem(const FwdParams& p, int w) : x(w % p.Mq), h((w / p.Mq) % p.Hq), b(w / (p.Mq * p.Hq)) {}
};

template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads, 1)
    block_sparse_fwd_ws_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                               const __grid_constant__ CUtensorMap tm_v, const FwdParams p) {
#ifdef HCS_SM90_ENABLED
  using Tr = WsTraits<D>;
  constexpr int S = Tr::kStages;
  extern __shared__ unsigned char smem_raw[];
  // mbarriers: [0] Q full, [1..S] K full, [S+1..2S] V full, [2S+1..3S] stage empty, [3S+1] Q empty
  __shared__ __align__(8) unsigned long long bars[2 + 3 * S];
  __shared__ unsigned long long s_counts[2];

  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base;
  const uint32_t sK0 = sQ + Tr::kQBytes;
  const uint32_t sV0 = sK0 + S * Tr::kKVBytes;
  const uint32_t bar0 = smem_u32(&bars[0]);
  const uint32_t bar_q = bar0, bar_qe = bar0 + 8u * (uint32_t)(1 + 3 * S);
  auto bar_k = [&](int s) { return bar0 + 8u * (uint32_t)(1 + s); };
  auto bar_v = [&](int s) { return bar0 + 8u * (uint32_t)(1 + S + s); };
  auto bar_e = [&](int s) { return bar0 + 8u * (uint32_t)(1 + 2 * S + s); };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int num_items = p.Mq * p.Hq * p.B;

  if (tid == 0) {
    mbar_init(bar_q, 1);
    mbar_init(bar_qe, 8);  // one arrival per consumer warp
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      mbar_init(bar_e(s), 8);
    }
    s_counts[0] = s_counts[1] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // Producer warpgroup. Tiles are counted across items (g), so the ring runs on from one
    // item into the next: the next item's Q and first tiles load during this one's tail.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (tid == 0) {
      uint32_t g = 0, qi = 0;
      for (int w = blockIdx.x; w < num_items; w += gridDim.x) {
        const WorkItem wi(p, w);
        const LutRow lut(p, wi.x, wi.h, wi.b);
        const int count = lut.count, ntiles = (count + 1) >> 1;
        if (ntiles == 0) continue;  // the consumers write zeros without waiting
        if (qi > 0) mbar_wait(bar_qe, (qi - 1) & 1u);  // the last item's Q K^T are done
        mbar_expect_tx(bar_q, Tr::kQBytes);
#pragma unroll
        for (int hf = 0; hf < Tr::kHalves; ++hf)
          tma_load_4d(sQ + hf * Tr::kHalfQ, &tm_q, bar_q, hf * 64, lut.qb * kBlockM, lut.h, lut.b);
        ++qi;
        for (int t = 0; t < ntiles; ++t, ++g) {
          const int st = (int)(g % S);
          const uint32_t ph = (g / S) & 1u;
          const int ja = lut.idx[2 * t];
          const int jb = 2 * t + 1 < count ? lut.idx[2 * t + 1] : ja;  // an odd last block fills both halves
          constexpr uint32_t bytes = 2u * Tr::kHalves * Tr::kBlockBytes;
          const uint32_t sK = sK0 + (uint32_t)st * Tr::kKVBytes, sV = sV0 + (uint32_t)st * Tr::kKVBytes;
          mbar_wait(bar_e(st), ph ^ 1u);
          if ((p.probe & 2) && g >= S) {
            mbar_arrive(bar_k(st));
            mbar_arrive(bar_v(st));
            continue;
          }
          mbar_expect_tx(bar_k(st), bytes);
#pragma unroll
          for (int hf = 0; hf < Tr::kHalves; ++hf) {
            tma_load_4d(sK + hf * Tr::kHalfKV, &tm_k, bar_k(st), hf * 64, ja * kBlockN, lut.hk, lut.b);
            tma_load_4d(sK + hf * Tr::kHalfKV + Tr::kBlockBytes, &tm_k, bar_k(st), hf * 64, jb * kBlockN, lut.hk, lut.b);
          }
          mbar_expect_tx(bar_v(st), bytes);
#pragma unroll
          for (int hf = 0; hf < Tr::kHalves; ++hf) {
            tma_load_4d(sV + hf * Tr::kHalfKV, &tm_v, bar_v(st), hf * 64, ja * kBlockN, lut.hk, lut.b);
            tma_load_4d(sV + hf * Tr::kHalfKV + Tr::kBlockBytes, &tm_v, bar_v(st), hf * 64, jb * kBlockN, lut.hk, lut.b);
          }
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int cwg = (warp >> 2) - 1;
  const uint32_t sQw = sQ + (uint32_t)cwg * 64 * 128;
  // Ping-pong: every item has ntiles + 1 rounds of GEMM issue in each warpgroup (tile 0's
  // QK, then (QK t, PV t-1), then the last PV) and each round ends by passing the turn.
  // Warpgroup 1 passes once up front so warpgroup 0 goes first; warpgroup 0 takes that
  // spare pass back after its last item.
  if (cwg == 1) sched_pass_turn(1);
  uint32_t g = 0, qi = 0;  // tiles and Q loads so far, as the producer counts them
  unsigned skipped_total = 0, visited_total = 0;
  using Mma = MmaOp<T>;

  for (int w = blockIdx.x; w < num_items; w += gridDim.x) {
    const WorkItem wi(p, w);
    const LutRow lut(p, wi.x, wi.h, wi.b);
    const int count = lut.count, ntiles = (count + 1) >> 1;
    const int32_t* idx = lut.idx;
    ConsumerCtx c;
    c.t4 = lane & 3;
    c.warp_row0 = lut.qb * kBlockM + cwg * 64 + (warp & 3) * 16;
    c.row0 = c.warp_row0 + (lane >> 2);
    c.row1 = c.row0 + 8;
    c.rv0 = c.row0 < p.Nq;
    c.rv1 = c.row1 < p.Nq;
    c.neg_thr2 = -p.pvthreshd[lut.h] * 1.4426950408889634f;
    // This kernel runs P V for skipped blocks too, so a skip that cannot change the output
    // would only cost its votes (~8% at the default pvthreshd 50): not tested, not counted.
    c.use_skip = p.pvthreshd[lut.h] < kPvExactThreshold;
    const uint8_t* kpm = p.kpm ? p.kpm + lut.b * p.kpm_bs : nullptr;

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    RowState rs{-INFINITY, -INFINITY, 0.f, 0.f, 0u, 0u};

    if (ntiles > 0) {
      float s[64];
      uint32_t pa[8][4];
      mbar_wait(bar_q, qi & 1u);
      ++qi;
      const uint32_t g0 = g;
      const bool single0 = 1 >= count;
      mbar_wait(bar_k((int)(g0 % S)), (g0 / S) & 1u);
      sched_wait_turn(cwg);
      issue_qk<T, D>(s, sQw, sK0 + (g0 % S) * Tr::kKVBytes);
      sched_pass_turn(cwg);
      sm90::wgmma_wait<0>();
      fence_regs(s);
      if (ntiles == 1) {  // Q is no longer read
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_qe);
      }
      float al0, al1;
      // A tile the pv skip dropped entirely still runs its P V, with P = 0: a data-dependent
      // branch around the wgmma issue makes ptxas serialize every wgmma of the kernel.
      if (softmax_tile(s, idx[0] * kBlockN, single0 ? -1 : idx[1] * kBlockN, p, kpm, c, rs, al0, al1))
        pack_p<T>(s, pa);
      else
        zero_p(pa);
      for (int t = 1; t < ntiles; ++t) {
        const uint32_t gt = g0 + (uint32_t)t;
        const int st = (int)(gt % S), pst = (int)((gt - 1) % S);
        const uint32_t ph = (gt / S) & 1u, pph = ((gt - 1) / S) & 1u;
        const bool single = 2 * t + 1 >= count;
        const int kba = idx[2 * t] * kBlockN, kbb = single ? -1 : idx[2 * t + 1] * kBlockN;
        mbar_wait(bar_k(st), ph);
        mbar_wait(bar_v(pst), pph);
        sched_wait_turn(cwg);
        issue_qk<T, D>(s, sQw, sK0 + (uint32_t)st * Tr::kKVBytes);
        rescale_o<D>(o, al0, al1);  // for tile t-1's P, under this Q K^T (as FA3)
        issue_pv<T, D>(o, pa, sV0 + (uint32_t)pst * Tr::kKVBytes);
        sched_pass_turn(cwg);
        sm90::wgmma_wait<1>();
        fence_regs(s);
        if (t == ntiles - 1) {  // Q is no longer read: the producer may load the next item's
          __syncwarp();
          if (lane == 0) mbar_arrive(bar_qe);
        }
        const bool next = softmax_tile(s, kba, kbb, p, kpm, c, rs, al0, al1);
        sm90::wgmma_wait<0>();
        fence_regs(o);
        fence_uregs(pa);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_e(pst));
        if (next)
          pack_p<T>(s, pa);
        else
          zero_p(pa);
      }
      const uint32_t gl = g0 + (uint32_t)ntiles - 1;
      const int lst = (int)(gl % S);
      mbar_wait(bar_v(lst), (gl / S) & 1u);
      sched_wait_turn(cwg);
      rescale_o<D>(o, al0, al1);
      issue_pv<T, D>(o, pa, sV0 + (uint32_t)lst * Tr::kKVBytes);
      sched_pass_turn(cwg);
      sm90::wgmma_wait<0>();
      fence_regs(o);
      fence_uregs(pa);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_e(lst));
      g = gl + 1;
    }

    float l0 = rs.l0, l1 = rs.l1;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (c.t4 == 0) {  // the quad's four lanes hold the same row state
      float* lse = p.lse + ((int64_t)lut.b * p.Hq + lut.h) * p.Nq;
      if (c.rv0) lse[c.row0] = row_lse(rs.m0, l0);
      if (c.rv1) lse[c.row1] = row_lse(rs.m1, l1);
    }
    T* og = static_cast<T*>(p.o) + lut.b * p.o_bs + lut.h * p.o_hs;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + c.t4 * 2;
      if (c.rv0)
        *reinterpret_cast<uint32_t*>(og + (int64_t)c.row0 * p.o_rs + col) =
            Mma::pack(o[i * 4] * inv0, o[i * 4 + 1] * inv0);
      if (c.rv1)
        *reinterpret_cast<uint32_t*>(og + (int64_t)c.row1 * p.o_rs + col) =
            Mma::pack(o[i * 4 + 2] * inv1, o[i * 4 + 3] * inv1);
    }
    skipped_total += rs.skipped;
    visited_total += rs.visited;
  }
  if (cwg == 0) sched_wait_turn(0);  // warpgroup 1's spare pass

  unsigned sk = skipped_total, vi = visited_total;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    sk += __shfl_xor_sync(0xffffffffu, sk, off);
    vi += __shfl_xor_sync(0xffffffffu, vi, off);
  }
  if (lane == 0) {
    if (sk) atomicAdd(&s_counts[0], (unsigned long long)sk);
    if (vi) atomicAdd(&s_counts[1], (unsigned long long)vi);
  }
  named_bar_sync(3, 256);
  if (tid == 128) {
    if (s_counts[0]) atomicAdd(&p.pv_counts[0], s_counts[0]);
    if (s_counts[1]) atomicAdd(&p.pv_counts[1], s_counts[1]);
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Host side: tensor maps and the launch.

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda needed).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
#else
    cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) return nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// [B, H, N, D] (element strides bs, hs, rs; D contiguous) as a 4-D map with 64 x box_rows
// boxes in the 128-byte swizzle the wgmma descriptors expect. False when TMA cannot
// address it (alignment, strides), so the caller falls back to another kernel.
template <typename T>
inline bool make_tensor_map(CUtensorMap* map, const void* ptr, int D, int N, int H, int B, int64_t rs, int64_t hs,
                            int64_t bs, int box_rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const int64_t e = (int64_t)sizeof(T);
  int64_t strides[3] = {rs * e, hs * e, bs * e};
  const int64_t sizes[3] = {N, H, B};
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] == 1) strides[i] = 16;  // never stepped over; any legal value
    if (strides[i] <= 0 || strides[i] % 16 != 0 || strides[i] >= (int64_t(1) << 40)) return false;
  }
  const cuuint64_t gdim[4] = {(cuuint64_t)D, (cuuint64_t)N, (cuuint64_t)H, (cuuint64_t)B};
  const cuuint64_t gstride[3] = {(cuuint64_t)strides[0], (cuuint64_t)strides[1], (cuuint64_t)strides[2]};
  const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, dt, 4, const_cast<void*>(ptr), gdim, gstride, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// cudaErrorNotSupported when this build or device has no sm_90a code or TMA cannot address
// the operands: the caller then falls back to the other kernels.
template <typename T, int D>
cudaError_t launch_block_sparse_fwd_ws(const FwdParams& p, cudaStream_t stream) {
  auto kernel = block_sparse_fwd_ws_kernel<T, D>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (attr.binaryVersion != 90) return cudaErrorNotSupported;
  CUtensorMap tq, tk, tv;
  if (!make_tensor_map<T>(&tq, p.q, D, p.Nq, p.Hq, p.B, p.q_rs, p.q_hs, p.q_bs, kBlockM) ||
      !make_tensor_map<T>(&tk, p.k, D, p.Nk, p.Hkv, p.B, p.k_rs, p.k_hs, p.k_bs, kBlockN) ||
      !make_tensor_map<T>(&tv, p.v, D, p.Nk, p.Hkv, p.B, p.v_rs, p.v_hs, p.v_bs, kBlockN))
    return cudaErrorNotSupported;
  const size_t smem = (size_t)WsTraits<D>::kSmemBytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  // Persistent: one CTA per SM (or per item, when there are fewer), each walking the items
  // with a stride of the grid, so one item's tail overlaps the next one's loads.
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t items = (int64_t)p.Mq * p.Hq * p.B;
  if (items >= (int64_t(1) << 31)) return cudaErrorNotSupported;
  const int ctas = p.max_ctas > 0 ? std::min(p.max_ctas, sms) : sms;
  const int grid = (int)std::min<int64_t>(items, (int64_t)ctas);
  kernel<<<grid, kWsThreads, smem, stream>>>(tq, tk, tv, p);
  return cudaGetLastError();
}

}  // namespace sm90ws
}  // namespace hcs
