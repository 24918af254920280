// alpha-entmax attention forward on CPU: bounds -> lower bound on tau -> exact tau -> p V.
//
// torch.ops.hcs_entmax.cpu_forward(q, k, v, key_padding_mask, bounds, seeds, alpha, scale,
//   is_causal, tol, max_iters) -> (out, tau, counts). Semantics and the algorithm:
// hf_creative_sparse/ops/entmax.py (its module docstring). Per (batch, q head, query block
// of 128 rows) work item:
//   1. score the seed blocks exactly: tau_lo(row) = max X - 1 (X = (alpha - 1) * scale * q.k),
//      a lower bound on the row's tau;
//   2. candidates: key blocks whose score bound (alpha - 1) * U exceeds the smallest tau_lo of
//      the block's rows (the others hold only exact zeros and are never scored);
//   3. score the candidates into the workspace; per row, Newton on f(t) = sum [X - t]_+^beta
//      from the lower bound (convex, decreasing: iterates stay below the root), with a
//      bisection step when Newton is slow (alpha near 1);
//   4. out = sum p v / sum p over the candidates.
// Registered with TORCH_LIBRARY_FRAGMENT so it needs no edit of the extension's pybind module.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa_kernel.h"  // kBlockM, kBlockN: the package's block sizes

namespace hcs_entmax_cpu {
namespace {

using hcs_cpu::kBlockM;
using hcs_cpu::kBlockN;
constexpr float kInf = std::numeric_limits<float>::infinity();

// z^beta for z > 0 with the common exponents exact and cheap.
inline double powb(double z, double beta) {
  if (beta == 2.0) return z * z;
  if (beta == 1.0) return z;
  return std::pow(z, beta);
}

struct Problem {
  int64_t B, Hq, Hkv, Nq, Nk, D, Mq, Mk;
  const float *q, *k, *v, *bounds, *alpha;
  const int32_t* seeds;
  const bool* kpm;  // [B, Nk] or nullptr
  float scale;
  bool causal;
  double tol;
  int64_t max_iters;
  float *out, *tau;
  int64_t* counts;
};

// f(t) - 1 and |f'(t)| of one row's scores x[0..n) (entries -inf contribute nothing).
inline void row_f(const float* x, int64_t n, double t, double beta, double& f, double& fp) {
  if (beta == 2.0) {  // alpha 1.5: branch-free, four partial sums (no -ffast-math to reorder one)
    const float tf = (float)t;
    float f4[4] = {0.f, 0.f, 0.f, 0.f}, g4[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t c = 0;
    for (; c + 4 <= n; c += 4)
      for (int i = 0; i < 4; ++i) {
        const float z = std::max(x[c + i] - tf, 0.f);
        f4[i] += z * z;
        g4[i] += z;
      }
    for (; c < n; ++c) {
      const float z = std::max(x[c] - tf, 0.f);
      f4[0] += z * z;
      g4[0] += z;
    }
    f = (double)((f4[0] + f4[1]) + (f4[2] + f4[3])) - 1.0;
    fp = 2.0 * (double)((g4[0] + g4[1]) + (g4[2] + g4[3]));
    return;
  }
  f = 0.0;
  fp = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double z = (double)x[c] - t;
    if (z > 0.0) {
      const double zb1 = beta == 1.0 ? 1.0 : std::pow(z, beta - 1.0);
      f += zb1 * z;
      fp += zb1;
    }
  }
  f -= 1.0;
  fp *= beta;
}

void run_item(const Problem& p, int64_t item, std::vector<float>& ws, std::vector<int32_t>& cand) {
  const int64_t qb = item % p.Mq, h = (item / p.Mq) % p.Hq, b = item / (p.Mq * p.Hq);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t r0 = qb * kBlockM, r1 = std::min<int64_t>(r0 + kBlockM, p.Nq), rows = r1 - r0;
  const double am1 = (double)p.alpha[h] - 1.0, beta = 1.0 / am1;
  const float xs = (float)(am1 * p.scale);  // score -> entmax units
  const float* qh = p.q + ((b * p.Hq + h) * p.Nq) * p.D;
  const float* kh = p.k + ((b * p.Hkv + hk) * p.Nk) * p.D;
  const float* vh = p.v + ((b * p.Hkv + hk) * p.Nk) * p.D;
  const float* ub = p.bounds + ((b * p.Hq + h) * p.Mq + qb) * p.Mk;
  const int32_t* seed = p.seeds + ((b * p.Hq + h) * p.Mq + qb) * 2;
  const bool* valid = p.kpm ? p.kpm + b * p.Nk : nullptr;
  float* tau_out = p.tau + (b * p.Hq + h) * p.Nq;
  int64_t* counts = p.counts + item * 4;

  auto usable = [&](int64_t r, int64_t c) {
    return c < p.Nk && (!p.causal || c <= r) && (valid == nullptr || valid[c]);
  };

  // 1. Lower bounds on tau from the seed blocks (their scores by BLAS).
  const at::Tensor q_blk = at::from_blob(const_cast<float*>(qh + r0 * p.D), {rows, p.D}, at::kFloat);
  std::vector<double> lo(rows, -kInf);
  for (int s = 0; s < 2; ++s) {
    const int32_t j = seed[s];
    if (j < 0) continue;
    const int64_t c0 = (int64_t)j * kBlockN, n_keys = std::min<int64_t>(kBlockN, p.Nk - c0);
    const at::Tensor k_blk = at::from_blob(const_cast<float*>(kh + c0 * p.D), {n_keys, p.D}, at::kFloat);
    const at::Tensor sc = at::mm(q_blk, k_blk.t()).contiguous();
    const float* sp = sc.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n_keys; ++c)
        if (usable(r0 + r, c0 + c)) lo[r] = std::max(lo[r], (double)(xs * sp[r * n_keys + c]) - 1.0);
  }
  double lo_min = kInf;
  for (int64_t r = 0; r < rows; ++r) lo_min = std::min(lo_min, lo[r]);

