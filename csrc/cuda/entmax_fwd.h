// Parameters and launcher of the alpha-entmax attention forward (host-visible, no device
// code), shared by the binding (entmax_binding.cpp) and the kernel (entmax_fwd.cu).
// Algorithm and semantics: hf_creative_sparse/ops/entmax.py.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace hcs_entmax {

constexpr int kBlockM = 128;  // query rows per CTA (the package's block mask granularity)
constexpr int kBlockN = 64;   // keys per block
constexpr int kThreads = 256; // 8 warps of 16 rows

struct EntmaxParams {
  const void* q;  // [B, Hq, Nq, D], element strides below, last dim contiguous
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;  // [B, Hkv, Nk, D]
  void* o;        // [B, Hq, Nq, D]
  int64_t q_bs, q_hs, q_rs;
  int64_t k_bs, k_hs, k_rs;
  int64_t v_bs, v_hs, v_rs;
  int64_t o_bs, o_hs, o_rs;
  const uint8_t* kpm;     // [B, Nk] bool (1 = attend) or nullptr
  const float* bounds;    // [B, Hq, Mq, Mk] upper bounds of scale * q.k per block pair, -inf = none
  const int32_t* seeds;   // [B, Hq, Mq, 2] seed key blocks, -1 = unused
  const float* alpha;     // [Hq], in (1, 2]
  float* tau;             // [B, Hq, Nq] out, entmax units
  int64_t* counts;        // [B, Hq, Mq, 4] out: scored blocks, blocks with a non-zero, passes, non-zeros
  int B, Hq, Hkv, Nq, Nk, Mq, Mk;
  float scale;
  float tol;        // Newton stops once sum p - 1 <= tol
  int max_iters;    // at most this many Newton passes
  int causal;       // top-left aligned: key c usable by row r iff c <= r
};

// dtype: 0 bfloat16, 1 float16; head_dim 64 or 128. Returns the launch's error.
cudaError_t launch_entmax_fwd(const EntmaxParams& p, int dtype, int head_dim, cudaStream_t stream);

}  // namespace hcs_entmax
