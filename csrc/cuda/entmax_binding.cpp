// Torch binding of the alpha-entmax attention forward (entmax_fwd.cu), registered as
// torch.ops.hcs_entmax.cuda_forward with TORCH_LIBRARY_FRAGMENT (no edit of the
// extension's pybind module). Arguments and results as the CPU op (csrc/cpu/entmax_fwd.cpp):
// (q, k, v, key_padding_mask, bounds, seeds, alpha, scale, is_causal, tol, max_iters)
//   -> (out [B, Hq, Nq, D] in q's dtype, tau float32 [B, Hq, Nq], counts int64 [B, Hq, Mq, 4]).
// alpha's range (1, 2] is checked by the Python caller (ops/entmax.py check_alpha).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "entmax_fwd.h"

namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda() && t.device() == dev, "entmax cuda: ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, "entmax cuda: ", name, " must be 4-D [B, H, N, D], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "entmax cuda: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const c10::optional<at::Tensor>& key_padding_mask,
                                                            const at::Tensor& bounds, const at::Tensor& seeds,
                                                            const at::Tensor& alpha, double scale, bool is_causal,
                                                            double tol, int64_t max_iters) {
  const at::Device dev = q.device();
  check_operand(q, "q", dev);
  check_operand(k, "k", dev);
  check_operand(v, "v", dev);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "entmax cuda: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "entmax cuda: q, k and v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(D == 64 || D == 128, "entmax cuda: head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D,
              "entmax cuda: k and v must be [B, Hkv, Nk, D] matching q");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "entmax cuda: q heads must be a multiple of k/v heads");
  TORCH_CHECK(!is_causal || Nq == Nk, "entmax cuda: causal needs Nq == Nk");
  const int64_t Mq = (Nq + hcs_entmax::kBlockM - 1) / hcs_entmax::kBlockM;
  const int64_t Mk = (Nk + hcs_entmax::kBlockN - 1) / hcs_entmax::kBlockN;
  TORCH_CHECK(bounds.is_cuda() && bounds.device() == dev && bounds.scalar_type() == at::kFloat &&
                  bounds.is_contiguous() && bounds.dim() == 4 && bounds.size(0) == B && bounds.size(1) == Hq &&
                  bounds.size(2) == Mq && bounds.size(3) == Mk,
              "entmax cuda: bounds must be contiguous float32 [B, Hq, Mq, Mk] on q's device");
  TORCH_CHECK(seeds.is_cuda() && seeds.device() == dev && seeds.scalar_type() == at::kInt && seeds.is_contiguous() &&
                  seeds.dim() == 4 && seeds.size(0) == B && seeds.size(1) == Hq && seeds.size(2) == Mq &&
                  seeds.size(3) == 2,
              "entmax cuda: seeds must be contiguous int32 [B, Hq, Mq, 2] on q's device");
  TORCH_CHECK(alpha.is_cuda() && alpha.device() == dev && alpha.scalar_type() == at::kFloat &&
                  alpha.is_contiguous() && alpha.dim() == 1 && alpha.size(0) == Hq,
              "entmax cuda: alpha must be contiguous float32 [Hq] on q's device");
  TORCH_CHECK(max_iters >= 1, "entmax cuda: max_iters must be >= 1");
  TORCH_CHECK(Mq <= 65535 && Hq <= 65535 && B <= 65535, "entmax cuda: grid too large");
  const uint8_t* kpm = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.is_cuda() && m.device() == dev && m.scalar_type() == at::kBool && m.is_contiguous() &&
                    m.dim() == 2 && m.size(0) == B && m.size(1) == Nk,
                "entmax cuda: key_padding_mask must be contiguous bool [B, Nk] on q's device");
    kpm = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  }
  c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty_like(q);
  auto tau = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  auto counts = at::empty({B, Hq, Mq, 4}, q.options().dtype(at::kLong));
  hcs_entmax::EntmaxParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.q_bs = q.stride(0), p.q_hs = q.stride(1), p.q_rs = q.stride(2);
  p.k_bs = k.stride(0), p.k_hs = k.stride(1), p.k_rs = k.stride(2);
  p.v_bs = v.stride(0), p.v_hs = v.stride(1), p.v_rs = v.stride(2);
  p.o_bs = out.stride(0), p.o_hs = out.stride(1), p.o_rs = out.stride(2);
  p.kpm = kpm;
  p.bounds = bounds.data_ptr<float>();
  p.seeds = seeds.data_ptr<int32_t>();
  p.alpha = alpha.data_ptr<float>();
  p.tau = tau.data_ptr<float>();
  p.counts = counts.data_ptr<int64_t>();
  p.B = (int)B, p.Hq = (int)Hq, p.Hkv = (int)Hkv, p.Nq = (int)Nq, p.Nk = (int)Nk, p.Mq = (int)Mq, p.Mk = (int)Mk;
  p.scale = (float)scale;
  p.tol = (float)tol;
  p.max_iters = (int)max_iters;
  p.causal = is_causal ? 1 : 0;
  const cudaError_t err = hcs_entmax::launch_entmax_fwd(p, q.scalar_type() == at::kBFloat16 ? 0 : 1, (int)D,
                                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "entmax cuda: launch failed: ", cudaGetErrorString(err));
  return {out, tau, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hcs_entmax, m) {
  m.def("cuda_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor bounds, Tensor seeds, "
        "Tensor alpha, float scale, bool is_causal, float tol, int max_iters) -> (Tensor, Tensor, Tensor)",
        &cuda_forward);
}
