// Python bindings of the CUDA extension: argument checks, head-dim padding, dispatch to the
// per-(dtype, head dim) launchers, and a check of every launch.
//
// forward(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd)
//   -> (out [B, Hq, Nq, D] in q's dtype, pv_counts int64 [2] = (skipped, visited),
//       lse float32 [B, Hq, Nq]: natural log-sum-exp of each row's used keys, -inf for none)
// Semantics: hf_creative_sparse/ops/reference.py; the pv skip is decided per warp of 16 rows
// (mma.sync) or per warpgroup of 64 rows (the Hopper kernels).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#include "block_sparse_fwd.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hf_creative_sparse CUDA: ", what, " failed: ", cudaGetErrorString(err));
}

// Smallest natively compiled head dim >= d.
int padded_head_dim(int64_t d) {
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  if (d <= 256) return 256;
  return -1;
}

// Kernel choice: 0 = auto (on sm_90a for head dims 64/128 and more than 2k keys the Hopper
// kernel, else mma.sync), 1 = mma.sync only, 2 = the Hopper kernel (error where
// unavailable). Set by tests and benchmarks.
int g_kernel_preference = 0;
// Which kernel the last forward ran: 1 = mma.sync (sm_80 style), 2 = the Hopper kernel
// (warp-specialized TMA + wgmma, sm_90a).
int g_last_kernel = 0;
// Probe bits for the warp-specialized kernel (FwdParams::probe); measurement only.
int g_probe = 0;
// At most this many CTAs in the Hopper kernel's persistent grid (0 = one per SM): tests
// shrink it so that every CTA walks several work items.
int g_max_ctas = 0;

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// 16-byte aligned rows (cp.async moves 16-byte chunks); copies only odd views.
at::Tensor aligned_rows(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < t.dim() - 1; ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_operand(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [B, H, N, D], got ", t.dim(), "-D");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& kv_counts, const at::Tensor& kv_indices,
                                const c10::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale,
                                const at::Tensor& pvthreshd) {
  const at::Device dev = q_in.device();
  check_operand(q_in, "q", dev);
  check_operand(k_in, "k", dev);
  check_operand(v_in, "v", dev);
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "q must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype, "q, k and v must share a dtype");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, "q, k and v must share the batch size");
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "k and v must have the same shape");
  TORCH_CHECK(k_in.size(3) == D, "q and k must share head_dim");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(Nq > 0 && Nk > 0 && D > 0 && B > 0, "q, k and v must not be empty");
  const int Dp = padded_head_dim(D);
  TORCH_CHECK(Dp > 0, "head_dim must be <= 256 for the CUDA kernels, got ", D);
  TORCH_CHECK(B <= 65535 && Hq <= 65535, "batch and heads must be <= 65535");
  const int64_t Mq = (Nq + hcs::kBlockM - 1) / hcs::kBlockM;
  TORCH_CHECK(kv_counts.is_cuda() && kv_counts.device() == dev && kv_counts.scalar_type() == at::kInt &&
                  kv_counts.is_contiguous() && kv_counts.dim() == 3 && kv_counts.size(0) == B &&
                  kv_counts.size(1) == Hq && kv_counts.size(2) == Mq,
              "kv_counts must be a contiguous int32 CUDA tensor [B, Hq, ceil(Nq/128)] = [", B, ", ", Hq, ", ", Mq,
              "], got ", kv_counts.sizes(), " ", kv_counts.scalar_type());
  TORCH_CHECK(kv_indices.is_cuda() && kv_indices.device() == dev && kv_indices.scalar_type() == at::kInt &&
                  kv_indices.is_contiguous() && kv_indices.dim() == 4 && kv_indices.size(0) == B &&
                  kv_indices.size(1) == Hq && kv_indices.size(2) == Mq && kv_indices.size(3) >= 1,
              "kv_indices must be a contiguous int32 CUDA tensor [B, Hq, ceil(Nq/128), L], got ", kv_indices.sizes(),
              " ", kv_indices.scalar_type());
  TORCH_CHECK(pvthreshd.is_cuda() && pvthreshd.device() == dev && pvthreshd.scalar_type() == at::kFloat &&
                  pvthreshd.is_contiguous() && pvthreshd.dim() == 1 && pvthreshd.size(0) == Hq,
              "pvthreshd must be a contiguous float32 CUDA tensor [Hq]");
  at::Tensor kpm;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    kpm = key_padding_mask->contiguous();
    TORCH_CHECK(kpm.is_cuda() && kpm.device() == dev && kpm.scalar_type() == at::kBool && kpm.dim() == 2 &&
                    kpm.size(0) == B && kpm.size(1) == Nk,
                "key_padding_mask must be a bool CUDA tensor [B, Nk] = [", B, ", ", Nk, "]");
  }

  c10::cuda::CUDAGuard guard(dev);
  at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  if (Dp != D) {  // zero columns change no score; the caller's scale is kept
    q = at::constant_pad_nd(q, {0, Dp - D});
    k = at::constant_pad_nd(k, {0, Dp - D});
    v = at::constant_pad_nd(v, {0, Dp - D});
  }
  auto out = at::empty({B, Hq, Nq, Dp}, q.options());
  auto pv_counts = at::zeros({2}, q.options().dtype(at::kLong));
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));  // every row written by the kernel

  hcs::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), "internal: out and lse must be contiguous (FwdParams::lse)");
  p.q_bs = q.stride(0), p.q_hs = q.stride(1), p.q_rs = q.stride(2);
  p.k_bs = k.stride(0), p.k_hs = k.stride(1), p.k_rs = k.stride(2);
  p.v_bs = v.stride(0), p.v_hs = v.stride(1), p.v_rs = v.stride(2);
  p.o_bs = out.stride(0), p.o_hs = out.stride(1), p.o_rs = out.stride(2);
  p.kv_counts = kv_counts.data_ptr<int32_t>();
  p.kv_indices = kv_indices.data_ptr<int32_t>();
  p.lut_stride = kv_indices.size(3);
  p.kpm = kpm.defined() ? reinterpret_cast<const uint8_t*>(kpm.data_ptr<bool>()) : nullptr;
  p.kpm_bs = kpm.defined() ? kpm.stride(0) : 0;
  p.pvthreshd = pvthreshd.data_ptr<float>();
  p.pv_counts = reinterpret_cast<unsigned long long*>(pv_counts.data_ptr<int64_t>());
  p.B = (int)B, p.Hq = (int)Hq, p.Hkv = (int)Hkv, p.Nq = (int)Nq, p.Nk = (int)Nk, p.Mq = (int)Mq;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.causal = is_causal ? 1 : 0;
  p.probe = g_probe;
  p.max_ctas = g_max_ctas;
  TORCH_CHECK(Nq < (1LL << 31) && Nk < (1LL << 31), "sequence lengths must fit in int32");

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaErrorNotSupported;
  const bool bf16 = dtype == at::kBFloat16;
  // auto: the Hopper kernel, falling through to mma.sync on cudaErrorNotSupported. Up to 2k
  // keys auto keeps mma.sync: with few tiles per CTA the Hopper kernel's set-up does not
  // pay (H200, GPT-2 causal 1k: 0.055-0.070 ms against 0.082-0.086 at kept 12-26%).
  const bool hopper_dim = Dp == 64 || Dp == 128;
  if ((g_kernel_preference == 2 || (g_kernel_preference == 0 && Nk > 2048)) && hopper_dim) {
    if (Dp == 64) err = bf16 ? hcs::launch_fwd_sm90_bf16_d64(p, stream) : hcs::launch_fwd_sm90_fp16_d64(p, stream);
    else err = bf16 ? hcs::launch_fwd_sm90_bf16_d128(p, stream) : hcs::launch_fwd_sm90_fp16_d128(p, stream);
    TORCH_CHECK(err == cudaSuccess || (err == cudaErrorNotSupported && g_kernel_preference == 0),
                "hf_creative_sparse CUDA: the Hopper (sm_90a) kernel failed or is unavailable: ", cudaGetErrorString(err));
    if (err == cudaSuccess) g_last_kernel = 2;
  }
  if (err == cudaErrorNotSupported) {
    g_last_kernel = 1;
    if (Dp == 64) err = bf16 ? hcs::launch_fwd_bf16_d64(p, stream) : hcs::launch_fwd_fp16_d64(p, stream);
    else if (Dp == 128) err = bf16 ? hcs::launch_fwd_bf16_d128(p, stream) : hcs::launch_fwd_fp16_d128(p, stream);
    else err = bf16 ? hcs::launch_fwd_bf16_d256(p, stream) : hcs::launch_fwd_fp16_d256(p, stream);
  }
  check_cuda(err, "block_sparse_fwd launch");
  if (Dp != D) out = out.narrow(3, 0, D).contiguous();
  return {out, pv_counts, lse};
}

