"""The entmax block bounds (`ops.entmax.block_score_bounds`) in two Triton kernels on CUDA.

Why: the PyTorch path materialises two score-sized products per chunk of query rows
(B x Hq x rows x Mk, in 16-bit) and reduces them over the 128 rows of each query block:
about 8 ms of a 24 ms entmax call at B1 H24 N32768 D128 on an H200, where the kernel
itself needs ~15 ms and cuDNN's dense softmax ~19 ms. Here

1. `_key_stats_kernel`, one program per (batch, kv head, 64-key block): the block's
   attendable-key count, centroid mu, radius r = max |k - mu|, per-dimension box [lo, hi]
   and the size |mu| + r + |max(|hi|, |lo|)| that the rounding margin needs, in float32;
2. `_bounds_kernel`, one program per (128-row query block, batch x q head, tile of key
   blocks): the ball bound sign * q . mu + |q| r and the box bound q+ . hi + q- . lo of
   every row on tensor cores (16-bit operands, float32 accumulation), their minimum, the
   maximum over the block's rows, times |scale|, plus the margin; nothing score-sized is
   ever written.

Semantics are the PyTorch path's (the CUDA test compares both and checks every bound
against the exact block maxima). The margin is the PyTorch path's 2^-6 |scale| max|q| size,
which covers more here: q, hi and lo are exact in 16 bits and the products accumulate in
float32, so only mu's rounding to 16 bits (<= 2^-8 |q| |mu|) is left to cover.
"""

from __future__ import annotations

import torch

from .config import BLOCK_M, BLOCK_N
from ._triton import kernel_unavailable_reason, tl, triton
from .inputs import AttentionInputs

#: Key blocks per program of the bounds kernel.
_KEY_BLOCKS_PER_PROGRAM = 64


