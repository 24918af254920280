// Block-sparse flash-attention forward for one (batch, q head, query block) work item.
//
// Included once by each isa_*.cpp after it has set the code-generation target and defined
//   HCS_W           floats per vector (16 AVX-512, 8 AVX2, 4 baseline)
//   HCS_QK_MR/NV    score tile: keys x query vectors
//   HCS_PV_MR/NV    output tile: query rows x head-dim vectors
//   HCS_KERNEL_FN   name of the exported accessor (e.g. kernel_avx512)
//   HCS_ISA_NAME    string name
// Everything here has internal linkage, so each ISA's copy stays its own.
//
// Layout (why it is fast): scores are computed transposed, St[key][query], with q tile
// pre-scaled and stored transposed (Qt[d][query]). The score tile is then an outer-product
// GEMM over d (broadcast one key element, FMA into query vectors), and every softmax
// reduction (block max, row sum, running max, skip test) runs vertically over keys with
// one query per vector lane: no horizontal reductions. P@V is an axpy over the head dim
// (broadcast P[key][query], FMA V rows into the output tile).
//
// Numerics: float32 throughout, scores in base-2 units (scale * log2 e folded into q), the
// online softmax with the pv-threshold skip exactly as ops/reference.py defines it.

#include "isa_kernel.h"

