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

from ..config import BLOCK_M, BLOCK_N
from .inputs import AttentionInputs

#: Elements of the float32 score tile processed per step (bounds peak memory ~ 64 MiB x a
#: small constant whatever the sequence length).
_TILE_ELEMENTS = 1 << 24
#: Key tokens per chunk of the online softmax (a multiple of BLOCK_N).
_KEY_CHUNK = 4096


def _exclusive_cummax(x: torch.Tensor) -> torch.Tensor:
    shifted = torch.nn.functional.pad(x[..., :-1], (1, 0), value=float("-inf"))
    return torch.cummax(shifted, dim=-1).values


def reference_attention(
    inp: AttentionInputs,
    block_mask: torch.Tensor,
    pvthreshd: torch.Tensor,
) -> tuple[torch.Tensor, int, int]:
    """Block-sparse attention of validated inputs.

    Args:
        inp: validated operands (HND views).
        block_mask: bool [B, Hq, Mq, Mk], already restricted to attendable blocks.
        pvthreshd: float32 [Hq]; ``inf`` disables the skip for that head.

    Returns:
        (output [B, Hq, Nq, D] in q's dtype, skipped (row, block) pairs, visited
        (row, block) pairs): a pair is visited when the kept block holds at least one
        usable key for that row.
    """
    q, k, v = inp.q, inp.k, inp.v
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    device = q.device
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=device)
    use_skip = bool(torch.isfinite(pvthreshd).any())
    neg_thr = (-pvthreshd).view(1, hq, 1, 1)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    visited = torch.zeros((), dtype=torch.int64, device=device)
    chunk = min(_KEY_CHUNK, -(-nk // BLOCK_N) * BLOCK_N)
    q_blocks_per_step = max(1, _TILE_ELEMENTS // (b * hq * BLOCK_M * chunk))
    mq = block_mask.shape[2]
    kpm = inp.key_padding_mask
    cols_all = torch.arange(nk, device=device)

    for qb0 in range(0, mq, q_blocks_per_step):
        qb1 = min(mq, qb0 + q_blocks_per_step)
        r0, r1 = qb0 * BLOCK_M, min(nq, qb1 * BLOCK_M)
        rows = r1 - r0
        qs = q[:, :, r0:r1].float().reshape(b, hkv, group * rows, d) if group > 1 else q[:, :, r0:r1].float()
        row_block = (torch.arange(r0, r1, device=device) // BLOCK_M) - qb0
        m = torch.full((b, hq, rows), float("-inf"), device=device)
        l = torch.zeros(b, hq, rows, device=device)
        acc = torch.zeros(b, hq, rows, d, device=device)
        for c0 in range(0, nk, chunk):
            c1 = min(nk, c0 + chunk)
            kb0, kb1 = c0 // BLOCK_N, -(-c1 // BLOCK_N)
            if inp.is_causal and c0 > r1 - 1:
                break
            bm = block_mask[:, :, qb0:qb1, kb0:kb1]
            if not bool(bm.any()):
                continue
            ks, vs = k[:, :, c0:c1].float(), v[:, :, c0:c1].float()
            s = (qs @ ks.transpose(-1, -2)).view(b, hq, rows, c1 - c0) * inp.scale
            col_block = (cols_all[c0:c1] // BLOCK_N) - kb0
            usable = bm[:, :, row_block][:, :, :, col_block]
            if inp.is_causal:
                usable = usable & (cols_all[c0:c1][None, :] <= torch.arange(r0, r1, device=device)[:, None])
            if kpm is not None:
                usable = usable & kpm[:, None, None, c0:c1]
            s = s.masked_fill(~usable, float("-inf"))

            nblk = kb1 - kb0
            s_blocks = torch.nn.functional.pad(s, (0, nblk * BLOCK_N - (c1 - c0)), value=float("-inf"))
            s_blocks = s_blocks.view(b, hq, rows, nblk, BLOCK_N)
            block_max = s_blocks.amax(-1)
            has_keys = usable.any(-1, keepdim=True) if nblk == 1 else \
                torch.nn.functional.pad(usable, (0, nblk * BLOCK_N - (c1 - c0))).view(b, hq, rows, nblk, BLOCK_N).any(-1)
            visited += has_keys.sum()
            if use_skip:
                running = torch.maximum(_exclusive_cummax(block_max), m[..., None])
                skip = (block_max - running < neg_thr) & has_keys & torch.isfinite(running)
                if bool(skip.any()):
                    skipped += skip.sum()
                    s_blocks = s_blocks.masked_fill(skip[..., None], float("-inf"))
                    s = s_blocks.view(b, hq, rows, nblk * BLOCK_N)[..., : c1 - c0]

            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            pv = (p.reshape(b, hkv, group * rows, c1 - c0) @ vs).view(b, hq, rows, d) if group > 1 else p @ vs
            acc = acc * alpha[..., None] + pv
            m = m_new
        res = acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
        out[:, :, r0:r1] = res.to(q.dtype)
    return out, int(skipped.item()), int(visited.item())
