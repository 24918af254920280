// Interface between the torch-facing driver (sparse_attn.cpp) and the per-ISA kernels
// (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp).
//
// Plain C++ types only: the ISA translation units are compiled with target-specific code
// generation and must not instantiate torch or standard-library inline code (one copy of
// such code would be picked at link time and could hold instructions the CPU lacks).
#pragma once

#include <cstdint>

namespace hcs_cpu {

constexpr int kBlockM = 128;  // query rows per block (BLOCK_M)
constexpr int kBlockN = 64;   // keys per block (BLOCK_N)

enum DType : int { kF32 = 0, kBF16 = 1 };

// One forward call, everything already validated and laid out by the driver.
struct Problem {
  int64_t B, Hq, Hkv, Nq, Nk, D, Mq, Mk;
  int q_dtype;          // dtype of q and out: kF32 or kBF16
  const void* q;        // [B, Hq, Nq, D] contiguous
  void* out;            // [B, Hq, Nq, D] contiguous, same dtype as q
  const float* k;       // [B, Hkv, Nk, D] float32 contiguous
  const float* v;       // [B, Hkv, Nk, v_stride] float32; columns >= D are zero
  int64_t v_stride;     // >= D and a multiple of the kernel's vector width
  const int32_t* kv_counts;   // [B, Hq, Mq]
  const int32_t* kv_indices;  // [B, Hq, Mq, Mk], ascending kept key blocks
  int64_t Bk;                 // B with a key padding mask, else 1 (the arrays broadcast)
  const uint8_t* key_valid;   // [Bk, Nk] 1 = attend (read only in partial blocks)
  const int32_t* first_valid; // [Bk, Mk] first attendable key index of the block, INT32_MAX if none
  const uint8_t* block_partial;  // [Bk, Mk] 1 when some key of the block is padded
  bool causal;          // key c usable by row r iff c <= r
  float scale_log2;     // softmax scale * log2(e): scores are kept in base-2 units
  const float* thr_log2;  // [Hq] pvthreshd * log2(e); +inf turns the skip off
  float* lse;           // [B, Hq, Nq] float32 natural-log log-sum-exp of the used keys
                        // (-inf for a row with none), or nullptr when not wanted
};

struct IsaKernel {
  const char* name;
  int vec_width;  // floats per vector register; v_stride must be a multiple of it
  // Scratch floats one thread needs (64-byte aligned pointer expected).
  int64_t (*workspace_floats)(int64_t head_dim);
  // Computes output rows of one (batch, q head, query block) work item, item in
  // [0, B * Hq * Mq); adds (skipped, visited) pairs to counts.
  void (*run_item)(const Problem& p, int64_t item, float* workspace, int64_t counts[2]);
};

// nullptr when not compiled in (other architecture or compiler).
const IsaKernel* kernel_avx512();
const IsaKernel* kernel_avx2();
const IsaKernel* kernel_generic();

}  // namespace hcs_cpu