namespace hcs_cpu {
namespace {

constexpr int W = HCS_W;
constexpr int QT = kBlockM;  // stride of Qt and St rows (queries)
constexpr int KB = kBlockN;

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf vload(const float* p) {
  vf x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
inline void vstore(float* p, vf x) { __builtin_memcpy(p, &x, sizeof x); }
// Broadcast by a braced initialiser: GCC emits one vbroadcastss from memory. `vf{} + s` would
// add 0.0f first (it must: -0 + 0 = +0), an extra dependent add per broadcast on the FMA ports
// of the micro-kernels (the AVX2 QK^T loop ran 18 FP ops per 12 FMAs).
#if HCS_W == 16
inline vf vsplat(float s) { return vf{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
#elif HCS_W == 8
inline vf vsplat(float s) { return vf{s, s, s, s, s, s, s, s}; }
#elif HCS_W == 4
inline vf vsplat(float s) { return vf{s, s, s, s}; }
#else
#error "HCS_W must be 4, 8 or 16"
#endif
inline vi visplat(int32_t s) { return vi{} + s; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline vi viota() {
  vi r;
  for (int i = 0; i < W; ++i) r[i] = i;
  return r;
}

// 2^x for x <= 0 (the kernel only exponentiates s - max and m_old - m_new): relative error
// <= 2.4e-7 (2 float32 ulp; the degree-5 polynomial's minimax error is 7.5e-8, the rest is
// float32 Horner rounding, measured on 2e5 points of [-0.5, 0.5]); exactly 0 for x < -127
// (so -inf gives 0), NaN stays NaN. 14 vector ops: the integer part's exponent bits come
// straight from the rounding add (no float->int conversion), and lanes below -127 are
// zeroed by one compare and one and (no clamp and blend).
inline vf vexp2(vf x) {
  // 1.5 * 2^23 + 127: the add rounds x to an integer n and leaves n + 127 in the low
  // mantissa bits, so shifting the bits left by 23 gives the float 2^n (n >= -126 here)
  const vf t = x + 12583039.0f;
  const vf f = x - (t - 12583039.0f);  // in [-0.5, 0.5] where kept
  vf p = vsplat(1.3276446843519807e-03f);
  p = p * f + 9.6755335107445717e-03f;
  p = p * f + 5.5507130920886993e-02f;
  p = p * f + 2.4022120237350464e-01f;
  p = p * f + 6.9314694404602051e-01f;
  p = p * f + 1.0000001192092896e+00f;
  const vi keep = ~(x < -127.0f);  // NaN compares false: kept, and stays NaN
  return (vf)((vi)(p * (vf)((vi)t << 23)) & keep);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// St[c][q] = sum_d K[c][d] * Qt[d][q] for MR keys x NV query vectors.
template <int MR, int NV>
inline void qk_tile(const float* __restrict k, int64_t d_len, const float* __restrict qt, float* __restrict st) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  for (int64_t d = 0; d < d_len; ++d) {
    vf qv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) qv[j] = vload(qt + d * QT + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf kb = vsplat(k[i * d_len + d]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += kb * qv[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(st + i * QT + j * W, acc[i][j]);
}

// O[r][:] = alpha[r] * O[r][:] + sum_c P[c][r] * V[c][:] for MR rows x NV head-dim vectors.
template <int MR, int NV>
inline void pv_tile(const float* __restrict pt, int nc, const float* __restrict v, int64_t v_stride,
                    float* __restrict o, int64_t o_stride, const float* __restrict alpha) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const vf a = vsplat(alpha[i]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = vload(o + i * o_stride + j * W) * a;
  }
  for (int c = 0; c < nc; ++c) {
    vf vv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vv[j] = vload(v + c * v_stride + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf pb = vsplat(pt[c * QT + i]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += pb * vv[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(o + i * o_stride + j * W, acc[i][j]);
}

// Remainder tiles: pick the instantiation for runtime (mr, nv) within the ISA's maxima.
template <int MR>
inline void qk_any_nv(int nv, const float* k, int64_t d_len, const float* qt, float* st) {
  switch (nv) {
    case 1: qk_tile<MR, 1>(k, d_len, qt, st); break;
    case 2: if constexpr (HCS_QK_NV >= 2) qk_tile<MR, 2>(k, d_len, qt, st); break;
    case 3: if constexpr (HCS_QK_NV >= 3) qk_tile<MR, 3>(k, d_len, qt, st); break;
    case 4: if constexpr (HCS_QK_NV >= 4) qk_tile<MR, 4>(k, d_len, qt, st); break;
    default: break;
  }
}

inline void qk_any(int mr, int nv, const float* k, int64_t d_len, const float* qt, float* st) {
  switch (mr) {
    case 1: qk_any_nv<1>(nv, k, d_len, qt, st); break;
    case 2: qk_any_nv<2>(nv, k, d_len, qt, st); break;
    case 3: qk_any_nv<3>(nv, k, d_len, qt, st); break;
    case 4: qk_any_nv<4>(nv, k, d_len, qt, st); break;
    case 5: if constexpr (HCS_QK_MR >= 5) qk_any_nv<5>(nv, k, d_len, qt, st); break;
    case 6: if constexpr (HCS_QK_MR >= 6) qk_any_nv<6>(nv, k, d_len, qt, st); break;
    case 7: if constexpr (HCS_QK_MR >= 7) qk_any_nv<7>(nv, k, d_len, qt, st); break;
    case 8: if constexpr (HCS_QK_MR >= 8) qk_any_nv<8>(nv, k, d_len, qt, st); break;
    default: break;
  }
}

template <int MR>
inline void pv_any_nv(int nv, const float* pt, int nc, const float* v, int64_t vs, float* o, int64_t os,
                      const float* alpha) {
  switch (nv) {
    case 1: pv_tile<MR, 1>(pt, nc, v, vs, o, os, alpha); break;
    case 2: if constexpr (HCS_PV_NV >= 2) pv_tile<MR, 2>(pt, nc, v, vs, o, os, alpha); break;
    case 3: if constexpr (HCS_PV_NV >= 3) pv_tile<MR, 3>(pt, nc, v, vs, o, os, alpha); break;
    case 4: if constexpr (HCS_PV_NV >= 4) pv_tile<MR, 4>(pt, nc, v, vs, o, os, alpha); break;
    default: break;
  }
}

inline void pv_any(int mr, int nv, const float* pt, int nc, const float* v, int64_t vs, float* o, int64_t os,
                   const float* alpha) {
  switch (mr) {
    case 1: pv_any_nv<1>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 2: pv_any_nv<2>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 3: pv_any_nv<3>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 4: pv_any_nv<4>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 5: if constexpr (HCS_PV_MR >= 5) pv_any_nv<5>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 6: if constexpr (HCS_PV_MR >= 6) pv_any_nv<6>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 7: if constexpr (HCS_PV_MR >= 7) pv_any_nv<7>(nv, pt, nc, v, vs, o, os, alpha); break;
    case 8: if constexpr (HCS_PV_MR >= 8) pv_any_nv<8>(nv, pt, nc, v, vs, o, os, alpha); break;
    default: break;
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int64_t workspace_floats(int64_t d) {
  const int64_t dp = round_up(d, W);
  // Qt [d][QT], St [KB][QT], O [QT][dp], m/l/alpha [QT]; each rounded to whole cache lines
  return round_up(d * QT, 16) + KB * QT + QT * dp + 3 * QT + 64;
}

// Scores St[c][q] of keys c < nc for query vectors [qv_lo, qv_hi).
inline void scores(const float* k, int64_t d_len, const float* qt, float* st, int nc, int qv_lo, int qv_hi) {
  constexpr int MR = HCS_QK_MR, NV = HCS_QK_NV;
  int c = 0;
  for (; c + MR <= nc; c += MR) {
    int j = qv_lo;
    for (; j + NV <= qv_hi; j += NV) qk_tile<MR, NV>(k + c * d_len, d_len, qt + j * W, st + c * QT + j * W);
    if (j < qv_hi) qk_any_nv<MR>(qv_hi - j, k + c * d_len, d_len, qt + j * W, st + c * QT + j * W);
  }
  if (c < nc) {
    for (int j = qv_lo; j < qv_hi; j += NV) {
      const int nv = qv_hi - j < NV ? qv_hi - j : NV;
      qk_any(nc - c, nv, k + c * d_len, d_len, qt + j * W, st + c * QT + j * W);
    }
  }
}

// O rows [r_lo, r_hi) += P^T V over keys c < nc, after scaling by alpha.
inline void accumulate_pv(const float* st, int nc, const float* v, int64_t vs, float* o, int64_t dp,
                          const float* alpha, int r_lo, int r_hi) {
  constexpr int MR = HCS_PV_MR, NV = HCS_PV_NV;
  const int dv = static_cast<int>(dp / W);
  int r = r_lo;
  for (; r + MR <= r_hi; r += MR) {
    int j = 0;
    for (; j + NV <= dv; j += NV) pv_tile<MR, NV>(st + r, nc, v + j * W, vs, o + r * dp + j * W, dp, alpha + r);
    if (j < dv) pv_any_nv<MR>(dv - j, st + r, nc, v + j * W, vs, o + r * dp + j * W, dp, alpha + r);
  }
  if (r < r_hi) {
    for (int j = 0; j < dv; j += NV) {
      const int nv = dv - j < NV ? dv - j : NV;
      pv_any(r_hi - r, nv, st + r, nc, v + j * W, vs, o + r * dp + j * W, dp, alpha + r);
    }
  }
}

void run_item(const Problem& p, int64_t item, float* ws, int64_t counts[2]) {
  const int64_t per_batch = p.Hq * p.Mq;
  const int64_t b = item / per_batch;
  const int64_t h = (item % per_batch) / p.Mq;
  const int64_t qb = item % p.Mq;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t d_len = p.D;
  const int64_t dp = round_up(d_len, W);
  const int64_t r0 = qb * QT;
  const int rows = static_cast<int>(p.Nq - r0 < QT ? p.Nq - r0 : QT);
  const int qvecs = (rows + W - 1) / W;

  float* qt = ws;
  float* st = qt + round_up(d_len * QT, 16);
  float* o = st + KB * QT;
  float* m_run = o + QT * dp;
  float* l_run = m_run + QT;
  float* alpha = l_run + QT;

  // q tile, transposed and pre-scaled; padding lanes zero
  const int64_t q_off = ((b * p.Hq + h) * p.Nq + r0) * d_len;
  if (p.q_dtype == kF32) {
    const float* q = static_cast<const float*>(p.q) + q_off;
    for (int r = 0; r < rows; ++r)
      for (int64_t d = 0; d < d_len; ++d) qt[d * QT + r] = q[r * d_len + d] * p.scale_log2;
  } else {
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + q_off;
    for (int r = 0; r < rows; ++r)
      for (int64_t d = 0; d < d_len; ++d) qt[d * QT + r] = bf16_to_float(q[r * d_len + d]) * p.scale_log2;
  }
  for (int64_t d = 0; d < d_len; ++d)
    for (int r = rows; r < qvecs * W; ++r) qt[d * QT + r] = 0.0f;
  for (int r = 0; r < qvecs * W; ++r) {
    m_run[r] = -__builtin_inff();
    l_run[r] = 0.0f;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(rows) * dp; ++i) o[i] = 0.0f;

  const int64_t lut = (b * p.Hq + h) * p.Mq + qb;
  const int32_t count = p.kv_counts[lut];
  const int32_t* kv_idx = p.kv_indices + lut * p.Mk;
  const int64_t bk = p.Bk == 1 ? 0 : b;
  const float* k_head = p.k + (b * p.Hkv + hk) * p.Nk * d_len;
  const float* v_head = p.v + (b * p.Hkv + hk) * p.Nk * p.v_stride;
  const float thr = p.thr_log2[h];
  const bool skip_on = thr < __builtin_inff();
  const vf neg_thr = vsplat(-thr);
  const vf neg_inf = vsplat(-__builtin_inff());
  const vf pos_inf = vsplat(__builtin_inff());
  const vi iota = viota();
  const vi one = visplat(1);
  vi n_skipped = vi{};
  vi n_visited = vi{};

  for (int32_t t = 0; t < count; ++t) {
    const int64_t j = kv_idx[t];
    const int64_t c0 = j * KB;
    const int nc = static_cast<int>(p.Nk - c0 < KB ? p.Nk - c0 : KB);
    const int32_t first = p.first_valid[bk * p.Mk + j];
    if (first == INT32_MAX) continue;  // every key of the block is padded: not visited
    // causal: rows before the block's first usable key have no key here
    int row_lo = 0;
    if (p.causal && first > r0) row_lo = static_cast<int>(first - r0 < rows ? first - r0 : rows);
    if (row_lo >= rows) continue;
    const int qv_lo = row_lo / W;

    const float* kb = k_head + c0 * d_len;
    scores(kb, d_len, qt, st, nc, qv_lo, qvecs);

    if (p.block_partial[bk * p.Mk + j]) {
      const uint8_t* valid = p.key_valid + bk * p.Nk + c0;
      for (int c = 0; c < nc; ++c)
        if (!valid[c])
          for (int jv = qv_lo; jv < qvecs; ++jv) vstore(st + c * QT + jv * W, neg_inf);
    }
    if (p.causal && c0 + nc - 1 > r0 + row_lo) {
      for (int c = 0; c < nc; ++c) {
        const vi key = visplat(static_cast<int32_t>(c0 + c));
        for (int jv = qv_lo; jv < qvecs; ++jv) {
          const vi row = iota + static_cast<int32_t>(r0 + jv * W);
          const vf s = vload(st + c * QT + jv * W);
          vstore(st + c * QT + jv * W, row < key ? neg_inf : s);
        }
      }
    }

    // online softmax, one query per lane
    bool any_active = false;
    for (int jv = qv_lo; jv < qvecs; ++jv) {
      float* col = st + jv * W;
      vf bmax = neg_inf;
      for (int c = 0; c < nc; ++c) bmax = vmax(bmax, vload(col + c * QT));
      const vi row = iota + static_cast<int32_t>(r0 + jv * W);
      vi has_keys = row < static_cast<int32_t>(p.Nq);
      if (p.causal) has_keys &= row >= first;
      const vf m_old = vload(m_run + jv * W);
      n_visited += has_keys & one;
      vi active = has_keys;
      if (skip_on) {
        const vi skip = has_keys & (m_old > neg_inf) & ((bmax - m_old) < neg_thr);
        n_skipped += skip & one;
        active &= ~skip;
      }
      const vf m_new = vmax(m_old, bmax);
      active &= m_new > neg_inf;
      const vf m_use = active ? m_new : pos_inf;  // exp2(s - inf) = 0: inactive lanes add nothing
      const vf a = active ? vexp2(m_old - m_new) : vsplat(1.0f);
      vf sum = vf{};
      for (int c = 0; c < nc; ++c) {
        const vf e = vexp2(vload(col + c * QT) - m_use);
        vstore(col + c * QT, e);
        sum += e;
      }
      vstore(l_run + jv * W, vload(l_run + jv * W) * a + sum);
      vstore(m_run + jv * W, active ? m_new : m_old);
      vstore(alpha + jv * W, a);
      for (int i = 0; i < W; ++i) any_active |= active[i] != 0;
    }
    if (any_active) accumulate_pv(st, nc, v_head + c0 * p.v_stride, p.v_stride, o, dp, alpha, row_lo, rows);
  }

  int64_t skipped = 0, visited = 0;
  for (int i = 0; i < W; ++i) {
    skipped += n_skipped[i];
    visited += n_visited[i];
  }
  counts[0] += skipped;
  counts[1] += visited;

  // log-sum-exp in natural units: ln(sum 2^s) = ln2 * (m + log2 l), s in base-2 units
  if (p.lse != nullptr) {
    float* lse = p.lse + (b * p.Hq + h) * p.Nq + r0;
    for (int r = 0; r < rows; ++r)
      lse[r] = l_run[r] == 0.0f ? -__builtin_inff()
                                : 0.69314718055994531f * (m_run[r] + __builtin_log2f(l_run[r]));
  }

  // normalise and store; rows with no usable key (l == 0) are zeros
  const int64_t o_off = ((b * p.Hq + h) * p.Nq + r0) * d_len;
  for (int r = 0; r < rows; ++r) {
    const float l = l_run[r];
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    const float* src = o + r * dp;
    if (p.q_dtype == kF32) {
      float* dst = static_cast<float*>(p.out) + o_off + r * d_len;
      for (int64_t d = 0; d < d_len; ++d) dst[d] = src[d] * inv;
    } else {
      uint16_t* dst = static_cast<uint16_t*>(p.out) + o_off + r * d_len;
      for (int64_t d = 0; d < d_len; ++d) dst[d] = float_to_bf16(src[d] * inv);
    }
  }
}

const IsaKernel kKernel = {HCS_ISA_NAME, W, &workspace_floats, &run_item};

}  // namespace

const IsaKernel* HCS_KERNEL_FN() { return &kKernel; }

}  // namespace hcs_cpu