def unavailable_reason(inp: AttentionInputs) -> str | None:
    """None when the Triton bounds can run ``inp`` (CUDA, 16-bit), else why not."""
    reason = kernel_unavailable_reason("entmax bounds", inp.q)
    if reason is not None:
        return reason
    if inp.dtype not in (torch.float16, torch.bfloat16):
        return f"the entmax bounds kernel runs float16/bfloat16 (tensor-core products), got {inp.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _key_stats_kernel(
        K, VALID, MU, HI, LO, RAD, SIZE,
        NK, HKV, D, MK,
        stride_kb, stride_kh, stride_kn, stride_vb,
        HAS_VALID: tl.constexpr, BLOCK_N_: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        keys = j * BLOCK_N_ + tl.arange(0, BLOCK_N_)
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < D
        ok = keys < NK
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_vb + keys, mask=ok, other=0) != 0)
        k = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dims[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        count = tl.sum(ok.to(tl.float32), 0)
        mu = tl.sum(k, 0) / tl.maximum(count, 1.0)
        dev = tl.where(ok[:, None] & d_ok[None, :], k - mu[None, :], 0.0)
        rad = tl.max(tl.where(ok, tl.sqrt(tl.sum(dev * dev, 1)), 0.0), 0)
        hi = tl.max(tl.where(ok[:, None], k, float("-inf")), 0)
        lo = tl.min(tl.where(ok[:, None], k, float("inf")), 0)
        hi = tl.where(count > 0, hi, 0.0)
        lo = tl.where(count > 0, lo, 0.0)
        hi = tl.where(d_ok, hi, 0.0)
        lo = tl.where(d_ok, lo, 0.0)
        big = tl.maximum(tl.abs(hi), tl.abs(lo))
        size = tl.sqrt(tl.sum(mu * mu, 0)) + rad + tl.sqrt(tl.sum(big * big, 0))
        row = bh * MK + j
        tl.store(MU + row * BLOCK_D + dims, mu)
        tl.store(HI + row * BLOCK_D + dims, hi)
        tl.store(LO + row * BLOCK_D + dims, lo)
        tl.store(RAD + row, rad)
        tl.store(SIZE + row, size)

    @triton.jit
    def _bounds_kernel(
        Q, MU, HI, LO, RAD, SIZE, OUT,
        NQ, HQ, G, D, MK, MQ,
        stride_qb, stride_qh, stride_qn,
        abs_scale, sign, margin,
        BLOCK_M_: tl.constexpr, BLOCK_D: tl.constexpr, TN: tl.constexpr,
    ):
        i = tl.program_id(0)
        bhq = tl.program_id(1)
        t = tl.program_id(2)
        b = bhq // HQ
        h = bhq % HQ
        bkv = b * (HQ // G) + h // G
        rows = i * BLOCK_M_ + tl.arange(0, BLOCK_M_)
        r_ok = rows < NQ
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        qf = q.to(tl.float32)
        q_norm = tl.sqrt(tl.sum(qf * qf, 1))  # [BLOCK_M]
        q_pos = tl.where(q > 0, q, 0.0).to(q.dtype)  # exact in 16 bits
        q_neg = tl.where(q < 0, q, 0.0).to(q.dtype)
        blocks = t * TN + tl.arange(0, TN)
        b_ok = blocks < MK
        offs = (bkv * MK + blocks)[None, :] * BLOCK_D + dims[:, None]  # [BLOCK_D, TN]
        mu_t = tl.load(MU + offs, mask=b_ok[None, :], other=0.0).to(q.dtype)
        hi_t = tl.load(HI + offs, mask=b_ok[None, :], other=0.0).to(q.dtype)
        lo_t = tl.load(LO + offs, mask=b_ok[None, :], other=0.0).to(q.dtype)
        rad = tl.load(RAD + bkv * MK + blocks, mask=b_ok, other=0.0)
        ball = sign * tl.dot(q, mu_t) + q_norm[:, None] * rad[None, :]
        box = tl.dot(q_pos, hi_t) + tl.dot(q_neg, lo_t)
        ub = tl.where(r_ok[:, None], tl.minimum(ball, box), float("-inf"))
        best = tl.max(ub, 0)  # [TN]
        size = tl.load(SIZE + bkv * MK + blocks, mask=b_ok, other=0.0)
        q_max = tl.max(tl.where(r_ok, q_norm, 0.0), 0)
        bound = best * abs_scale + margin * abs_scale * q_max * size
        tl.store(OUT + (bhq * MQ + i) * MK + blocks, bound, mask=b_ok)


def block_score_bounds_triton(inp: AttentionInputs, margin: float) -> torch.Tensor:
    """`ops.entmax.block_score_bounds` before its attendability mask: float32
    [B, Hq, Mq, Mk] upper bounds on scale q . k over each (128-row, 64-key) block pair's
    attendable keys (blocks with none: the bound of an all-zero key, which the caller
    masks). ``margin`` is the relative rounding allowance (the PyTorch path's 2^-6)."""
    reason = unavailable_reason(inp)
    if reason is not None:
        raise ValueError(reason)
    q, k = inp.q, inp.k
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    b, hq, nq, d = q.shape
    hkv, nk = inp.heads_kv, inp.len_k
    mq, mk = inp.num_q_blocks, inp.num_k_blocks
    block_d = max(16, triton.next_power_of_2(d))
    dev = q.device
    mu = torch.empty(b * hkv * mk, block_d, dtype=torch.float32, device=dev)
    hi, lo = torch.empty_like(mu), torch.empty_like(mu)
    rad = torch.empty(b * hkv * mk, dtype=torch.float32, device=dev)
    size = torch.empty_like(rad)
    kpm = inp.key_padding_mask
    valid = kpm.to(torch.uint8).contiguous() if kpm is not None else rad  # dummy when unused
    _key_stats_kernel[(mk, b * hkv)](
        k, valid, mu, hi, lo, rad, size,
        nk, hkv, d, mk,
        k.stride(0), k.stride(1), k.stride(2), valid.stride(0) if kpm is not None else 0,
        HAS_VALID=kpm is not None, BLOCK_N_=BLOCK_N, BLOCK_D=block_d, num_warps=4,
    )
    if inp.scale < 0:  # bound -q . k: the box of -k
        hi, lo = -lo, -hi
    out = torch.empty(b, hq, mq, mk, dtype=torch.float32, device=dev)
    tn = min(_KEY_BLOCKS_PER_PROGRAM, max(16, triton.next_power_of_2(mk)))
    _bounds_kernel[(mq, b * hq, triton.cdiv(mk, tn))](
        q, mu, hi, lo, rad, size, out,
        nq, hq, hq // hkv, d, mk, mq,
        q.stride(0), q.stride(1), q.stride(2),
        abs(inp.scale), 1.0 if inp.scale >= 0 else -1.0, margin,
        BLOCK_M_=BLOCK_M, BLOCK_D=block_d, TN=tn, num_warps=8 if block_d >= 128 else 4,
    )
    return out


__all__ = ["block_score_bounds_triton", "unavailable_reason"]