  // 2. Candidate key blocks. The margin covers rounding between the bounds (computed in
  // torch) and the scores here; it can only keep more blocks.
  cand.clear();
  for (int64_t j = 0; j < p.Mk; ++j) {
    if (!std::isfinite(ub[j])) continue;
    const double xub = am1 * (double)ub[j];
    if (xub + 1e-4 * (1.0 + std::fabs(xub)) > lo_min) cand.push_back((int32_t)j);
  }
  const int64_t nc = (int64_t)cand.size() * kBlockN;
  if ((int64_t)ws.size() < rows * nc) ws.resize(rows * nc);

  // 3. Scores of the candidates, -inf where not attendable: the candidate keys and values
  // gathered into contiguous [nc, D] buffers, S = Q K^T by BLAS (single-threaded here:
  // the work items already run in parallel).
  at::Tensor kc = at::zeros({nc, p.D}, at::kFloat), vc = at::zeros({nc, p.D}, at::kFloat);
  for (size_t t = 0; t < cand.size(); ++t) {
    const int64_t c0 = (int64_t)cand[t] * kBlockN, n_keys = std::min<int64_t>(kBlockN, p.Nk - c0);
    std::copy(kh + c0 * p.D, kh + (c0 + n_keys) * p.D, kc.data_ptr<float>() + t * kBlockN * p.D);
    std::copy(vh + c0 * p.D, vh + (c0 + n_keys) * p.D, vc.data_ptr<float>() + t * kBlockN * p.D);
  }
  at::Tensor scores = at::from_blob(ws.data(), {rows, nc}, at::kFloat);
  if (nc > 0) at::mm_out(scores, q_blk, kc.t());
  for (int64_t r = 0; r < rows; ++r) {
    float* x = ws.data() + r * nc;
    for (size_t t = 0; t < cand.size(); ++t)
      for (int64_t cc = 0; cc < kBlockN; ++cc) {
        const int64_t c = (int64_t)cand[t] * kBlockN + cc;
        float& xv = x[t * kBlockN + cc];
        xv = usable(r0 + r, c) ? xs * xv : -kInf;
      }
  }

