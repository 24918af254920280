// Torch binding of the CPU block-sparse attention forward.
//
// forward(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd)
//   -> (out, pv_counts, lse): the interface shared with the CUDA kernel; semantics are those of
//   hf_creative_sparse/ops/reference.py. This file validates, lays the operands out for the
//   ISA kernels (isa_*.cpp) and runs the (batch, head, query block) work items on torch's
//   intra-op thread pool (OpenMP in the standard builds) with dynamic scheduling.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "isa_kernel.h"

namespace hcs_cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::string(isa) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(isa) == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(isa) == "generic";
}

// Compiled-in kernels this CPU can run, best first.
std::vector<const IsaKernel*> usable_kernels() {
  std::vector<const IsaKernel*> out;
  for (const IsaKernel* k : {kernel_avx512(), kernel_avx2(), kernel_generic()})
    if (k != nullptr && cpu_has(k->name)) out.push_back(k);
  return out;
}

// `name` empty: HCS_CPU_ISA from the environment if set (to pin an instance), else the best.
const IsaKernel* pick_kernel(const std::string& requested) {
  const auto kernels = usable_kernels();
  TORCH_CHECK(!kernels.empty(), "hf_creative_sparse cpu: no kernel compiled for this CPU");
  const char* env = std::getenv("HCS_CPU_ISA");
  const std::string name = !requested.empty() ? requested : (env != nullptr ? env : "");
  if (name.empty()) return kernels.front();
  for (const IsaKernel* k : kernels)
    if (name == k->name) return k;
  std::string names;
  for (const IsaKernel* k : kernels) names += std::string(names.empty() ? "" : ", ") + k->name;
  TORCH_CHECK(false, "hf_creative_sparse cpu: isa (or HCS_CPU_ISA) must be one of [", names, "] on this CPU, got '",
              name, "'");
  return nullptr;
}

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, heads, seq, head_dim], got ", t.sizes());
}

struct KeyLayout {
  int64_t bk = 1;
  std::vector<uint8_t> valid;      // [bk, Nk]
  std::vector<int32_t> first;      // [bk, Mk]
  std::vector<uint8_t> partial;    // [bk, Mk]
};

KeyLayout key_layout(const c10::optional<at::Tensor>& kpm, int64_t B, int64_t Nk, int64_t Mk) {
  KeyLayout kl;
  if (!kpm.has_value()) {
    kl.first.resize(Mk);
    kl.partial.assign(Mk, 0);
    for (int64_t j = 0; j < Mk; ++j) kl.first[j] = static_cast<int32_t>(j * kBlockN);
    return kl;
  }
  const at::Tensor mask = kpm->contiguous();
  kl.bk = B;
  kl.valid.resize(B * Nk);
  const bool* src = mask.data_ptr<bool>();
  for (int64_t i = 0; i < B * Nk; ++i) kl.valid[i] = src[i] ? 1 : 0;
  kl.first.assign(B * Mk, std::numeric_limits<int32_t>::max());
  kl.partial.assign(B * Mk, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Mk; ++j) {
      const int64_t c1 = std::min(Nk, (j + 1) * kBlockN);
      for (int64_t c = c1 - 1; c >= j * kBlockN; --c) {
        if (kl.valid[b * Nk + c])
          kl.first[b * Mk + j] = static_cast<int32_t>(c);
        else
          kl.partial[b * Mk + j] = 1;
      }
    }
  return kl;
}

