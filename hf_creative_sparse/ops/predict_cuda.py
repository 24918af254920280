"""GPU pieces of block-mask prediction (SpargeAttn stage 1) from the CUDA extension.

`predict_cuda` is `masks.predict_from_inputs` for CUDA tensors in four launches: pooling
of Q and of K (`pool_blocks_cuda`: one pass each, the bulk of the memory traffic), the
compressed map pooled_q @ pooled_k^T (one batched matmul, GQA by reshaping, no repeat),
and one fused kernel per (batch, head, query block) row doing the candidate rules, the
softmax, the cdf or top-k selection (sort-free, by bisection on the probability bits, one
warp a row; a bitonic sort in shared memory beyond 1024 key blocks) and the keep rules (non-self-similar blocks, sink, dense prefix/suffix, causal diagonal). The
PyTorch path takes ~40 launches and ~1 ms of host time whatever the size.

Tolerance against the PyTorch path: sums run in a different order and the unit vectors
use a reciprocal square root, so pooled means, similarities and probabilities agree to
float32 rounding (relative ~1e-6), not bit for bit. A block's decision can differ only
where a similarity lies within that rounding of ``simthreshd1``, where a cumulative mass
lies within it of ``cdfthreshd``, or where two probabilities tie (the kernel breaks ties
by the lower block index, torch's sort by its own order); `tests/test_cuda_kernels.py`
measures the agreement (>= 99.9% of blocks on random inputs).

`mask_to_lut` replaces `masks.block_mask_to_lut` on CUDA tensors (exactly equal: the
kept indices in ascending order, tail zero-filled) with warp ballots instead of a sort.
"""

from __future__ import annotations

import torch

from .config import BLOCK_M, BLOCK_N
from ._ext import load_extension
from .inputs import AttentionInputs, per_head
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


#: The fused selection keeps a row of the compressed map in shared memory (8 KB per 1024
#: key blocks); longer inputs use the PyTorch path.
MAX_KEY_BLOCKS = 8192
#: Rows of up to this many key blocks are selected by one warp each, sort-free, in
#: registers (csrc/cuda/predict.cu, select_blocks_warp_kernel); longer ones by a CTA each
#: with a bitonic sort in shared memory.
WARP_SELECT_MAX_KEY_BLOCKS = 1024


_THRESHOLDS: dict[tuple, torch.Tensor] = {}


def _thresholds(name: str, value, heads: int, device: torch.device) -> torch.Tensor:
    """A threshold as float32 [heads] on ``device``; scalars are cached so a call costs no
    host-device round trip (`per_head` on the device would wait for the GPU to check NaN)."""
    if isinstance(value, torch.Tensor):
        return per_head(name, value.detach().cpu(), heads, torch.device("cpu")).to(device)
    key = (name, float(value), heads, str(device))
    cached = _THRESHOLDS.get(key)
    if cached is None:
        cached = per_head(name, float(value), heads, torch.device("cpu")).to(device)
        if len(_THRESHOLDS) < 256:
            _THRESHOLDS[key] = cached
    return cached


def predict_cuda(inp: AttentionInputs, *, simthreshd1, cdfthreshd, topk, attention_sink: bool, dense_prefix: int,
                 dense_suffix: int, smooth_k: bool) -> torch.Tensor | None:
    """`masks.predict_from_inputs` for CUDA inputs (same arguments and result, bool
    [B, Hq, Mq, Mk]), or None when the extension or the sizes do not allow it."""
    if not ENABLED or not inp.q.is_cuda or inp.head_dim > 256 or inp.num_k_blocks > MAX_KEY_BLOCKS:
        return None
    mod = _module()
    if mod is None:
        return None
    heads, dev = inp.heads_q, inp.device
    k = inp.k
    if smooth_k:
        k = k - k.float().mean(dim=-2, keepdim=True).to(k.dtype)
    pooled_q, sim_q, _ = mod.pool_blocks(inp.q, BLOCK_M, None)
    pooled_k, sim_k, count_k = mod.pool_blocks(k, BLOCK_N, inp.key_padding_mask)
    b, hkv, mk = inp.batch, inp.heads_kv, inp.num_k_blocks
    group = heads // hkv
    score = torch.matmul(pooled_q.view(b, hkv, group * inp.num_q_blocks, -1), pooled_k.transpose(-1, -2))
    score = score.view(b, heads, inp.num_q_blocks, mk)
    sim_thr = _thresholds("simthreshd1", simthreshd1, heads, dev)
    cdf = _thresholds("cdfthreshd", cdfthreshd, heads, dev) if topk is None else None
    top = _thresholds("topk", topk, heads, dev) if topk is not None else None
    return mod.select_blocks(score, sim_q, sim_k, count_k, sim_thr, cdf, top, float(inp.scale), inp.is_causal,
                             bool(attention_sink), int(dense_prefix), int(dense_suffix), inp.len_q, inp.len_k)


def mask_to_lut(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`masks.block_mask_to_lut` (counts int32 [..., Mq], ascending indices int32
    [..., Mq, Mk], tail zero), by the CUDA kernel on CUDA tensors when available."""
    mod = _module() if ENABLED and block_mask.is_cuda else None
    if mod is None:
        return block_mask_to_lut(block_mask)
    counts, indices = mod.mask_to_lut(block_mask)
    return counts, indices
