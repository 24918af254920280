// Decode-time KV-block sparse attention on CPU (in the manner of Quest).
//
// One decode step: every query head of a (batch, kv head) pair attends to the keys of the
// key blocks that hf_creative_sparse/ops/decode.py selected for that kv head (the blocks whose
// per-channel min/max bound scores highest for the current query, plus sink and recent
// blocks). Attention is memory-bound at decode time, so the point is to read only the kept
// blocks of K and V: each (batch, kv head) work item streams its kept blocks once for all
// of its query heads (GQA), with an online softmax in base 2.
//
// Registered as torch.ops.hcs_decode.decode_block_attention (a TORCH_LIBRARY fragment, so
// this file adds an op to the shared CPU extension without touching its Python module).
// Semantics: ops/decode.py `decode_block_attention_reference`.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace hcs_decode {
namespace {

// Everything validated by the driver; plain types only (the kernel below is compiled in
// several ISA clones and must not instantiate torch inline code).
struct DecodeProblem {
  int64_t B, Hq, Hkv, N, D, K, block;
  const float* q;  // [B, Hq, D] contiguous
  const float* k;  // [B, Hkv, N, D], last dim contiguous
  const float* v;
  int64_t k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  const int64_t* idx;    // [B, Hkv, K] kept block indices (any order, each < ceil(N / block))
  const uint8_t* valid;  // [B, N] 1 = attend, or nullptr (every key attendable)
  float scale_log2;      // softmax scale * log2(e)
  float* out;            // [B, Hq, D] contiguous
  float* lse;            // [B, Hq] natural-log log-sum-exp of the used keys, -inf for none
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One (batch, kv head) item. ws: G * (block + 2 * D + 2) floats.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void run_item(const DecodeProblem& p, int64_t item, float* ws) {
  const int64_t b = item / p.Hkv, h = item % p.Hkv, G = p.Hq / p.Hkv, D = p.D, T = p.block;
  float* qs = ws;              // [G, D] scaled queries
  float* acc = qs + G * D;     // [G, D] unnormalised output
  float* s = acc + G * D;      // [G, T] scores of the current block
  float* m = s + G * T;        // [G] running max (base 2)
  float* l = m + G;            // [G] running sum
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = p.q + ((b * p.Hq) + h * G + g) * D;
    for (int64_t d = 0; d < D; ++d) {
      qs[g * D + d] = qg[d] * p.scale_log2;
      acc[g * D + d] = 0.f;
    }
    m[g] = neg_inf;
    l[g] = 0.f;
  }
  const float* kb = p.k + b * p.k_sb + h * p.k_sh;
  const float* vb = p.v + b * p.v_sb + h * p.v_sh;
  const uint8_t* valid = p.valid != nullptr ? p.valid + b * p.N : nullptr;
  const int64_t* idx = p.idx + item * p.K;
  for (int64_t j = 0; j < p.K; ++j) {
    const int64_t t0 = idx[j] * T;
    const int64_t t1 = t0 + T < p.N ? t0 + T : p.N;
    if (t0 >= t1) continue;
    const int64_t n = t1 - t0;
    // scores: each key row is read once for all G query heads
    for (int64_t t = 0; t < n; ++t) {
      const float* kr = kb + (t0 + t) * p.k_sn;
      const bool ok = valid == nullptr || valid[t0 + t] != 0;
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.f;
        const float* qg = qs + g * D;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
        s[g * T + t] = ok ? dot : neg_inf;
      }
    }
    // online softmax: new max, rescale, probabilities
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float mx = m[g];
      for (int64_t t = 0; t < n; ++t) mx = s[g * T + t] > mx ? s[g * T + t] : mx;
      if (mx == neg_inf) {  // nothing attendable yet for this head: p would be NaN
        for (int64_t t = 0; t < n; ++t) s[g * T + t] = 0.f;
        continue;
      }
      any = true;
      const float corr = exp2f(m[g] - mx);  // m = -inf -> 0
      m[g] = mx;
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        const float e = exp2f(s[g * T + t] - mx);
        s[g * T + t] = e;
        sum += e;
      }
      l[g] = l[g] * corr + sum;
      float* ag = acc + g * D;
      if (corr != 1.f) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
      }
    }
    if (!any) continue;
    // P V: each value row is read once for all G query heads
    for (int64_t t = 0; t < n; ++t) {
      const float* vr = vb + (t0 + t) * p.v_sn;
      for (int64_t g = 0; g < G; ++g) {
        const float w = s[g * T + t];
        if (w == 0.f) continue;
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * vr[d];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* og = p.out + ((b * p.Hq) + h * G + g) * D;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d] * inv;
    p.lse[b * p.Hq + h * G + g] = l[g] > 0.f ? (m[g] + log2f(l[g])) * kLn2 : neg_inf;
  }
}

void check(bool ok, const char* msg) { TORCH_CHECK(ok, "hcs_decode.decode_block_attention: ", msg); }