std::vector<at::Tensor> pool_blocks(const at::Tensor& x_in, int64_t block, const c10::optional<at::Tensor>& valid_in) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4, "x must be a 4-D CUDA tensor [B, H, N, D]");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "x must be float32, float16 or bfloat16");
  TORCH_CHECK(block > 0 && block <= 1024, "block must be in [1, 1024]");
  const int64_t B = x_in.size(0), H = x_in.size(1), N = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK(D <= 256, "pool_blocks supports head_dim <= 256, got ", D);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor valid;
  if (valid_in.has_value() && valid_in->defined()) {
    valid = valid_in->contiguous();
    TORCH_CHECK(valid.is_cuda() && valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B &&
                    valid.size(1) == N,
                "valid must be a bool CUDA tensor [B, N]");
  }
  const int64_t nb = (N + block - 1) / block;
  auto f32 = x.options().dtype(at::kFloat);
  auto pooled = at::empty({B, H, nb, D}, f32);
  auto sim = at::empty({B, H, nb}, f32);
  auto count = at::empty({B, 1, nb}, f32);
  hcs::PoolParams p{};
  p.x = x.data_ptr();
  p.x_bs = x.stride(0), p.x_hs = x.stride(1), p.x_rs = x.stride(2);
  p.valid = valid.defined() ? reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()) : nullptr;
  p.valid_bs = valid.defined() ? valid.stride(0) : 0;
  p.pooled = pooled.data_ptr<float>();
  p.sim = sim.data_ptr<float>();
  p.count = count.data_ptr<float>();
  p.B = (int)B, p.H = (int)H, p.N = (int)N, p.D = (int)D, p.block = (int)block, p.nb = (int)nb;
  p.dtype = dtype == at::kFloat ? 0 : (dtype == at::kHalf ? 1 : 2);
  check_cuda(hcs::launch_pool_blocks(p, c10::cuda::getCurrentCUDAStream().stream()), "pool_blocks launch");
  return {pooled, sim, count};
}

