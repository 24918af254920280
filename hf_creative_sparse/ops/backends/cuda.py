"""The compiled CUDA backend: csrc/cuda's block-sparse flash-attention forward.

Built on first use on a CUDA machine (`_ext.load_extension("cuda")`, ninja, cached); a
failed build becomes this backend's unavailable reason and ``auto`` moves on to flex.
float16/bfloat16, head dims 64/128/256 natively (others zero-padded to the next one with
the caller's scale), GQA, causal, key padding and the pv-threshold skip. Forward only;
returns each row's log-sum-exp too (docs/DESIGN.md "Partial softmax").
Two kernels, both with the pv skip decided per warp of 16 rows: on Hopper (sm_90a) the
persistent warp-specialized TMA + wgmma kernel for head dims 64 and 128 beyond 2k keys
(csrc/cuda/block_sparse_fwd_sm90ws.cuh), else the sm_80-style mma.sync kernel
(block_sparse_fwd.cuh).

The dispatcher prefers this backend over flex only where it measured faster: see
`SLOWER_THAN_FLEX` and BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from .._ext import load_extension
from ..dispatch import BackendResult, why_not
from ..inputs import AttentionInputs

#: Head dims the kernel has instances for; others are zero-padded to the next one.
NATIVE_HEAD_DIMS = (64, 128, 256)
MAX_HEAD_DIM = 256
#: Smallest compute capability with the instructions the kernel uses (mma.sync bf16, cp.async).
MIN_CAPABILITY = (8, 0)
#: (condition, reason) rules where the benchmark (benchmarks/gpu_check.py, BENCHMARKS.md)
#: measured this kernel slower than FlexAttention on the same block mask; `auto` then
#: prefers flex, but only where flex can run the call (it cannot do the pv skip below
#: pvthreshd 20). Measured on an H200 from 4.6k keys on: the warp-specialized Hopper
#: kernel runs 500-585 TFLOP/s per kept block at head dims 65-128 (padded to 128) against
#: flex's 340-400 (1.26-1.58x flex); at head dim 64 it is 1.05-1.27x flex at 17.8k keys
#: (CogVideoX) but 0.89-1.02x at 32k keys, so flex keeps head dim 64 beyond 24k keys; below
#: 64 the padding wastes its work, and without sm_90a (the mma.sync kernel, ~200-290) flex
#: is 1.3-1.9x faster. At 1k keys (GPT-2, causal) the mma.sync kernel is 1.1-1.6x faster
#: than flex at kept <= 50%.
SLOWER_THAN_FLEX: tuple = (
    (lambda inp: inp.len_k >= 2048 and not (_hopper(inp) and _hopper_wins(inp.head_dim, inp.len_k)),
     "measured slower than FlexAttention for len_k >= 2048 except on Hopper at head dims 65-128, and 64 up "
     "to 24k keys (BENCHMARKS.md): auto prefers flex"),
)


def _hopper_wins(head_dim: int, len_k: int) -> bool:
    """Where the Hopper kernel measured faster than flex (see `SLOWER_THAN_FLEX`)."""
    return 64 < head_dim <= 128 or (head_dim == 64 and len_k <= 24576)


def _hopper(inp: AttentionInputs) -> bool:
    """Whether the warp-specialized sm_90a kernel serves this call's device."""
    return inp.q.is_cuda and torch.cuda.get_device_capability(inp.device) == (9, 0)


class CudaBackend:
    """Block-sparse attention on CUDA tensors through the compiled kernel."""

    name = "cuda"
    returns_lse = True  # docs/DESIGN.md "Partial softmax"

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            return f"the CUDA kernels need compute capability >= 8.0 (Ampere), this GPU has {cap[0]}.{cap[1]}"
        return load_extension("cuda").error

    def unsupported_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        if not inp.q.is_cuda:
            return f"the cuda kernel needs CUDA tensors, got q on {inp.device}"
        if inp.dtype not in (torch.float16, torch.bfloat16):
            return f"the cuda kernel takes float16/bfloat16, got {inp.dtype} (flex and the reference take float32)"
        if inp.head_dim > MAX_HEAD_DIM:
            return f"head_dim {inp.head_dim} > {MAX_HEAD_DIM} is not supported by the cuda kernel"
        if torch.cuda.get_device_capability(inp.device) < MIN_CAPABILITY:
            return "the cuda kernel needs compute capability >= 8.0"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, inp.k, inp.v)):
            return "the cuda kernel is forward-only and q/k/v require grad (flex and the reference support autograd)"
        return None

    def auto_skip_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        """Why ``backend="auto"`` should pass over this kernel although it could run the
        call: where it measured slower than FlexAttention. A named ``backend="cuda"``
        still runs it."""
        for slower, reason in SLOWER_THAN_FLEX:
            if slower(inp) and why_not("flex", inp, pvthreshd) is None:
                return reason
        return None

    def run(self, inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: torch.Tensor) -> BackendResult:
        from ..custom_ops import block_sparse_fwd
        from ..predict_cuda import mask_to_lut

        kv_counts, kv_indices = mask_to_lut(block_mask)
        pv = pvthreshd.to(device=inp.device, dtype=torch.float32).contiguous()
        # Eager calls skip the custom-op dispatch (tens of microseconds of host time); under
        # torch.compile the op keeps attention inside the graph.
        fwd = block_sparse_fwd if torch.compiler.is_compiling() else load_extension("cuda").module.forward
        out, pv_counts, lse = fwd(inp.q, inp.k, inp.v, kv_counts, kv_indices, inp.key_padding_mask,
                                  inp.is_causal, inp.scale, pv)
        # the counts stay on the device: reading them here would wait for the kernel and leave
        # the GPU idle while the host prepares what follows (compensation)
        return BackendResult(out=out, lse=lse, pv_counts=pv_counts)


BACKEND = CudaBackend()
