"""The reference block-sparse attention: the definition every compiled kernel must match.

Blockwise flash-style forward in plain PyTorch: float32 accumulation, online softmax over
key chunks, memory O(rows_per_step * chunk) and never an Nq x Nk matrix for long inputs.

Semantics (what "equal to the reference" means):

* Element (r, c) of the attention map is used iff its block (r // 128, c // 64) is kept,
  c <= r when causal (top-left aligned), and key c is not padded.
* Stage 2, the pv-threshold skip: key blocks are visited in ascending order. For query
  row r and kept block j, let gain = max_c s[r, c] over the block minus the running max
  over the blocks visited before it. When gain < -pvthreshd[h], the block contributes
  nothing to row r (neither numerator nor denominator): its weights are below
  exp(-pvthreshd) of the row's largest. Skipped blocks never raise the running max, so
  the running max is the exclusive cumulative max of the block maxima.
* A row with no usable key returns zeros. NaN in q/k/v propagates as in SDPA.
"""

from __future__ import annotations

import torch

from .config import BLOCK_M, BLOCK_N
from .inputs import AttentionInputs

#: Key blocks per chunk of the online softmax (64 blocks = 4096 keys): bounds the score
#: tile to B * Hq * 128 * 4096 float32 values whatever the sequence length.
_BLOCKS_PER_CHUNK = 64


def _exclusive_cummax(x: torch.Tensor) -> torch.Tensor:
    shifted = torch.nn.functional.pad(x[..., :-1], (1, 0), value=float("-inf"))
    return torch.cummax(shifted, dim=-1).values


def reference_attention(
    inp: AttentionInputs,
    block_mask: torch.Tensor,
    pvthreshd: torch.Tensor,
    *,
    return_lse: bool = False,
) -> tuple[torch.Tensor, int, int] | tuple[torch.Tensor, int, int, torch.Tensor]:
    """Block-sparse attention of validated inputs.

    Args:
        inp: validated operands (HND views).
        block_mask: bool [B, Hq, Mq, Mk], already restricted to attendable blocks.
        pvthreshd: float32 [Hq]; ``inf`` disables the skip for that head.

    Returns:
        (output [B, Hq, Nq, D] in q's dtype, skipped (row, block) pairs, visited
        (row, block) pairs): a pair is visited when the kept block holds at least one
        usable key for that row; with ``return_lse`` also the per-row log-sum-exp of the
        scaled scores over the keys used (float32 [B, Hq, Nq], -inf for rows that used
        none; docs/DESIGN.md "Partial softmax").
    """
    q, k, v = inp.q, inp.k, inp.v
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    device = q.device
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=device)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=device) if return_lse else None
    use_skip = bool(torch.isfinite(pvthreshd).any())
    neg_thr = (-pvthreshd).view(1, hq, 1, 1)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    visited = torch.zeros((), dtype=torch.int64, device=device)
    kpm = inp.key_padding_mask
    in_block = torch.arange(BLOCK_N, device=device)

    for qb in range(block_mask.shape[2]):
        r0, r1 = qb * BLOCK_M, min(nq, (qb + 1) * BLOCK_M)
        rows = r1 - r0
        row_ids = torch.arange(r0, r1, device=device)
        qs = q[:, :, r0:r1].float().reshape(b, hkv, group * rows, d)
        m = torch.full((b, hq, rows), float("-inf"), device=device)
        l = torch.zeros(b, hq, rows, device=device)
        acc = torch.zeros(b, hq, rows, d, device=device)
        # key blocks kept by any (batch, head) of this query block, ascending: only these are computed
        kept_any = torch.nonzero(block_mask[:, :, qb, :].any(dim=1).any(dim=0)).flatten()
        for j0 in range(0, kept_any.numel(), _BLOCKS_PER_CHUNK):
            blocks = kept_any[j0: j0 + _BLOCKS_PER_CHUNK]
            nblk = blocks.numel()
            cols = (blocks[:, None] * BLOCK_N + in_block[None, :]).flatten()  # [nblk * 64]
            in_range = cols < nk
            cols_c = cols.clamp(max=nk - 1)
            ks = k.index_select(2, cols_c).float()
            vs = v.index_select(2, cols_c).float()
            s = (qs @ ks.transpose(-1, -2)).view(b, hq, rows, nblk * BLOCK_N) * inp.scale
            usable = block_mask[:, :, qb, blocks].repeat_interleave(BLOCK_N, dim=-1)[:, :, None, :]
            usable = usable & in_range
            if inp.is_causal:
                usable = usable & (cols[None, :] <= row_ids[:, None])
            if kpm is not None:
                usable = usable & (kpm[:, cols_c] & in_range)[:, None, None, :]
            usable = usable.expand(b, hq, rows, nblk * BLOCK_N)
            s = s.masked_fill(~usable, float("-inf"))

            s_blocks = s.view(b, hq, rows, nblk, BLOCK_N)
            has_keys = usable.reshape(b, hq, rows, nblk, BLOCK_N).any(-1)
            visited += has_keys.sum()
            if use_skip:
                block_max = s_blocks.amax(-1)
                running = torch.maximum(_exclusive_cummax(block_max), m[..., None])
                skip = (block_max - running < neg_thr) & has_keys & torch.isfinite(running)
                if bool(skip.any()):
                    skipped += skip.sum()
                    s = s_blocks.masked_fill(skip[..., None], float("-inf")).view(b, hq, rows, nblk * BLOCK_N)

            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            pv = (p.reshape(b, hkv, group * rows, nblk * BLOCK_N) @ vs).view(b, hq, rows, d)
            acc = acc * alpha[..., None] + pv
            m = m_new
        res = acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
        out[:, :, r0:r1] = res.to(q.dtype)
        if lse is not None:
            lse[:, :, r0:r1] = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf")))
    if lse is not None:
        return out, int(skipped.item()), int(visited.item()), lse
    return out, int(skipped.item()), int(visited.item())
