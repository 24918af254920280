"""The compiled CPU backend: csrc/cpu's block-sparse flash-attention forward.

Built on first use (see `_ext.load_extension`); when the build fails the backend reports
the cause as its unavailable reason, so ``backend="auto"`` falls back to the reference and
``backend="cpu"`` raises with that cause. Forward only: calls that need gradients go to
the reference backend, which autograd can differentiate.

The extension holds AVX-512, AVX2 and baseline instances of the kernel and runs the best
one the CPU supports; ``HCS_CPU_ISA=avx2`` (or ``generic``) pins a narrower one.
"""

from __future__ import annotations

import torch

from .._ext import load_extension
from ..dispatch import BackendResult
from ..inputs import AttentionInputs
from ..masks import block_mask_to_lut


class CpuBackend:
    """Block-sparse attention on CPU tensors with the compiled kernel (AVX-512/AVX2/baseline)."""

    name = "cpu"
    returns_lse = True  # docs/DESIGN.md "Partial softmax"

    def unavailable_reason(self) -> str | None:
        return load_extension("cpu").error

    def unsupported_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        if inp.device.type != "cpu":
            return f"the cpu kernel needs CPU tensors, got q on {inp.device}"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, inp.k, inp.v)):
            return "the cpu kernel is forward-only and q/k/v require grad (the reference backend supports autograd)"
        return None

    def run(self, inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: torch.Tensor) -> BackendResult:
        status = load_extension("cpu")
        if status.module is None:
            raise RuntimeError(f"the cpu backend is unavailable: {status.error}")
        kv_counts, kv_indices = block_mask_to_lut(block_mask)
        # Under torch.compile the registered op (ops/custom_ops.py) keeps attention in the graph.
        if torch.compiler.is_compiling():
            from ..custom_ops import block_sparse_fwd as fwd
        else:
            fwd = status.module.forward
        out, pv_counts, lse = fwd(
            inp.q.contiguous(), inp.k.contiguous(), inp.v.contiguous(), kv_counts, kv_indices,
            inp.key_padding_mask, inp.is_causal, inp.scale, pvthreshd.to(torch.float32).contiguous())
        skipped, visited = pv_counts.tolist()
        return BackendResult(out=out, pv_skipped=skipped, pv_visited=visited, lse=lse)


BACKEND = CpuBackend()
