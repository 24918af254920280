"""CPU piece of block-mask prediction: `masks.pool_blocks` for CPU tensors in one pass of
the compiled CPU extension (csrc/cpu/pool_blocks.cpp), as `predict_cuda.pool_blocks_cuda`
is on the GPU.

Why: pooling dominates the prediction on a CPU, and the PyTorch version (a dozen
broadcasting elementwise ops and their temporaries) costs ~5-8 ns per element of q and k
on one core: ~10% of dense SDPA at B1 H8 N4096 D64, beyond the 4% the CPU policy allows
the prediction (ops/cpu_policy.py). One pass that reads x once costs a fraction of that.

Tolerance against the PyTorch path: the sums run in another order, so means and
similarities agree to float32 rounding (relative ~1e-6), not bit for bit.

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.predict_cpu import pool_blocks_cpu
    >>> pooled, sim, count = pool_blocks_cpu(torch.randn(1, 2, 300, 64), 128, None)
    >>> pooled.shape, sim.shape, count.shape
    (torch.Size([1, 2, 3, 64]), torch.Size([1, 2, 3]), torch.Size([1, 1, 3]))
"""

from __future__ import annotations

import torch

from ._ext import load_extension

#: Set to False to pool through the PyTorch code (tests compare the two).
ENABLED = True


def pool_blocks_cpu(x: torch.Tensor, block: int,
                    token_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`masks.pool_blocks` on a CPU tensor, or None when the extension is unavailable (or
    x is not a floating CPU tensor this pass takes).

    Args:
        x: [B, H, N, D] float32/bfloat16/float16 CPU tensor.
        block: tokens per block (> 0).
        token_valid: bool [B, N] (True = counts) or None.

    Returns:
        (pooled [B, H, nb, D] float32, similarity [B, H, nb], count [B, 1, nb]).
    """
    if not ENABLED or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if load_extension("cpu").module is None:  # loading it registers torch.ops.hcs_cpu
        return None
    pooled, sim, count = torch.ops.hcs_cpu.pool_blocks(x, int(block), token_valid)
    return pooled, sim, count


__all__ = ["pool_blocks_cpu"]
