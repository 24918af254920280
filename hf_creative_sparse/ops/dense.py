"""Dense attention through torch SDPA with the same conventions as the sparse ops.

Used as the fallback where sparsity cannot pay, and by tests as the dense baseline.
Rows with no attendable key return zeros (SDPA alone would return NaN for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import AttentionInputs


def _row_has_key(inp: AttentionInputs) -> torch.Tensor | None:
    """bool [B, 1, Nq, 1], or None when every row has a key."""
    kpm = inp.key_padding_mask
    if kpm is None:
        return None
    if inp.is_causal:
        # row r has a key iff some unpadded key index <= r
        first_key = torch.where(kpm.any(-1), kpm.float().argmax(-1), torch.full_like(kpm[:, 0], inp.len_k, dtype=torch.long))
        rows = torch.arange(inp.len_q, device=inp.device)
        has = rows[None, :] >= first_key[:, None]
    else:
        has = kpm.any(-1, keepdim=True).expand(inp.batch, inp.len_q)
    return has[:, None, :, None]


def dense_attention(inp: AttentionInputs) -> torch.Tensor:
    """Dense SDPA of validated inputs; returns HND [B, Hq, Nq, D]."""
    q, k, v = inp.q, inp.k, inp.v
    if q.is_cuda and not all(t.is_contiguous() for t in (q, k, v)):
        # strided views (NHD layouts, recorded slices) can push SDPA onto its math kernel,
        # which materialises the N x N matrix; a copy is far cheaper
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if inp.heads_q != inp.heads_kv:
        group = inp.heads_q // inp.heads_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    kpm = inp.key_padding_mask
    if kpm is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=inp.is_causal, scale=inp.scale)
    mask = kpm[:, None, None, :]
    if inp.is_causal:
        causal = torch.ones(inp.len_q, inp.len_k, dtype=torch.bool, device=inp.device).tril()
        mask = mask & causal[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=inp.scale)
    has = _row_has_key(inp)
    return out if has is None else torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device))
