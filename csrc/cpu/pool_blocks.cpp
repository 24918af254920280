// The mask prediction's pooling on the CPU in one pass: per block of `block` tokens, the
// mean of the valid tokens and the mean pairwise cosine similarity |sum of unit vectors|^2
// / count^2 (self pairs included, as SpargeAttn), exactly what
// hf_creative_sparse/ops/masks.py `pool_blocks` computes with PyTorch ops.
//
// Why: the PyTorch version runs a dozen broadcasting elementwise ops over [B, H, N, D] and
// their temporaries (~5-8 ns per element on one core, ~10% of dense SDPA at B1 H8 N4096 D64,
// issue 18), more than the CPU policy's 4% prediction budget; this pass reads x once.
//
// Registered as torch.ops.hcs_cpu.pool_blocks(Tensor x, int block, Tensor? token_valid)
//   -> (pooled float32 [B, H, nb, D], similarity float32 [B, H, nb], count float32 [B, 1, nb]).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace hcs_cpu_pool {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_blocks(const at::Tensor& x_in, int64_t block,
                                                           const c10::optional<at::Tensor>& token_valid) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "hcs_cpu.pool_blocks: x must be a 4-D CPU tensor "
              "[B, H, N, D], got ", x_in.device(), " ", x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hcs_cpu.pool_blocks: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(block > 0, "hcs_cpu.pool_blocks: block must be > 0, got ", block);
  const int64_t B = x_in.size(0), H = x_in.size(1), N = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK(B > 0 && H > 0 && N > 0 && D > 0, "hcs_cpu.pool_blocks: x must not be empty, got ", x_in.sizes());
  const int64_t nb = (N + block - 1) / block;
  at::Tensor valid;
  if (token_valid.has_value()) {
    valid = *token_valid;
    TORCH_CHECK(valid.device().is_cpu() && valid.scalar_type() == at::kBool && valid.sizes() == at::IntArrayRef({B, N}),
                "hcs_cpu.pool_blocks: token_valid must be a CPU bool tensor [", B, ", ", N, "], got ",
                valid.scalar_type(), " ", valid.sizes());
    valid = valid.contiguous();
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor pooled = at::empty({B, H, nb, D}, opts);
  at::Tensor sim = at::empty({B, H, nb}, opts);
  at::Tensor count = at::empty({B, 1, nb}, opts);

  const bool* vp = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  float* cp = count.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t t1 = std::min(N, (j + 1) * block);
      int64_t c = t1 - j * block;
      if (vp != nullptr) {
        c = 0;
        for (int64_t t = j * block; t < t1; ++t) c += vp[b * N + t] ? 1 : 0;
      }
      cp[b * nb + j] = static_cast<float>(c);
    }

  const float* xp = x.data_ptr<float>();
  float* pp = pooled.data_ptr<float>();
  float* sp = sim.data_ptr<float>();
  const int64_t items = B * H * nb;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, block * D));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> unit_sum(D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / (H * nb), h = (it / nb) % H, j = it % nb;
      float* mean = pp + it * D;
      std::fill(mean, mean + D, 0.0f);
      std::fill(unit_sum.begin(), unit_sum.end(), 0.0f);
      const int64_t t1 = std::min(N, (j + 1) * block);
      for (int64_t t = j * block; t < t1; ++t) {
        if (vp != nullptr && !vp[b * N + t]) continue;
        const float* row = xp + ((b * H + h) * N + t) * D;
        // 8 partial sums: one dependent add chain over D would bound the pass by add latency
        float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        int64_t d0 = 0;
        for (; d0 + 8 <= D; d0 += 8)
          for (int i = 0; i < 8; ++i) part[i] += row[d0 + i] * row[d0 + i];
        for (; d0 < D; ++d0) part[0] += row[d0] * row[d0];
        const float n2 = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
        const float inv = 1.0f / std::max(std::sqrt(n2), 1e-12f);
        for (int64_t d = 0; d < D; ++d) {
          mean[d] += row[d];
          unit_sum[d] += row[d] * inv;
        }
      }
      const float c = cp[b * nb + j];
      const float inv_c = 1.0f / std::max(c, 1.0f);
      float s2 = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        mean[d] *= inv_c;
        s2 += unit_sum[d] * unit_sum[d];
      }
      sp[it] = s2 / std::max(c * c, 1.0f);
    }
  });
  return {pooled, sim, count};
}

}  // namespace
}  // namespace hcs_cpu_pool

TORCH_LIBRARY_FRAGMENT(hcs_cpu, m) {
  m.def("pool_blocks(Tensor x, int block, Tensor? token_valid) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hcs_cpu, CPU, m) { m.impl("pool_blocks", &hcs_cpu_pool::pool_blocks); }
