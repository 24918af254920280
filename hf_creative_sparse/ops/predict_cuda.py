"""GPU pieces of block-mask prediction (SpargeAttn stage 1) from the CUDA extension.

`pool_blocks_cuda` replaces `masks.pool_blocks` on CUDA tensors: one pass over Q or K
(the bulk of prediction's memory traffic) instead of a dozen elementwise launches with
float32 copies. The rest of the prediction (a [Mq, Mk] score map per head, softmax, the
cdf/top-k selection) works on tensors thousands of times smaller and stays in PyTorch.

Tolerance against the PyTorch path: the sums run in a different order and the unit
vectors use a reciprocal square root, so pooled means and similarities agree to float32
rounding (relative ~1e-6), not bit for bit. A block's decision can differ only where a
similarity lies within that rounding of ``simthreshd1`` or two compressed-map
probabilities tie to rounding; `tests/test_cuda_kernels.py` measures the agreement.

`mask_to_lut` replaces `masks.block_mask_to_lut` on CUDA tensors (exactly equal: the
kept indices in ascending order, tail zero-filled) with warp ballots instead of a sort.
"""

from __future__ import annotations

import torch

from ._ext import load_extension
from .masks import block_mask_to_lut

#: Set to False to run prediction through the PyTorch code (tests compare the two).
ENABLED = True


def _module():
    if not torch.cuda.is_available():
        return None
    return load_extension("cuda").module


def pool_blocks_cuda(x: torch.Tensor, block: int,
                     token_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`masks.pool_blocks` on a CUDA tensor, or None when the extension is unavailable.

    Args:
        x: [B, H, N, D] float32/float16/bfloat16 CUDA tensor, D <= 256.
        block: tokens per block.
        token_valid: bool [B, N] (True = counts) or None.

    Returns:
        (pooled [B, H, nb, D] float32, similarity [B, H, nb], count [B, 1, nb]).
    """
    if not ENABLED or not x.is_cuda or x.shape[-1] > 256:
        return None
    mod = _module()
    if mod is None:
        return None
    pooled, sim, count = mod.pool_blocks(x, block, token_valid)
    return pooled, sim, count


def mask_to_lut(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`masks.block_mask_to_lut` (counts int32 [..., Mq], ascending indices int32
    [..., Mq, Mk], tail zero), by the CUDA kernel on CUDA tensors when available."""
    mod = _module() if ENABLED and block_mask.is_cuda else None
    if mod is None:
        return block_mask_to_lut(block_mask)
    counts, indices = mod.mask_to_lut(block_mask)
    return counts, indices