// q [B, Hq, D], k/v [B, Hkv, N, D] float32 (last dim contiguous), block_idx int64 [B, Hkv, K],
// key_valid bool [B, N] or None -> (out float32 [B, Hq, D], lse float32 [B, Hq]).
std::tuple<at::Tensor, at::Tensor> decode_block_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& block_idx,
                                                          int64_t block_size,
                                                          const c10::optional<at::Tensor>& key_valid,
                                                          double scale) {
  check(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && block_idx.device().is_cpu(),
        "every tensor must be on the CPU");
  check(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
        "q, k and v must be float32");
  check(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q must be [B, Hq, D] and k, v [B, Hkv, N, D]");
  check(k.sizes() == v.sizes(), "k and v must have the same shape");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), N = k.size(2);
  check(k.size(0) == B && k.size(3) == D, "k must be [B, Hkv, N, D] with q's batch and head dim");
  check(Hkv > 0 && Hq % Hkv == 0, "the kv heads must divide the query heads");
  check(k.stride(3) == 1 && v.stride(3) == 1, "k and v need a contiguous last dim");
  check(block_size > 0, "block_size must be positive");
  check(block_idx.scalar_type() == at::kLong && block_idx.dim() == 3 && block_idx.size(0) == B &&
            block_idx.size(1) == Hkv,
        "block_idx must be int64 [B, Hkv, K]");
  const int64_t K = block_idx.size(2);
  const int64_t num_blocks = (N + block_size - 1) / block_size;
  at::Tensor idx = block_idx.contiguous();
  if (K > 0 && N > 0) {
    check(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < num_blocks,
          "block_idx entries must lie in [0, ceil(N / block_size))");
  }
  at::Tensor valid;
  if (key_valid.has_value() && key_valid->defined()) {
    check(key_valid->scalar_type() == at::kBool && key_valid->dim() == 2 && key_valid->size(0) == B &&
              key_valid->size(1) == N,
          "key_valid must be bool [B, N]");
    valid = key_valid->contiguous();
  }
  at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq}, q.options());
  DecodeProblem p{B, Hq, Hkv, N, D, K, block_size, qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                  idx.data_ptr<int64_t>(),
                  valid.defined() ? reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()) : nullptr,
                  static_cast<float>(scale) * kLog2e, out.data_ptr<float>(), lse.data_ptr<float>()};
  const int64_t G = Hq / Hkv;
  const int64_t ws_floats = G * (block_size + 2 * D + 2);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(static_cast<size_t>(ws_floats));
    for (int64_t item = begin; item < end; ++item) run_item(p, item, ws.data());
  });
  return {out, lse};
}


// Per-block min/max of keys [B, H, N, D] for blocks [first_block, ceil(N / block)), written
// into kmin/kmax (float32 [B, H, capacity, D], contiguous) and count (int32 [B, capacity]):
// the incremental update of ops/decode.py KeyBlockStats (one parallel region instead of a
// dozen small torch ops per layer and step). Padded keys count in no bound; a block with no
// attendable key gets min = max = 0 and count 0.
void decode_block_stats(const at::Tensor& k, const c10::optional<at::Tensor>& key_valid, int64_t block_size,
                        int64_t first_block, at::Tensor kmin, at::Tensor kmax, at::Tensor count) {
  check(k.device().is_cpu() && k.scalar_type() == at::kFloat && k.dim() == 4 && k.stride(3) == 1,
        "k must be a float32 CPU tensor [B, H, N, D] with a contiguous last dim");
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3);
  check(block_size > 0, "block_size must be positive");
  const int64_t nb = (N + block_size - 1) / block_size;
  check(first_block >= 0 && first_block <= nb, "first_block must lie in [0, ceil(N / block_size)]");
  for (const at::Tensor* t : {&kmin, &kmax})
    check(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
              t->size(1) == H && t->size(2) >= nb && t->size(3) == D,
          "kmin and kmax must be contiguous float32 [B, H, capacity >= ceil(N / block_size), D]");
  check(count.scalar_type() == at::kInt && count.is_contiguous() && count.dim() == 2 && count.size(0) == B &&
            count.size(1) == kmin.size(2),
        "count must be contiguous int32 [B, capacity]");
  at::Tensor valid;
  if (key_valid.has_value() && key_valid->defined()) {
    check(key_valid->scalar_type() == at::kBool && key_valid->dim() == 2 && key_valid->size(0) == B &&
              key_valid->size(1) == N,
          "key_valid must be bool [B, N]");
    valid = key_valid->contiguous();
  }
  const uint8_t* ok = valid.defined() ? reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()) : nullptr;
  const float* kp = k.data_ptr<float>();
  float* mn = kmin.data_ptr<float>();
  float* mx = kmax.data_ptr<float>();
  int32_t* cnt = count.data_ptr<int32_t>();
  const int64_t cap = kmin.size(2), ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t todo = nb - first_block;
  if (todo <= 0) return;
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H * todo, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = first_block + item % todo, bh = item / todo, b = bh / H, h = bh % H;
      float* lo = mn + ((bh * cap) + j) * D;
      float* hi = mx + ((bh * cap) + j) * D;
      for (int64_t d = 0; d < D; ++d) {
        lo[d] = inf;
        hi[d] = -inf;
      }
      const int64_t t0 = j * block_size, t1 = t0 + block_size < N ? t0 + block_size : N;
      int32_t n = 0;
      for (int64_t t = t0; t < t1; ++t) {
        if (ok != nullptr && ok[b * N + t] == 0) continue;
        ++n;
        const float* row = kp + b * ks0 + h * ks1 + t * ks2;
        for (int64_t d = 0; d < D; ++d) {
          lo[d] = row[d] < lo[d] ? row[d] : lo[d];
          hi[d] = row[d] > hi[d] ? row[d] : hi[d];
        }
      }
      if (n == 0)
        for (int64_t d = 0; d < D; ++d) lo[d] = hi[d] = 0.f;
      if (h == 0) cnt[b * cap + j] = n;
    }
  });
}

