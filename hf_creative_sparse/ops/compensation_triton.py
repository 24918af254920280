"""Coarse compensation fused into one Triton kernel on CUDA (ops/compensation.py).

Why: the PyTorch path on CUDA runs the pooled tokens through memory-efficient SDPA with the
per-query-block bias expanded to every row (B x Hq x Nq x Mk, ~400 MB at Wan 480p) and then
merges in three more passes: 1.8 ms of a 11.4 ms dense call (H200). Here one program per
(batch, q head, 64-row tile) reads its query block's bias row (Mk floats), attends over
the pooled tokens with an online softmax (skipping steps whose blocks are all kept), and
merges the result into the sparse output through the two log-sum-exps, writing each output
row once. Semantics: `compensation.compensate_output`'s PyTorch path (the test compares).
"""

from __future__ import annotations

import torch

from .config import BLOCK_M
from ._triton import kernel_unavailable_reason, tl, triton
from .inputs import AttentionInputs

#: Query rows per program (divides BLOCK_M, so a tile lies in one query block).
_BLOCK_Q = 64
#: Pooled tokens per step of the online softmax.
_BLOCK_K = 64


def unavailable_reason(inp: AttentionInputs, out: torch.Tensor) -> str | None:
    """None when the fused kernel can compensate ``out`` for ``inp``, else why not."""
    reason = kernel_unavailable_reason("fused compensation", inp.q)
    if reason is not None:
        return reason
    if out.dtype != inp.q.dtype:
        return f"the fused compensation kernel takes an output in q's dtype {inp.q.dtype}, got {out.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, inp.k, inp.v, out)):
        return "the fused compensation kernel has no backward"
    return None


if triton is not None:

    @triton.jit
    def _compensate_kernel(
        Q, PK, PV, BIAS, OUT, LSE, RES,
        NQ, MK, MQ, HQ, G, D,
        stride_qb, stride_qh, stride_qn,
        stride_ob, stride_oh, stride_on,
        stride_rb, stride_rh, stride_rn,
        scale,
        IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr, ROWS_PER_QB: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        hk = h // G
        qb = (pid_q * BLOCK_Q) // ROWS_PER_QB
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        r_ok = rows < NQ
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        bias_base = BIAS + (pid_bh * MQ + qb) * MK
        kv_base = (b * (HQ // G) + hk) * MK * D
        for j0 in range(0, MK, BK):
            kj = j0 + tl.arange(0, BK)
            k_ok = kj < MK
            bias = tl.load(bias_base + kj, mask=k_ok, other=float("-inf"))
            if tl.max(bias, 0) > float("-inf"):  # some block of this step is skipped
                pk = tl.load(PK + kv_base + kj[None, :] * D + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
                if IEEE:
                    s = tl.dot(q, pk, input_precision="ieee")
                else:
                    s = tl.dot(q, pk)
                s = s * scale + bias[None, :]
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l = l * alpha + tl.sum(p, 1)
                pv = tl.load(PV + kv_base + kj[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(pv.dtype), pv, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(pv.dtype), pv)
                m = m_new
        o_ptr = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d[None, :]
        o = tl.load(o_ptr, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(LSE + pid_bh * NQ + rows, mask=r_ok, other=float("-inf"))
        has = l > 0.0
        comp_lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        top = tl.maximum(lse, comp_lse)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.exp(lse - top_safe) + tl.exp(comp_lse - top_safe)
        w = tl.where(has, tl.exp(comp_lse - top_safe) / tl.where(total > 0.0, total, 1.0), 0.0)
        comp = acc / tl.where(has, l, 1.0)[:, None]
        res = o + w[:, None] * (comp - o)
        tl.store(RES + b * stride_rb + h * stride_rh + rows[:, None] * stride_rn + d[None, :],
                 res.to(RES.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def compensate_triton(inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor,
                      pooled_k: torch.Tensor, pooled_v: torch.Tensor,
                      result: torch.Tensor | None = None) -> torch.Tensor:
    """The sparse ``out`` [B, Hq, Nq, D] (log-sum-exp ``lse`` float32 [B, Hq, Nq]) merged with
    the pooled tokens of ``bias`` (float32 [B, Hq, Mq, Mk], `compensation.compensation_bias`);
    ``pooled_k``/``pooled_v`` [B, Hkv, Mk, D]. Written into ``result`` (same shape and dtype
    as ``out``; may be ``out`` itself) or a new tensor, which is returned."""
    reason = unavailable_reason(inp, out)
    if reason is not None:
        raise RuntimeError(reason)
    q = inp.q if inp.q.stride(-1) == 1 else inp.q.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    b, hq, nq, d = q.shape
    mq, mk = bias.shape[2], bias.shape[3]
    pk = pooled_k.to(q.dtype).contiguous()
    pv = pooled_v.to(q.dtype).contiguous()
    bias = bias.float().expand(b, hq, mq, mk).contiguous()
    lse = lse.float().contiguous()
    if result is None:
        res = torch.empty_like(out)
    elif result.shape != out.shape or result.dtype != out.dtype or result.device != out.device \
            or result.stride(-1) != 1:
        raise ValueError(f"result must be a tensor shaped and typed as out ({tuple(out.shape)}, {out.dtype}) with "
                         f"unit stride in the last dim, got {tuple(result.shape)}, {result.dtype}")
    else:
        res = result
    _compensate_kernel[(triton.cdiv(nq, _BLOCK_Q), b * hq)](
        q, pk, pv, bias, out, lse, res,
        nq, mk, mq, hq, hq // inp.heads_kv, d,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        res.stride(0), res.stride(1), res.stride(2),
        float(inp.scale),
        IEEE=q.dtype == torch.float32, BLOCK_Q=_BLOCK_Q, BLOCK_D=max(16, triton.next_power_of_2(d)), BK=_BLOCK_K,
        ROWS_PER_QB=BLOCK_M, num_warps=4,
    )
    return res
