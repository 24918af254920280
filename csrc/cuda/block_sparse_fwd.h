// Parameters and launchers of the block-sparse attention forward (host-visible, no CUDA
// device code), shared by the binding (bindings.cpp) and the per-type instantiations.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace hcs {

// Query blocks of 128 rows, key blocks of 64 keys (the block mask's granularity).
constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
// From this pvthreshd on a skipped block's weights (< exp(-20) ~ 2e-9 of the row's largest)
// are far under 16-bit rounding: the skip cannot change the output (ops/backend_flex.py's
// PV_EXACT_THRESHOLD).
constexpr float kPvExactThreshold = 20.f;
constexpr int kThreads = 256;  // 8 warps, 16 query rows each
constexpr float kLn2 = 0.6931471805599453f;

#ifdef __CUDACC__
// A row's log-sum-exp (docs/DESIGN.md "Partial softmax") from the online softmax's state:
// m is the running max in scaled log2 units, l the row sum of exp2(x - m). One store per
// row, by the lane that holds it (the epilogue of both kernels).
__device__ __forceinline__ float row_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}
#endif

struct FwdParams {
  const void* q;  // [B, Hq, Nq, D], element strides below, last dim contiguous
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;  // [B, Hkv, Nk, D]
  void* o;        // [B, Hq, Nq, D]
  // [B, Hq, Nq] contiguous: natural log-sum-exp of each row's used keys (-inf: none). o is
  // the binding's contiguous [B, Hq, Nq, D] tensor, so (b, h)'s lse row starts at o's
  // offset / D (the mma.sync kernel uses that).
  float* lse;
  int64_t q_bs, q_hs, q_rs;
  int64_t k_bs, k_hs, k_rs;
  int64_t v_bs, v_hs, v_rs;
  int64_t o_bs, o_hs, o_rs;
  const int32_t* kv_counts;   // [B, Hq, Mq]
  const int32_t* kv_indices;  // [B, Hq, Mq, lut_stride], ascending kept key blocks
  int64_t lut_stride;
  const uint8_t* kpm;  // [B, Nk] bool (1 = attend) or nullptr
  int64_t kpm_bs;
  const float* pvthreshd;            // [Hq]; inf disables the skip
  unsigned long long* pv_counts;     // [2]: skipped, visited (row, block) pairs
  int B, Hq, Hkv, Nq, Nk, Mq;
  float scale_log2;  // softmax scale * log2(e)
  int causal;        // top-left aligned: key c usable by row r iff c <= r
  int probe;         // measurement only (0 in use): bit 0 skips the softmax, bit 1 the K/V loads after the first ring
  int max_ctas;      // persistent Hopper grid: at most this many CTAs (0 = one per SM); tests set it
};

#ifdef __CUDACC__
// The query block a work item serves and its kept key blocks, ascending. Item x of a head
// is query block x, except that causal calls start from the last query block: it visits
// the most key blocks. Grids of (Mq, Hq, B) CTAs take their item from blockIdx; persistent
// grids pass (x, h, b) of the item.
struct LutRow {
  int qb, h, b, hk, count;
  const int32_t* idx;
  __device__ LutRow(const FwdParams& p, int x, int head, int batch)
      : qb(p.causal ? (p.Mq - 1 - x) : x), h(head), b(batch), hk(head / (p.Hq / p.Hkv)) {
    const int64_t row_id = ((int64_t)b * p.Hq + h) * p.Mq + qb;
    count = p.kv_counts[row_id];
    idx = p.kv_indices + row_id * p.lut_stride;
  }
  __device__ explicit LutRow(const FwdParams& p) : LutRow(p, (int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z) {}
};
#endif

// One launcher per (dtype, head dim); defined in block_sparse_fwd_<dtype>_d<D>.cu.
// Returns the launch's cudaError_t (cudaSuccess when it was queued).
cudaError_t launch_fwd_bf16_d64(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_bf16_d128(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_bf16_d256(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_fp16_d64(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_fp16_d128(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_fp16_d256(const FwdParams& p, cudaStream_t stream);

// Hopper instances for head dims 64 and 128: the warp-specialized kernel (TMA producer,
// two wgmma consumer warpgroups, 128-key tiles; block_sparse_fwd_sm90ws.cuh). They return
// cudaErrorNotSupported where sm_90a code is missing or TMA cannot address the operands;
// the caller then runs the mma.sync kernel.
cudaError_t launch_fwd_sm90_bf16_d64(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_sm90_bf16_d128(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_sm90_fp16_d64(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_fwd_sm90_fp16_d128(const FwdParams& p, cudaStream_t stream);

// Mask prediction helpers (predict.cu).
struct PoolParams {
  const void* x;  // [B, H, N, D], last dim contiguous
  int64_t x_bs, x_hs, x_rs;
  const uint8_t* valid;  // [B, N] or nullptr
  int64_t valid_bs;
  float* pooled;  // [B, H, nb, D]
  float* sim;     // [B, H, nb]
  float* count;   // [B, nb]
  int B, H, N, D, block, nb;
  int dtype;  // 0 float32, 1 float16, 2 bfloat16
};
cudaError_t launch_pool_blocks(const PoolParams& p, cudaStream_t stream);

// Per (b, h, query block): candidates, softmax of the compressed map, cdf/top-k selection
// and the keep rules of masks.predict_from_inputs -> bool mask row.
struct SelectParams {
  const float* score;    // [B, H, Mq, Mk] pooled_q @ pooled_k^T (unscaled)
  const float* sim_q;    // [B, H, Mq]
  const float* sim_k;    // [B, Hkv, Mk]
  const float* count_k;  // [B, Mk] attendable keys per key block
  const float* simthr;   // [H]
  const float* cdf;      // [H] or nullptr (then topk)
  const float* topk;     // [H] or nullptr
  uint8_t* mask;         // [B, H, Mq, Mk]
  int B, H, Hkv, Mq, Mk, Nq, Nk, mkp;  // mkp: power of two >= Mk
  float scale;
  int causal, sink, prefix, suffix;
};
cudaError_t launch_select_blocks(const SelectParams& p, cudaStream_t stream);

// bool mask [rows, Mk] -> counts [rows], ascending indices [rows, Mk] (tail zero-filled).
cudaError_t launch_mask_to_lut(const uint8_t* mask, int64_t rows, int mk, int32_t* counts, int32_t* indices,
                               cudaStream_t stream);

}  // namespace hcs
