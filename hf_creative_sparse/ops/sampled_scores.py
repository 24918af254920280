"""Block ranking from a few exact query rows per block ("sample" ranking; docs/DESIGN.md).

Mean pooling ranks key blocks by pooled_q . pooled_k, and a 128-row query block's mean
query (or a 64-key block's mean key) cancels what makes its rows sharp: on video-like
inputs a temporal head's rows each attend their own position in every frame, and their
mean attends nothing in particular. Measured on the structured inputs of
benchmarks/realistic_inputs.py (CogVideoX grid, top-k 25% of key blocks, compensated): mean
ranking L1 0.061, Quest's bound 0.080, 8 exact rows per block 0.026, the oracle (true block
mass of all 128 rows) 0.023; temporal heads 0.036 -> 0.0007.

So each query block is ranked by S rows (``SAMPLED_ROWS_PER_BLOCK``, evenly spaced in the
block) whose softmax against every key is computed exactly: per key block the share of
each row's attention mass, averaged over the rows. Cost: S / 128 of the dense QK^T (S = 8:
1/16, about 3% of the dense attention FLOPs) and no P V; on CUDA one Triton kernel
(`sampled_block_stats_triton`) streams K once per tile of sampled rows and writes only the
per-(row, key block) maximum and sum.

Causal inputs stay strictly causal: query block i is ranked by block i - 1's rows (all
before block i's first row), with the causal mask applied to their own scores.

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.inputs import attention_inputs
    >>> from hf_creative_sparse.ops.sampled_scores import sampled_block_mass
    >>> q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    >>> mass = sampled_block_mass(attention_inputs(q, k, k))
    >>> tuple(mass.shape), bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 3)))
    ((1, 2, 3, 5), True)
"""

from __future__ import annotations

import math

import torch

from .config import BLOCK_M, BLOCK_N
from .inputs import AttentionInputs

#: Exact query rows per 128-row query block. Measured (module doc; L1 at top-k 25%,
#: compensated): 2 rows 0.067, 4 rows 0.038, 8 rows 0.026, 16 rows 0.025, all 128 (the
#: oracle) 0.023: 8 is where more rows stop paying for their 1/128 of the QK^T each.
SAMPLED_ROWS_PER_BLOCK = 8
#: Scores computed at once by the PyTorch path: bounds its float32 tile (256 MiB).
_TILE_ELEMENTS = 1 << 26


def ranking_rows(len_q: int, rows_per_block: int = SAMPLED_ROWS_PER_BLOCK,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [Mq, S]: the sampled rows of each query block, the centres of S equal strata
    of the block's rows (a short last block repeats rows rather than leave its range)."""
    if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or not 1 <= rows_per_block <= BLOCK_M:
        raise ValueError(f"rows_per_block must be an int in [1, {BLOCK_M}], got {rows_per_block!r}")
    mq = math.ceil(len_q / BLOCK_M)
    start = torch.arange(mq, device=device) * BLOCK_M
    size = torch.clamp(len_q - start, max=BLOCK_M)  # rows in each block
    offset = ((torch.arange(rows_per_block, device=device) + 0.5)[None, :] * size[:, None] / rows_per_block).long()
    return start[:, None] + offset


def _stats_torch(inp: AttentionInputs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampled row and key block: the max of the scaled scores over the block's usable
    keys and the sum of exp(score - that max) (float32 [B, Hq, R, Mk]; -inf and 0 for a
    block with no usable key). ``rows``: int64 [R]."""
    b, hq, mk = inp.batch, inp.heads_q, inp.num_k_blocks
    group = hq // inp.heads_kv
    nk, pad = inp.len_k, mk * BLOCK_N - inp.len_k
    r = rows.numel()
    bmax = torch.empty(b, hq, r, mk, dtype=torch.float32, device=inp.device)
    bsum = torch.empty_like(bmax)
    key_ok = torch.ones(b, nk, dtype=torch.bool, device=inp.device) if inp.key_padding_mask is None \
        else inp.key_padding_mask
    chunk = max(1, _TILE_ELEMENTS // max(1, b * nk))
    keys = torch.arange(nk, device=inp.device)
    for h in range(hq):
        k = inp.k[:, h // group].float()  # [B, Nk, D]
        for r0 in range(0, r, chunk):
            sel = rows[r0:r0 + chunk]
            q = inp.q[:, h].index_select(1, sel).float()  # [B, r, D]
            s = (q @ k.transpose(-1, -2)) * inp.scale  # [B, r, Nk]
            usable = key_ok[:, None, :]
            if inp.is_causal:
                usable = usable & (keys[None, None, :] <= sel[None, :, None])
            s = s.masked_fill(~usable, float("-inf"))
            s = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(b, sel.numel(), mk, BLOCK_N)
            m = s.amax(-1)
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            bmax[:, h, r0:r0 + chunk] = m
            bsum[:, h, r0:r0 + chunk] = torch.exp(s - m_safe[..., None]).sum(-1)
    return bmax, bsum


def sampled_block_mass(inp: AttentionInputs, rows_per_block: int = SAMPLED_ROWS_PER_BLOCK) -> torch.Tensor:
    """float32 [B, Hq, Mq, Mk]: per query block, the mean over its sampled rows of each key
    block's share of the row's exact softmax mass (rows sum to 1; a row with no usable key
    adds nothing). Causal: block i gets block i - 1's value (block 0: zeros), see the
    module doc."""
    rows = ranking_rows(inp.len_q, rows_per_block, inp.device)  # [Mq, S]
    mass = None
    if inp.q.is_cuda:
        from .sampled_scores_triton import sampled_block_mass_triton, unavailable_reason

        if unavailable_reason(inp) is None:
            mass = sampled_block_mass_triton(inp, rows)
    if mass is None:
        bmax, bsum = _stats_torch(inp, rows.flatten())
        row_max = bmax.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        mass = bsum * torch.exp(bmax - row_max)  # exp(-inf) = 0 for empty blocks
        mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
        b, hq, mk = inp.batch, inp.heads_q, inp.num_k_blocks
        mass = mass.view(b, hq, rows.shape[0], rows.shape[1], mk).mean(3)
    if inp.is_causal:
        mass = torch.cat([torch.zeros_like(mass[:, :, :1]), mass[:, :, :-1]], dim=2)
    return mass