at::Tensor select_blocks(const at::Tensor& score, const at::Tensor& sim_q, const at::Tensor& sim_k,
                         const at::Tensor& count_k, const at::Tensor& simthr, const c10::optional<at::Tensor>& cdf,
                         const c10::optional<at::Tensor>& topk, double scale, bool causal, bool sink, int64_t prefix,
                         int64_t suffix, int64_t nq, int64_t nk) {
  auto f32c = [](const at::Tensor& t, const char* name, int dims) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dims, name,
                " must be a contiguous float32 CUDA tensor with ", dims, " dims");
  };
  f32c(score, "score", 4);
  f32c(sim_q, "sim_q", 3);
  f32c(sim_k, "sim_k", 3);
  f32c(count_k, "count_k", 3);
  f32c(simthr, "simthr", 1);
  const bool use_topk = topk.has_value() && topk->defined();
  TORCH_CHECK(use_topk != (cdf.has_value() && cdf->defined()), "exactly one of cdf and topk must be given");
  const at::Tensor& thr = use_topk ? *topk : *cdf;
  f32c(thr, use_topk ? "topk" : "cdf", 1);
  const int64_t B = score.size(0), H = score.size(1), Mq = score.size(2), Mk = score.size(3), Hkv = sim_k.size(1);
  TORCH_CHECK(sim_q.size(0) == B && sim_q.size(1) == H && sim_q.size(2) == Mq, "sim_q must be [B, H, Mq]");
  TORCH_CHECK(sim_k.size(0) == B && sim_k.size(2) == Mk && Hkv > 0 && H % Hkv == 0, "sim_k must be [B, Hkv, Mk]");
  TORCH_CHECK(count_k.size(0) == B && count_k.size(2) == Mk, "count_k must be [B, 1, Mk]");
  TORCH_CHECK(simthr.size(0) == H && thr.size(0) == H, "thresholds must be [H]");
  int64_t mkp = 2;
  while (mkp < Mk) mkp <<= 1;
  TORCH_CHECK(mkp <= 8192, "select_blocks supports up to 8192 key blocks, got ", Mk);
  c10::cuda::CUDAGuard guard(score.device());
  auto mask = at::empty({B, H, Mq, Mk}, score.options().dtype(at::kBool));
  hcs::SelectParams p{};
  p.score = score.data_ptr<float>();
  p.sim_q = sim_q.data_ptr<float>();
  p.sim_k = sim_k.data_ptr<float>();
  p.count_k = count_k.data_ptr<float>();
  p.simthr = simthr.data_ptr<float>();
  p.cdf = use_topk ? nullptr : thr.data_ptr<float>();
  p.topk = use_topk ? thr.data_ptr<float>() : nullptr;
  p.mask = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  p.B = (int)B, p.H = (int)H, p.Hkv = (int)Hkv, p.Mq = (int)Mq, p.Mk = (int)Mk, p.Nq = (int)nq, p.Nk = (int)nk;
  p.mkp = (int)mkp;
  p.scale = (float)scale;
  p.causal = causal, p.sink = sink, p.prefix = (int)prefix, p.suffix = (int)suffix;
  check_cuda(hcs::launch_select_blocks(p, c10::cuda::getCurrentCUDAStream().stream()), "select_blocks launch");
  return mask;
}

