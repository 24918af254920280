"""Coarse compensation of skipped key blocks, and the merge of partial softmax results.

A block mask drops key blocks whole. Their mass is small but not zero, and over many
blocks it adds up to most of the error of a sparse call. Compensation puts each skipped
(attendable) key block j back into row r's softmax as ONE pooled token (docs/DESIGN.md,
"Coarse compensation"):

    key   = mean of the block's attendable keys          k_j
    value = mean of their values                         v_j
    logit = scale * q_r . k_j + log(n_j)                 n_j = attendable keys of block j

This is exact when the block's scores are flat and its first-order error is the spread of
the scores around the mean. It costs Nq x Mk x D multiply-adds, 1/64 of the dense QK^T.

The sparse kernel and the pooled tokens see disjoint keys, so the two partial softmaxes
merge exactly through their log-sum-exps (`merge_partials`).

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.inputs import attention_inputs
    >>> from hf_creative_sparse.ops.compensation import pooled_kv, compensation_bias, pooled_attention
    >>> q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    >>> inp = attention_inputs(q, k, v)
    >>> kept = torch.zeros(1, 2, 2, 4, dtype=torch.bool); kept[..., 0] = True
    >>> pk, pv, count = pooled_kv(inp)
    >>> out, lse = pooled_attention(inp, pk, pv, compensation_bias(kept, inp, count))
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 256, 32]), torch.Size([1, 2, 256]))
"""

from __future__ import annotations

import torch

from .config import BLOCK_M, BLOCK_N
from .inputs import AttentionInputs
from .masks import attendable_blocks, pool_blocks

#: Query rows per step of the torch path: bounds the score tile to B * Hq * rows * Mk floats.
_ROWS_PER_CHUNK = 16 * BLOCK_M