  // 4. tau per row; the weights overwrite the scores, then out = P V / sum p by BLAS.
  std::vector<uint8_t> alive(cand.size(), 0);
  std::vector<float> inv_sum(rows, 0.f);
  int64_t max_iters_used = 0, nnz = 0;
  for (int64_t r = 0; r < rows; ++r) {
    float* x = ws.data() + r * nc;
    double xmax = -kInf;
    int64_t n = 0;
    for (int64_t c = 0; c < nc; ++c)
      if (x[c] != -kInf) {
        xmax = std::max(xmax, (double)x[c]);
        ++n;
      }
    if (n == 0) {  // no attendable key: zeros, never NaN
      std::fill(x, x + nc, 0.f);
      tau_out[r0 + r] = -kInf;
      continue;
    }
    double t_lo = std::max(lo[r], xmax - 1.0);
    double t_hi = xmax - std::pow((double)n, -am1);
    int64_t it = 0;
    for (; it < p.max_iters; ++it) {
      double f, fp;
      row_f(x, nc, t_lo, beta, f, fp);
      if (f <= p.tol || fp <= 0.0) break;
      const double t_newton = std::min(t_lo + f / fp, t_hi);
      // Newton is slow far from tau when beta is large (alpha near 1): also bisect there.
      if (beta > 2.0 && t_newton - t_lo < 0.25 * (t_hi - t_lo)) {
        const double mid = 0.5 * (t_newton + t_hi);
        double fm, fpm;
        row_f(x, nc, mid, beta, fm, fpm);
        if (fm >= 0.0) {
          t_lo = mid;  // the root is at least mid
        } else {
          t_hi = mid;
          t_lo = t_newton;
        }
      } else {
        t_lo = t_newton;
      }
    }
    max_iters_used = std::max(max_iters_used, it);
    tau_out[r0 + r] = (float)t_lo;
    double sum = 0.0;
    for (int64_t c = 0; c < nc; ++c) {
      const double z = (double)x[c] - t_lo;
      if (z <= 0.0) {  // exact zero (also -inf: not attendable)
        x[c] = 0.f;
        continue;
      }
      x[c] = (float)powb(z, beta);
      sum += x[c];
      ++nnz;
      alive[c / kBlockN] = 1;
    }
    inv_sum[r] = sum > 0.0 ? (float)(1.0 / sum) : 0.f;
  }
  at::Tensor out_blk = at::from_blob(p.out + ((b * p.Hq + h) * p.Nq + r0) * p.D, {rows, p.D}, at::kFloat);
  if (nc > 0) {
    at::mm_out(out_blk, scores, vc);
    out_blk.mul_(at::from_blob(inv_sum.data(), {rows, 1}, at::kFloat));
  } else {
    out_blk.zero_();
  }
  int64_t n_alive = 0;
  for (uint8_t a : alive) n_alive += a;
  counts[0] = (int64_t)cand.size();
  counts[1] = n_alive;
  counts[2] = max_iters_used;
  counts[3] = nnz;
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "entmax cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "entmax cpu: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "entmax cpu: ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "entmax cpu: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const c10::optional<at::Tensor>& key_padding_mask,
                                                           const at::Tensor& bounds, const at::Tensor& seeds,
                                                           const at::Tensor& alpha, double scale, bool is_causal,
                                                           double tol, int64_t max_iters) {
  check_f32(q, "q", 4);
  check_f32(k, "k", 4);
  check_f32(v, "v", 4);
  check_f32(bounds, "bounds", 4);
  check_f32(alpha, "alpha", 1);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  const int64_t Mq = (Nq + kBlockM - 1) / kBlockM, Mk = (Nk + kBlockN - 1) / kBlockN;
  TORCH_CHECK(k.sizes() == v.sizes(), "entmax cpu: k and v must have the same shape");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "entmax cpu: k must be [B, Hkv, Nk, D] matching q");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "entmax cpu: q heads must be a multiple of k/v heads");
  TORCH_CHECK(!is_causal || Nq == Nk, "entmax cpu: causal needs Nq == Nk");
  TORCH_CHECK(bounds.size(0) == B && bounds.size(1) == Hq && bounds.size(2) == Mq && bounds.size(3) == Mk,
              "entmax cpu: bounds must be [B, Hq, Mq, Mk]");
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kInt && seeds.is_contiguous() &&
                  seeds.dim() == 4 && seeds.size(0) == B && seeds.size(1) == Hq && seeds.size(2) == Mq &&
                  seeds.size(3) == 2,
              "entmax cpu: seeds must be contiguous int32 [B, Hq, Mq, 2]");
  TORCH_CHECK(alpha.size(0) == Hq, "entmax cpu: alpha must have one value per q head");
  TORCH_CHECK((alpha > 1.0).all().item<bool>() && (alpha <= 2.0).all().item<bool>(),
              "entmax cpu: alpha must lie in (1, 2]");
  TORCH_CHECK(max_iters >= 1, "entmax cpu: max_iters must be >= 1");
  const int64_t smin = seeds.numel() ? seeds.min().item<int32_t>() : 0;
  const int64_t smax = seeds.numel() ? seeds.max().item<int32_t>() : 0;
  TORCH_CHECK(smin >= -1 && smax < Mk, "entmax cpu: seeds must be -1 or key block indices");
  const bool* kpm = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 &&
                    m.size(0) == B && m.size(1) == Nk,
                "entmax cpu: key_padding_mask must be contiguous bool [B, Nk]");
    kpm = m.data_ptr<bool>();
  }
  auto out = at::empty_like(q);
  auto tau = at::empty({B, Hq, Nq}, q.options());
  auto counts = at::zeros({B, Hq, Mq, 4}, q.options().dtype(at::kLong));
  Problem p{B, Hq, Hkv, Nq, Nk, D, Mq, Mk,
            q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), bounds.data_ptr<float>(),
            alpha.data_ptr<float>(), seeds.data_ptr<int32_t>(), kpm, (float)scale, is_causal, tol, max_iters,
            out.data_ptr<float>(), tau.data_ptr<float>(), counts.data_ptr<int64_t>()};
  at::parallel_for(0, B * Hq * Mq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws;
    std::vector<int32_t> cand;
    for (int64_t item = begin; item < end; ++item) run_item(p, item, ws, cand);
  });
  return {out, tau, counts};
}

}  // namespace
}  // namespace hcs_entmax_cpu

TORCH_LIBRARY_FRAGMENT(hcs_entmax, m) {
  m.def("cpu_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor bounds, Tensor seeds, "
        "Tensor alpha, float scale, bool is_causal, float tol, int max_iters) -> (Tensor, Tensor, Tensor)",
        &hcs_entmax_cpu::cpu_forward);
}
