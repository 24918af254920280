"""The sampled rows' block statistics on CUDA, in Triton (ops/sampled_scores.py).

Why a kernel: the PyTorch path materialises each sampled row's scores against every key
(R x Nk float32 per head, 3.2 GB at the Wan-480p shape) and reads them four times; here one
program takes a tile of sampled rows, streams K once, and writes only two numbers per
(row, key block): the max of the block's scaled scores and the sum of exp(score - max).
Semantics: `hf_creative_sparse.ops.sampled_scores._stats_torch` (the test compares them).
"""

from __future__ import annotations

import torch

from .config import BLOCK_N
from ._triton import kernel_unavailable_reason, tl, triton
from .inputs import AttentionInputs

#: The mass kernel holds S x Mk values per program; beyond this many key blocks (131k
#: tokens) the reduction runs in torch.
_MASS_MAX_KEY_BLOCKS = 2048


def unavailable_reason(inp: AttentionInputs) -> str | None:
    """None when the kernel can take ``inp``, else why not (the caller then uses PyTorch)."""
    return kernel_unavailable_reason("sampled-statistics", inp.q)


if triton is not None:

    @triton.autotune(
        configs=[triton.Config({"BLOCK_R": br}, num_warps=w, num_stages=st)
                 for br, w in ((64, 4), (128, 8)) for st in (2, 3)],
        key=["D", "MK", "CAUSAL"],
    )
    @triton.jit
    def _sampled_stats_kernel(
        Q, K, ROWS, KPM, BMAX, BSUM,
        R, NK, MK, HQ, G, D, CHUNK,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_kpm_b,
        scale,
        HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_k = tl.program_id(2)  # a chunk of CHUNK key blocks: outputs are per key block, no reduction
        b = pid_bh // HQ
        h = pid_bh % HQ
        hk = h // G
        r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r_offs < R
        rows = tl.load(ROWS + r_offs, mask=r_ok, other=0)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :],
                    mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
        n_in = tl.arange(0, BN)
        out_base = pid_bh * R * MK + r_offs * MK
        for j in range(pid_k * CHUNK, tl.minimum(pid_k * CHUNK + CHUNK, MK)):
            keys = j * BN + n_in
            k_in = keys < NK
            kb = tl.load(K + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kn + d[None, :],
                         mask=k_in[:, None] & (d[None, :] < D), other=0.0)  # [BN, BLOCK_D], rows contiguous
            if IEEE:
                s = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(kb)) * scale
            ok = k_in[None, :]
            if HAS_KPM:
                kpm = tl.load(KPM + b * stride_kpm_b + keys, mask=k_in, other=0)
                ok = ok & (kpm != 0)[None, :]
            if CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None])
            s = tl.where(ok, s, float("-inf"))
            m = tl.max(s, 1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.where(ok, tl.exp(s - m_safe[:, None]), 0.0), 1)
            tl.store(BMAX + out_base + j, m, mask=r_ok)
            tl.store(BSUM + out_base + j, l, mask=r_ok)

    @triton.jit
    def _sampled_mass_kernel(BMAX, BSUM, MASS, MK, MQ, S: tl.constexpr, MK_PAD: tl.constexpr):
        """Per (batch*head, query block): normalise each sampled row's block masses by the
        row's total and average the block's S rows (what `sampled_block_mass` does in torch)."""
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        r = tl.arange(0, S)
        c = tl.arange(0, MK_PAD)
        ok = c < MK
        base = (pid_bh * MQ * S + pid_q * S + r)[:, None] * MK + c[None, :]
        m = tl.load(BMAX + base, mask=ok[None, :], other=float("-inf"))
        l = tl.load(BSUM + base, mask=ok[None, :], other=0.0)
        row_max = tl.max(m, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        mass = l * tl.exp(m - row_max[:, None])
        total = tl.sum(mass, 1)
        mass = mass / tl.maximum(total, 1e-30)[:, None]
        tl.store(MASS + (pid_bh * MQ + pid_q) * MK + c, tl.sum(mass, 0) / S, mask=ok)


def sampled_block_stats_triton(inp: AttentionInputs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampled_scores._stats_torch` on CUDA: (max, sum) float32 [B, Hq, R, Mk] for the
    query rows ``rows`` (int64 [R])."""
    reason = unavailable_reason(inp)
    if reason is not None:
        raise RuntimeError(reason)
    q, k = inp.q, inp.k
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    b, hq, mk = inp.batch, inp.heads_q, inp.num_k_blocks
    r = rows.numel()
    bmax = torch.empty(b, hq, r, mk, dtype=torch.float32, device=q.device)
    bsum = torch.empty_like(bmax)
    kpm = inp.key_padding_mask
    kpm_t = kpm.to(torch.int8).contiguous() if kpm is not None else bmax  # dummy pointer when absent
    rows_i = rows.to(device=q.device, dtype=torch.int32).contiguous()
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    # Split the key blocks over programs until there are ~4 waves: (rows, heads) alone gave
    # 1.5 waves at the Wan-480p shape, each program streaming all 512 key blocks.
    row_tiles = triton.cdiv(r, 128) * b * hq
    chunks = max(1, min(mk, triton.cdiv(4 * sms, row_tiles)))
    chunk = triton.cdiv(mk, chunks)
    chunks = triton.cdiv(mk, chunk)
    _sampled_stats_kernel[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), b * hq, chunks)](
        q, k, rows_i, kpm_t, bmax, bsum,
        r, inp.len_k, mk, hq, hq // inp.heads_kv, inp.head_dim, chunk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        kpm_t.stride(0) if kpm is not None else 0,
        float(inp.scale),
        HAS_KPM=kpm is not None, CAUSAL=inp.is_causal, IEEE=q.dtype == torch.float32,
        BLOCK_D=max(16, triton.next_power_of_2(inp.head_dim)), BN=BLOCK_N,
    )
    return bmax, bsum


def sampled_block_mass_triton(inp: AttentionInputs, rows: torch.Tensor) -> torch.Tensor | None:
    """`sampled_scores.sampled_block_mass` before its causal shift, on CUDA: float32
    [B, Hq, Mq, Mk] from ``rows`` (int64 [Mq, S], `ranking_rows`). None when the mass kernel
    cannot take the shape (S not a power of two, or more than `_MASS_MAX_KEY_BLOCKS` key
    blocks), for the caller's PyTorch reduction."""
    mq, s_rows = rows.shape
    mk = inp.num_k_blocks
    if s_rows & (s_rows - 1) or mk > _MASS_MAX_KEY_BLOCKS:
        return None
    bmax, bsum = sampled_block_stats_triton(inp, rows.flatten())
    mass = torch.empty(inp.batch, inp.heads_q, mq, mk, dtype=torch.float32, device=bmax.device)
    _sampled_mass_kernel[(mq, inp.batch * inp.heads_q)](
        bmax, bsum, mass, mk, mq, S=s_rows, MK_PAD=max(16, triton.next_power_of_2(mk)), num_warps=4)
    return mass