// Fills `out` (same shape and dtype as q, contiguous) and, when given, `lse` (float32
// [B, Hq, Nq] contiguous; docs/DESIGN.md "Partial softmax"); returns pv_counts int64 [2].
at::Tensor forward_into(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& kv_counts_in, const at::Tensor& kv_indices_in,
                        const c10::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale,
                        const at::Tensor& pvthreshd_in, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                        const std::string& isa) {
  check_4d(q_in, "q");
  check_4d(k_in, "k");
  check_4d(v_in, "v");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype, "q, k and v must share a dtype, got ",
              dtype, ", ", k_in.scalar_type(), ", ", v_in.scalar_type());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "k and v must have the same shape, got ", k_in.sizes(), " and ",
              v_in.sizes());
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D, "k must be [", B, ", Hkv, Nk, ", D, "], got ", k_in.sizes());
  TORCH_CHECK(B > 0 && Hq > 0 && Nq > 0 && D > 0 && Hkv > 0 && Nk > 0, "q, k and v must not be empty");
  TORCH_CHECK(Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  const int64_t Mq = (Nq + kBlockM - 1) / kBlockM, Mk = (Nk + kBlockN - 1) / kBlockN;

  TORCH_CHECK(kv_counts_in.device().is_cpu() && kv_counts_in.scalar_type() == at::kInt &&
                  kv_counts_in.sizes() == at::IntArrayRef({B, Hq, Mq}),
              "kv_counts must be a CPU int32 tensor [", B, ", ", Hq, ", ", Mq, "], got ", kv_counts_in.scalar_type(),
              " ", kv_counts_in.sizes());
  TORCH_CHECK(kv_indices_in.device().is_cpu() && kv_indices_in.scalar_type() == at::kInt &&
                  kv_indices_in.sizes() == at::IntArrayRef({B, Hq, Mq, Mk}),
              "kv_indices must be a CPU int32 tensor [", B, ", ", Hq, ", ", Mq, ", ", Mk, "], got ",
              kv_indices_in.scalar_type(), " ", kv_indices_in.sizes());
  TORCH_CHECK(pvthreshd_in.device().is_cpu() && pvthreshd_in.scalar_type() == at::kFloat &&
                  pvthreshd_in.dim() == 1 && pvthreshd_in.size(0) == Hq,
              "pvthreshd must be a CPU float32 tensor [", Hq, "], got ", pvthreshd_in.scalar_type(), " ",
              pvthreshd_in.sizes());
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.sizes() == at::IntArrayRef({B, Nk}),
                "key_padding_mask must be a CPU bool tensor [", B, ", ", Nk, "], got ", m.scalar_type(), " ",
                m.sizes());
  }
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype && out.sizes() == q_in.sizes() &&
                  out.is_contiguous(),
              "out must be a contiguous CPU tensor shaped and typed like q");
  if (lse.has_value())
    TORCH_CHECK(lse->device().is_cpu() && lse->scalar_type() == at::kFloat &&
                    lse->sizes() == at::IntArrayRef({B, Hq, Nq}) && lse->is_contiguous(),
                "lse must be a contiguous CPU float32 tensor [", B, ", ", Hq, ", ", Nq, "], got ",
                lse->scalar_type(), " ", lse->sizes());

  const IsaKernel* kernel = pick_kernel(isa);
  const int W = kernel->vec_width;

  // the block lists: ranges and ascending order are what the kernel relies on
  const at::Tensor kv_counts = kv_counts_in.contiguous();
  const at::Tensor kv_indices = kv_indices_in.contiguous();
  const int32_t* counts = kv_counts.data_ptr<int32_t>();
  const int32_t* indices = kv_indices.data_ptr<int32_t>();
  const int64_t n_items = B * Hq * Mq;
  for (int64_t it = 0; it < n_items; ++it) {
    const int32_t n = counts[it];
    TORCH_CHECK(n >= 0 && n <= Mk, "kv_counts must lie in [0, ", Mk, "], got ", n);
    const int32_t* row = indices + it * Mk;
    for (int32_t t = 0; t < n; ++t)
      TORCH_CHECK(row[t] >= 0 && row[t] < Mk && (t == 0 || row[t] > row[t - 1]),
                  "kv_indices must list strictly ascending key blocks in [0, ", Mk, ")");
  }

  // operands: q/out in float32 or bfloat16 (float16 goes through float32), k/v float32
  const bool half = dtype == at::kHalf;
  const at::Tensor q = half ? q_in.to(at::kFloat).contiguous() : q_in.contiguous();
  at::Tensor out_buf = half ? at::empty(q_in.sizes(), q_in.options().dtype(at::kFloat)) : out;
  const at::Tensor k = k_in.to(at::kFloat).contiguous();
  at::Tensor v = v_in.to(at::kFloat).contiguous();
  int64_t v_stride = D;
  if (D % W != 0) {
    v_stride = (D + W - 1) / W * W;
    at::Tensor padded = at::zeros({B, Hkv, Nk, v_stride}, v.options());
    padded.narrow(3, 0, D).copy_(v);
    v = padded;
  }
  const at::Tensor thr = (pvthreshd_in.contiguous() * static_cast<float>(M_LOG2E)).contiguous();
  const KeyLayout kl = key_layout(key_padding_mask, B, Nk, Mk);

  Problem p;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Nq = Nq; p.Nk = Nk; p.D = D; p.Mq = Mq; p.Mk = Mk;
  p.q_dtype = q.scalar_type() == at::kBFloat16 ? kBF16 : kF32;
  p.q = q.data_ptr();
  p.out = out_buf.data_ptr();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.v_stride = v_stride;
  p.kv_counts = counts;
  p.kv_indices = indices;
  p.Bk = kl.bk;
  p.key_valid = kl.valid.empty() ? nullptr : kl.valid.data();
  p.first_valid = kl.first.data();
  p.block_partial = kl.partial.data();
  p.causal = is_causal;
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.thr_log2 = thr.data_ptr<float>();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;

  // most expensive items first (longest-processing-time order), then dynamic pulls
  std::vector<int64_t> order(n_items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });

  std::atomic<int64_t> next{0};
  std::atomic<int64_t> skipped{0}, visited{0};
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  const int64_t ws_floats = kernel->workspace_floats(D);
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::unique_ptr<float[]> buf(new float[ws_floats + 16]);
      float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
      int64_t local[2] = {0, 0};
      for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) kernel->run_item(p, order[i], ws, local);
      skipped += local[0];
      visited += local[1];
    }
  });

  if (half) out.copy_(out_buf);
  return at::tensor({skipped.load(), visited.load()}, at::TensorOptions().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, const at::Tensor& kv_counts,
                                                       const at::Tensor& kv_indices,
                                                       const c10::optional<at::Tensor>& key_padding_mask,
                                                       bool is_causal, double scale, const at::Tensor& pvthreshd) {
  check_4d(q, "q");
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor pv =
      forward_into(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd, out, lse, "");
  return {out, pv, lse};
}