def pooled_kv(inp: AttentionInputs, pooled_k: torch.Tensor | None = None,
              count_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean key and value of every key block over its attendable keys.

    Returns (pooled_k, pooled_v float32 [B, Hkv, Mk, D], count float32 [B, 1, Mk]).
    ``pooled_k``/``count_k`` from the prediction (`masks.BlockScores`) are reused when given
    and no gradient is needed (the prediction runs without autograd).
    """
    needs_grad = torch.is_grad_enabled() and (inp.k.requires_grad or inp.v.requires_grad)
    if pooled_k is None or count_k is None or needs_grad:
        pooled_k, _, count_k = pool_blocks(inp.k, BLOCK_N, inp.key_padding_mask)
    pooled_v, _, _ = pool_blocks(inp.v, BLOCK_N, inp.key_padding_mask)
    return pooled_k, pooled_v, count_k


def compensation_bias(block_mask: torch.Tensor, inp: AttentionInputs, count_k: torch.Tensor) -> torch.Tensor:
    """Additive logit bias [B, Hq, Mq, Mk] (float32) of the pooled tokens: log(n_j) for an
    attendable key block that ``block_mask`` skips, -inf for kept and empty blocks."""
    skipped = attendable_blocks(inp) & ~block_mask & (count_k[:, :, None, :] > 0)
    log_count = torch.log(count_k.clamp(min=1.0))[:, :, None, :]
    return torch.where(skipped, log_count, torch.full_like(log_count, float("-inf")))


def pooled_attention(inp: AttentionInputs, pooled_k: torch.Tensor, pooled_v: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over the pooled tokens with ``bias`` per query block.

    Returns (out float32 [B, Hq, Nq, D], normalised over the pooled tokens; lse float32
    [B, Hq, Nq], -inf where a row has no pooled token and then out = 0). On CUDA it runs as
    one memory-efficient attention kernel with the bias expanded per row
    (`_efficient_pooled_attention`), else in chunks of query rows here.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, pooled_k, pooled_v))
    if inp.q.is_cuda and not needs_grad and inp.head_dim <= 128 and inp.dtype != torch.float32:
        return _efficient_pooled_attention(inp, pooled_k, pooled_v, bias)
    b, hq, nq, d = inp.q.shape
    hkv = inp.heads_kv
    group = hq // hkv
    outs, lses = [], []
    for r0 in range(0, nq, _ROWS_PER_CHUNK):
        r1 = min(nq, r0 + _ROWS_PER_CHUNK)
        rows = r1 - r0
        qs = inp.q[:, :, r0:r1].float().reshape(b, hkv, group * rows, d)
        s = (qs @ pooled_k.transpose(-1, -2)).view(b, hq, rows, -1) * inp.scale
        row_block = torch.arange(r0, r1, device=inp.device) // BLOCK_M
        s = s + bias[:, :, row_block]
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        out = (p.reshape(b, hkv, group * rows, -1) @ pooled_v).view(b, hq, rows, d)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _efficient_pooled_attention(inp: AttentionInputs, pooled_k: torch.Tensor, pooled_v: torch.Tensor,
                                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pooled_attention` on CUDA through torch's memory-efficient attention kernel, the one
    SDPA kernel that takes an additive bias and returns the log-sum-exp. The bias is
    materialised per row in q's dtype (B x Hq x Nq x Mk: ~400 MB at Wan 480p), which
    FlexAttention's score_mod would avoid, but measured 20-40x faster than flex here
    (recompiles per bias tensor) and 10x faster than the chunked torch path."""
    b, hq, nq, d = inp.q.shape
    group = hq // inp.heads_kv
    mk = pooled_k.shape[2]
    mk_pad = -(-mk // 8) * 8  # the kernel wants 16-byte aligned bias rows
    dtype = inp.dtype
    pk = torch.nn.functional.pad(pooled_k.to(dtype), (0, 0, 0, mk_pad - mk)).repeat_interleave(group, dim=1)
    pv = torch.nn.functional.pad(pooled_v.to(dtype), (0, 0, 0, mk_pad - mk)).repeat_interleave(group, dim=1)
    row_bias = torch.nn.functional.pad(bias, (0, mk_pad - mk), value=float("-inf")).expand(b, hq, -1, -1)
    has = torch.isfinite(row_bias).any(-1)  # [B, Hq, Mq]: the query block has a pooled token
    row_bias = row_bias.to(dtype).repeat_interleave(BLOCK_M, dim=2)[:, :, :nq]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        inp.q, pk, pv, row_bias, True, 0.0, False, scale=inp.scale)[:2]
    has_rows = has.repeat_interleave(BLOCK_M, dim=2)[:, :, :nq]
    lse = torch.where(has_rows, lse[..., :nq].float(), torch.full_like(has_rows, float("-inf"), dtype=torch.float32))
    return out, lse  # in q's dtype: rows without a pooled token get weight 0 in the merge


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets from each set's normalised
    output [.., N, D] and log-sum-exp [.., N] (-inf = empty set). Returns (out float32,
    lse); rows empty in both stay 0 with lse -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    ref = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)  # exp(-inf) = 0 for an empty side
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return torch.where(finite.unsqueeze(-1), out, torch.zeros_like(out)), lse


def compensate_output(inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor, block_mask: torch.Tensor,
                      pooled_k: torch.Tensor | None = None, count_k: torch.Tensor | None = None) -> torch.Tensor:
    """The sparse output ``out`` [B, Hq, Nq, D] with log-sum-exp ``lse`` [B, Hq, Nq] plus
    the pooled tokens of the blocks ``block_mask`` skipped; returned in ``out``'s dtype."""
    pk, pv, count = pooled_kv(inp, pooled_k, count_k)
    bias = compensation_bias(block_mask, inp, count)
    if out.is_cuda:  # one fused pass (ops/compensation_triton.py) where triton can take it
        from .compensation_triton import compensate_triton, unavailable_reason

        if unavailable_reason(inp, out) is None:
            return compensate_triton(inp, out, lse, bias, pk, pv)
    comp_out, comp_lse = pooled_attention(inp, pk, pv, bias)
    if torch.is_grad_enabled() and out.requires_grad:
        merged, _ = merge_partials(out, lse, comp_out, comp_lse)
        return merged.to(out.dtype)
    # out + w (comp - out), w = e^lse_c / (e^lse + e^lse_c): three passes in out's dtype
    # instead of float32 copies (the merge is memory-bound; w is exact in float32)
    w = torch.sigmoid(comp_lse - lse).nan_to_num_(0.0)  # both empty: 0; sparse side empty: 1
    comp_out = torch.where(torch.isneginf(comp_lse)[..., None], out, comp_out.to(out.dtype))
    return torch.lerp(out, comp_out, w.unsqueeze(-1).to(out.dtype))