// Quest's bound summed over each kv head's query heads: q [B, Hq, D] (any float dtype, read as
// float32), kmin/kmax float32 [B, Hkv, capacity, D] contiguous, the first num_blocks used;
// count int32 [B, capacity] or None (a block with count 0 scores -inf) -> float32 [B, Hkv, num_blocks].
at::Tensor decode_block_scores(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax,
                               const c10::optional<at::Tensor>& count, int64_t num_blocks) {
  check(q.device().is_cpu() && q.dim() == 3, "q must be a CPU tensor [B, Hq, D]");
  check(kmin.sizes() == kmax.sizes() && kmin.scalar_type() == at::kFloat && kmax.scalar_type() == at::kFloat &&
            kmin.is_contiguous() && kmax.is_contiguous() && kmin.dim() == 4,
        "kmin and kmax must be contiguous float32 [B, Hkv, capacity, D] of one shape");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kmin.size(1), cap = kmin.size(2);
  check(kmin.size(0) == B && kmin.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
        "kmin must match q's batch and head dim, and its heads must divide q's");
  check(num_blocks >= 0 && num_blocks <= cap, "num_blocks must lie in [0, capacity]");
  const int32_t* cnt = nullptr;
  at::Tensor cc;
  if (count.has_value() && count->defined()) {
    check(count->scalar_type() == at::kInt && count->dim() == 2 && count->size(0) == B && count->size(1) == cap,
          "count must be int32 [B, capacity]");
    cc = count->contiguous();
    cnt = cc.data_ptr<int32_t>();
  }
  const int64_t G = Hq / Hkv;
  // positive and negative parts of the group's queries, summed over the group
  at::Tensor qg = q.to(at::kFloat).reshape({B, Hkv, G, D});
  at::Tensor pos = qg.clamp_min(0).sum(2).contiguous(), neg = qg.clamp_max(0).sum(2).contiguous();
  at::Tensor out = at::empty({B, Hkv, num_blocks}, q.options().dtype(at::kFloat));
  const float* pp = pos.data_ptr<float>();
  const float* np = neg.data_ptr<float>();
  const float* lo = kmin.data_ptr<float>();
  const float* hi = kmax.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv * num_blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item % num_blocks, bh = item / num_blocks, b = bh / Hkv;
      const float* a = pp + bh * D;
      const float* c = np + bh * D;
      const float* x = hi + (bh * cap + j) * D;
      const float* y = lo + (bh * cap + j) * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += a[d] * x[d] + c[d] * y[d];
      o[item] = (cnt != nullptr && cnt[b * cap + j] == 0) ? neg_inf : sum;
    }
  });
  return out;
}
}  // namespace
}  // namespace hcs_decode

TORCH_LIBRARY_FRAGMENT(hcs_decode, m) {
  m.def("decode_block_attention(Tensor q, Tensor k, Tensor v, Tensor block_idx, int block_size, Tensor? key_valid, "
        "float scale) -> (Tensor, Tensor)");
  m.def("decode_block_stats(Tensor k, Tensor? key_valid, int block_size, int first_block, Tensor(a!) kmin, "
        "Tensor(b!) kmax, Tensor(c!) count) -> ()");
  m.def("decode_block_scores(Tensor q, Tensor kmin, Tensor kmax, Tensor? count, int num_blocks) -> Tensor");
  m.impl("decode_block_attention", c10::DispatchKey::CPU, TORCH_FN(hcs_decode::decode_block_attention));
  m.impl("decode_block_stats", c10::DispatchKey::CPU, TORCH_FN(hcs_decode::decode_block_stats));
  m.impl("decode_block_scores", c10::DispatchKey::CPU, TORCH_FN(hcs_decode::decode_block_scores));
}