std::vector<at::Tensor> mask_to_lut(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.is_cuda() && mask_in.scalar_type() == at::kBool && mask_in.dim() >= 1,
              "mask must be a bool CUDA tensor [..., Mk]");
  c10::cuda::CUDAGuard guard(mask_in.device());
  at::Tensor mask = mask_in.contiguous();
  const int64_t mk = mask.size(-1);
  const int64_t rows = mk ? mask.numel() / mk : 0;
  auto counts_shape = mask.sizes().vec();
  counts_shape.pop_back();
  auto i32 = mask.options().dtype(at::kInt);
  auto counts = at::empty(counts_shape, i32);
  auto indices = at::empty(mask.sizes(), i32);
  check_cuda(hcs::launch_mask_to_lut(reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), rows, (int)mk,
                                     counts.data_ptr<int32_t>(), indices.data_ptr<int32_t>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "mask_to_lut launch");
  return {counts, indices};
}

void set_kernel_preference(int64_t pref) {
  TORCH_CHECK(pref >= 0 && pref <= 2, "kernel preference must be 0 (auto), 1 (mma.sync) or 2 (Hopper), got ", pref);
  g_kernel_preference = (int)pref;
}

void set_probe(int64_t bits) {
  TORCH_CHECK(bits >= 0 && bits <= 3, "probe bits must be in 0..3 (1: no softmax, 2: no K/V loads), got ", bits);
  g_probe = (int)bits;
}

void set_max_ctas(int64_t n) {
  TORCH_CHECK(n >= 0 && n < (1LL << 20), "max_ctas must be 0 (one CTA per SM) or a positive CTA count, got ", n);
  g_max_ctas = (int)n;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_creative_sparse CUDA kernels: block-sparse attention forward and mask-prediction helpers";
  m.def("forward", &forward, "block-sparse attention forward", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv_counts"), py::arg("kv_indices"), py::arg("key_padding_mask"), py::arg("is_causal"),
        py::arg("scale"), py::arg("pvthreshd"));
  m.def("pool_blocks", &pool_blocks, "per-block mean, mean cosine similarity and count", py::arg("x"),
        py::arg("block"), py::arg("valid"));
  m.def("set_kernel_preference", &set_kernel_preference,
        "0 = auto, 1 = mma.sync, 2 = the Hopper kernel (warp-specialized TMA + wgmma)");
  m.def("set_probe", &set_probe, "measurement only: FwdParams::probe bits");
  m.def("set_max_ctas", &set_max_ctas, "the Hopper kernel's persistent grid size cap (0 = one CTA per SM)");
  m.def("last_kernel", []() { return g_last_kernel; },
        "kernel of the last forward: 1 = mma.sync, 2 = the Hopper kernel");
  m.def("select_blocks", &select_blocks, "fused block selection of the predictor -> bool block mask",
        py::arg("score"), py::arg("sim_q"), py::arg("sim_k"), py::arg("count_k"), py::arg("simthr"), py::arg("cdf"),
        py::arg("topk"), py::arg("scale"), py::arg("causal"), py::arg("sink"), py::arg("prefix"), py::arg("suffix"),
        py::arg("nq"), py::arg("nk"));
  m.def("mask_to_lut", &mask_to_lut, "bool block mask -> (counts, ascending indices)", py::arg("mask"));
}