at::Tensor forward_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_counts,
                       const at::Tensor& kv_indices, const c10::optional<at::Tensor>& key_padding_mask,
                       bool is_causal, double scale, const at::Tensor& pvthreshd, at::Tensor out,
                       const std::string& isa, const c10::optional<at::Tensor>& lse) {
  return forward_into(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd, out, lse, isa);
}

// The instance a call with isa '' runs: HCS_CPU_ISA if set, else the best this CPU has.
std::string selected_isa() { return pick_kernel("")->name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const IsaKernel* k : usable_kernels()) names.emplace_back(k->name);
  return names;
}

}  // namespace
}  // namespace hcs_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_creative_sparse CPU block-sparse attention forward";
  m.def("forward", &hcs_cpu::forward,
        "Block-sparse attention forward -> (out, pv_counts int64 [skipped, visited], lse float32 [B, Hq, Nq])",
        py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("kv_counts"), py::arg("kv_indices"), py::arg("key_padding_mask"),
        py::arg("is_causal"), py::arg("scale"), py::arg("pvthreshd"));
  m.def("forward_out", &hcs_cpu::forward_out,
        "forward writing into a given contiguous `out` (shaped and typed like q) and, when given, `lse` "
        "(float32 [B, Hq, Nq]); returns pv_counts. `isa` picks a kernel from available_isas() ('' = the best)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_counts"), py::arg("kv_indices"),
        py::arg("key_padding_mask"), py::arg("is_causal"), py::arg("scale"), py::arg("pvthreshd"), py::arg("out"),
        py::arg("isa") = "", py::arg("lse") = py::none());
  m.def("available_isas", &hcs_cpu::available_isas, "Kernel instances this CPU can run, best first");
  m.def("selected_isa", &hcs_cpu::selected_isa,
        "The instance forward() runs: HCS_CPU_ISA when set (raises if this CPU lacks it), else the best");
}
