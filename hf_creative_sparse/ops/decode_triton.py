"""Decode attention over kept KV blocks on CUDA, in Triton (split-K, as flash-decoding).

Why Triton and not CUDA C++: the work is a gather of whole KV blocks plus two small matrix
products per block, bound by memory bandwidth, which Triton's generated loads and
``tl.dot`` reach without hand-written TMA/wgmma code; it compiles at first use with no
toolkit at install time, and it runs under ``TRITON_INTERPRET=1`` on a CPU, so the same
kernel is tested on machines without a GPU.

Layout: one program per (batch, kv head, split). The kv head's query heads (GQA group,
padded to 16 rows for ``tl.dot``) stream their split's share of the kept blocks once
(each block is read once for all of the group's heads), with an online softmax in base 2;
a second kernel merges the splits' partial results by their log-sum-exp. Semantics:
`hf_creative_sparse.ops.decode.decode_block_attention_reference`.

One file because it is one decode step's kernels (statistics and scores of either block
score, the selection, the split-K attention and its merge), launched in that order and
sharing the launch helpers and the `*_LAUNCH` tables that `benchmarks/gpu_decode.py` sweeps.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch

from .triton_launch import DirectLauncher

try:  # optional: CPU-only installs have no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2_ceil(x: int) -> int:
    """The smallest power of two >= x (x >= 1); plain Python, as the launch path runs every step."""
    return 1 << (x - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(q: torch.Tensor) -> str | None:
    """None when the Triton decode kernel can run on q's device and dtype, else why not."""
    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not _interpreting():
        return f"the triton decode kernel needs CUDA tensors, got {q.device}"
    if q.dtype not in _DTYPES:
        return f"the triton decode kernel takes float16/bfloat16/float32, got {q.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _load_key_block(K, VALID, j, N, b, h, stride_valid_b, stride_kb, stride_kh, stride_kn,
                        dims, dim_ok, toks, HAS_VALID: tl.constexpr, BS: tl.constexpr):
        # key block j of (batch b, kv head h) as float32 [BS, D], which of its keys are
        # attendable, and how many (the statistics kernels of both scores)
        t = j * BS + toks
        ok = t < N
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_valid_b + t, mask=ok, other=0) != 0)
        k = tl.load(K + b * stride_kb + h * stride_kh + t[:, None] * stride_kn + dims[None, :],
                    mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        return k, ok, tl.sum(ok.to(tl.int32), 0)

    # Lengths and counts change every decode step: specializing on them (divisibility by 16,
    # equality to 1) would compile a new variant inside the decode loop.
    @triton.jit(do_not_specialize=["N", "NUM_KEPT", "BLOCKS_PER_SPLIT", "SPLITS"])
    def _decode_partial_kernel(
        Q, K, V, IDX, VALID, PART_O, PART_M, PART_L,
        N, G, D, NUM_KEPT, BLOCKS_PER_SPLIT, SPLITS, HKV,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_valid_b,
        scale_log2,
        HAS_VALID: tl.constexpr, BLOCK_G: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr,
        BS: tl.constexpr, STEP: tl.constexpr, IEEE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        toks = tl.arange(0, BS * STEP)  # STEP kept blocks per iteration: more loads in flight
        slot = toks // BS
        row_ok = rows < G
        dim_ok = dims < D
        q_ptrs = Q + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        first = split * BLOCKS_PER_SPLIT
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for jj in range(0, BLOCKS_PER_SPLIT, STEP):
            j = first + jj + slot
            # the split's last step may reach past its share (or the kept list): masked loads read nothing
            live = (j < NUM_KEPT) & (jj + slot < BLOCKS_PER_SPLIT)
            blk = tl.load(IDX + bh * NUM_KEPT + j, mask=live, other=0)
            t = blk * BS + toks % BS
            ok = (t >= 0) & (t < N) & live  # an out-of-range block index reads nothing
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * stride_valid_b + t, mask=ok, other=0) != 0)
            k = tl.load(k_base + t[:, None] * stride_kn + dims[None, :], mask=ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if IEEE:  # float32 inputs: full-precision products (tf32 measured ~1e-3 off on an H200)
                s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale_log2
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            corr = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * corr + tl.sum(p, 1)
            v = tl.load(v_base + t[:, None] * stride_vn + dims[None, :], mask=ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * corr[:, None] + pv.to(tl.float32)
            m_i = m_new
        # only the group's GP real rows (of BLOCK_G padded for tl.dot) go to the merge
        base = (bh * SPLITS + split) * GP
        store = rows < GP
        tl.store(PART_O + (base + rows)[:, None] * BLOCK_D + dims[None, :], acc, mask=store[:, None])
        tl.store(PART_M + base + rows, m_i, mask=store)
        tl.store(PART_L + base + rows, l_i, mask=store)

    @triton.jit(do_not_specialize=["SPLITS"])
    def _decode_merge_kernel(
        PART_O, PART_M, PART_L, OUT, LSE, G, D, SPLITS, HKV, stride_ob, stride_oh,
        GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_D: tl.constexpr,
    ):
        # One program per (batch, kv head, CHUNK_D dims): every split's partial loaded at once
        # ([splits, rows, dims]), not a loop over splits (a chain of dependent loads).
        bh = tl.program_id(0)
        chunk = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        splits = tl.arange(0, BLOCK_S)
        rows = tl.arange(0, GP)
        dims = chunk * CHUNK_D + tl.arange(0, CHUNK_D)
        s_ok = splits < SPLITS
        idx = (bh * SPLITS + splits)[:, None] * GP + rows[None, :]  # [S, GP]
        m = tl.load(PART_M + idx, mask=s_ok[:, None], other=float("-inf"))
        l = tl.load(PART_L + idx, mask=s_ok[:, None], other=0.0)
        m_all = tl.max(m, 0)  # [GP]
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.exp2(m - m_safe[None, :])  # [S, GP]; 0 for splits that saw nothing
        l_all = tl.sum(l * w, 0)
        o = tl.load(PART_O + idx[:, :, None] * BLOCK_D + dims[None, None, :], mask=s_ok[:, None, None], other=0.0)
        out = tl.sum(o * w[:, :, None], 0)  # [GP, CHUNK_D]
        inv = tl.where(l_all > 0, 1.0 / l_all, 0.0)
        out = out * inv[:, None]
        row_ok = rows < G
        o_ptrs = OUT + b * stride_ob + (h * G + rows)[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :])
        if chunk == 0:
            lse = tl.where(l_all > 0, (m_all + tl.log2(l_all)) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + b * (HKV * G) + h * G + rows, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["N", "NB", "FIRST", "CAP"])
    def _stats_scores_kernel(
        Q, K, VALID, KMIN, KMAX, COUNT, SCORES,
        N, G, D, NB, FIRST, CAP, HKV, SINK, RECENT,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_valid_b,
        HAS_VALID: tl.constexpr, USE_COUNTS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, TILE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        toks = tl.arange(0, BS)
        # 1. refresh this tile's blocks from FIRST on (the block the new key fell into; all
        #    blocks at a rebuild): per-channel min/max over the block's attendable keys
        start = tile * TILE
        for jj in range(0, TILE):
            j = start + jj
            if (j >= FIRST) & (j < NB):
                k, ok, n = _load_key_block(K, VALID, j, N, b, h, stride_valid_b, stride_kb, stride_kh, stride_kn,
                                           dims, dim_ok, toks, HAS_VALID, BS)
                lo = tl.min(tl.where(ok[:, None], k, float("inf")), 0)
                hi = tl.max(tl.where(ok[:, None], k, float("-inf")), 0)
                lo = tl.where(n > 0, lo, 0.0)
                hi = tl.where(n > 0, hi, 0.0)
                tl.store(KMIN + (bh * CAP + j) * D + dims, lo.to(KMIN.dtype.element_ty), mask=dim_ok)
                tl.store(KMAX + (bh * CAP + j) * D + dims, hi.to(KMAX.dtype.element_ty), mask=dim_ok)
                # Every head's program writes its batch's (identical) count: step 2 reads it
                # back, and only this program's own stores are ordered before that read.
                tl.store(COUNT + b * CAP + j, n)
        tl.debug_barrier()  # the stores above are read back below by other threads of this program
        # 2. Quest's bound summed over the group: (sum_g relu(q_g)) . max + (sum_g min(q_g, 0)) . min
        rows = tl.arange(0, BLOCK_G)
        q = tl.load(Q + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :],
                    mask=(rows < G)[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        pos = tl.sum(tl.maximum(q, 0.0), 0)
        neg = tl.sum(tl.minimum(q, 0.0), 0)
        blocks = start + tl.arange(0, TILE)
        live = blocks < NB
        offs = (bh * CAP + blocks)[:, None] * D + dims[None, :]
        hi = tl.load(KMAX + offs, mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        lo = tl.load(KMIN + offs, mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        score = tl.sum(hi * pos[None, :] + lo * neg[None, :], 1)
        if USE_COUNTS:
            cnt = tl.load(COUNT + b * CAP + blocks, mask=live, other=0)
            score = tl.where(cnt == 0, float("-inf"), score)
        forced = (blocks < SINK) | (blocks >= NB - RECENT)
        score = tl.where(forced, float("inf"), score)
        tl.store(SCORES + bh * NB + blocks, score, mask=live)

    @triton.jit(do_not_specialize=["N", "NB", "FIRST", "CAP"])
    def _mass_stats_logits_kernel(
        Q, K, VALID, KMEAN, KVAR, COUNT, LOGITS,
        N, G, D, NB, FIRST, CAP, HKV, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_valid_b,
        HAS_VALID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
        TILE: tl.constexpr, IEEE: tl.constexpr,
    ):
        # `ops.decode.block_mass_scores` before its softmax over blocks: per query head and
        # block, log n + m + spread(v) (random-energy-model law) from the block's count and
        # per-channel key mean / variance, which are refreshed first from block FIRST on.
        # The group's rows (padded to BLOCK_G >= 16) meet a tile of blocks in two tl.dot.
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        toks = tl.arange(0, BS)
        start = tile * TILE
        for jj in range(0, TILE):
            j = start + jj
            if (j >= FIRST) & (j < NB):
                k, ok, n = _load_key_block(K, VALID, j, N, b, h, stride_valid_b, stride_kb, stride_kh, stride_kn,
                                           dims, dim_ok, toks, HAS_VALID, BS)
                denom = tl.maximum(n, 1).to(tl.float32)
                mean = tl.sum(k, 0) / denom
                dev = tl.where(ok[:, None], k - mean[None, :], 0.0)
                var = tl.sum(dev * dev, 0) / denom
                tl.store(KMEAN + (bh * CAP + j) * D + dims, mean.to(KMEAN.dtype.element_ty), mask=dim_ok)
                tl.store(KVAR + (bh * CAP + j) * D + dims, var.to(KVAR.dtype.element_ty), mask=dim_ok)
                tl.store(COUNT + b * CAP + j, n)  # every head's program: read back below
        tl.debug_barrier()
        rows = tl.arange(0, BLOCK_G)
        q = tl.load(Q + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :],
                    mask=(rows < G)[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        blocks = start + tl.arange(0, TILE)
        live = blocks < NB
        offs = (bh * CAP + blocks)[:, None] * D + dims[None, :]
        mean = tl.load(KMEAN + offs, mask=live[:, None] & dim_ok[None, :], other=0.0)
        var = tl.load(KVAR + offs, mask=live[:, None] & dim_ok[None, :], other=0.0)
        cnt = tl.load(COUNT + b * CAP + blocks, mask=live, other=0).to(tl.float32)
        qt = tl.trans(q.to(mean.dtype))
        q2t = tl.trans((q * q).to(var.dtype))
        if IEEE:  # float32 statistics: full-precision products
            m = tl.dot(mean, qt, input_precision="ieee") * scale  # [TILE, BLOCK_G]
            v = tl.dot(var, q2t, input_precision="ieee") * (scale * scale)
        else:
            m = tl.dot(mean, qt) * scale
            v = tl.dot(var, q2t) * (scale * scale)
        log_n = tl.log(tl.maximum(cnt, 1.0))[:, None]
        lim = 2.0 * log_n
        spread = tl.where(v <= lim, 0.5 * v, tl.sqrt(v * lim) - 0.5 * lim)
        logit = tl.where((cnt > 0)[:, None], m + spread + log_n, float("-inf"))
        out = LOGITS + (bh * G + rows)[None, :] * NB + blocks[:, None]
        tl.store(out, logit, mask=(rows < G)[None, :] & live[:, None])

    @triton.jit(do_not_specialize=["NB", "CAP"])
    def _mass_shares_kernel(LOGITS, COUNT, SCORES, G, NB, CAP, HKV, SINK, RECENT,
                            BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
        # each query head's softmax over the blocks, summed over the group; empty blocks
        # -inf, the sink and recent blocks +inf (as `force_blocks`)
        bh = tl.program_id(0)
        b = bh // HKV
        rows = tl.arange(0, BLOCK_G)
        offs = tl.arange(0, BLOCK)
        ok = offs < NB
        lg = tl.load(LOGITS + (bh * G + rows)[:, None] * NB + offs[None, :],
                     mask=(rows < G)[:, None] & ok[None, :], other=float("-inf"))
        mx = tl.max(lg, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(lg - mx[:, None])
        total = tl.sum(e, 1)
        share = tl.sum(e / tl.where(total > 0, total, 1.0)[:, None], 0)
        cnt = tl.load(COUNT + b * CAP + offs, mask=ok, other=0)
        share = tl.where(cnt == 0, float("-inf"), share)
        share = tl.where((offs < SINK) | (offs >= NB - RECENT), float("inf"), share)
        tl.store(SCORES + bh * NB + offs, share, mask=ok)

    @triton.jit(do_not_specialize=["NB", "KEEP"])
    def _select_blocks_kernel(SCORES, IDX, NB, KEEP, BLOCK: tl.constexpr):
        # One program per row: the KEEP-th largest score by bisection on an order-preserving
        # int32 image of the floats, then the rows' kept indices compacted by a prefix sum.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < NB
        bits = tl.load(SCORES + row * NB + offs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # negative floats: lower bits flipped
        key = tl.where(ok, key, -4294967296)  # below every float's image (-inf's is -2139095041)
        lo = tl.min(tl.where(ok, key, 4294967296), 0)
        hi = tl.max(key, 0)
        for _ in range(32):  # invariant: count(key >= lo) >= KEEP, count(key > hi) < KEEP
            mid = (lo + hi + 1) >> 1
            enough = tl.sum((key >= mid).to(tl.int32), 0) >= KEEP
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        thr = lo
        above = key > thr
        ties = key == thr
        take = above | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= KEEP - tl.sum(above.to(tl.int32), 0)))
        pos = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(IDX + row * KEEP + pos, offs.to(tl.int64), mask=take)


#: The decode kernels behind `DirectLauncher`: a step's host time is part of its cost.
_launch = SimpleNamespace(**{name: DirectLauncher(kernel) for name, kernel in (
    ("decode_partial_kernel", _decode_partial_kernel), ("decode_merge_kernel", _decode_merge_kernel),
    ("stats_scores_kernel", _stats_scores_kernel), ("mass_stats_logits_kernel", _mass_stats_logits_kernel),
    ("mass_shares_kernel", _mass_shares_kernel), ("select_blocks_kernel", _select_blocks_kernel))}) \
    if triton is not None else None


#: Launch parameters of the partial kernel (programs per SM, kept blocks per loop step,
#: warps, pipeline stages); `benchmarks/gpu_decode.py --sweep` measures the alternatives.
PARTIAL_LAUNCH = {"programs_per_sm": 8, "step": 2, "num_warps": 4, "num_stages": 2}


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (8 off CUDA), cached: a decode step's host
    time is part of its cost."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _num_splits(items: int, kept: int, device: torch.device) -> int:
    """Splits per (batch, kv head): about ``programs_per_sm`` programs per SM (enough loads
    in flight to keep HBM busy), at least 4 blocks a split."""
    sms = _sm_count(device)
    want = max(1, math.ceil(PARTIAL_LAUNCH["programs_per_sm"] * sms / max(items, 1)))
    return max(1, min(want, math.ceil(kept / 4), 64))


def decode_block_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                  block_size: int, key_valid: torch.Tensor | None, scale: float
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_block_attention_reference`'s result by the Triton kernels (operands already
    checked by `ops.decode.decode_block_attention`). ``block_size`` must be a power of two
    >= 16 (``tl.dot``'s smallest tile)."""
    reason = unavailable_reason(q)
    if reason is not None:
        raise ValueError(reason)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the triton decode kernel needs block_size a power of two >= 16, got {block_size}")
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    kept = block_idx.shape[2]
    if k.stride(3) != 1 or v.stride(3) != 1:
        k, v = k.contiguous(), v.contiguous()
    q = q.contiguous()
    idx = block_idx.contiguous()
    block_g = max(16, _pow2_ceil(g))
    block_d = max(16, _pow2_ceil(d))
    splits = _num_splits(b * hkv, kept, q.device)
    per_split = max(1, math.ceil(kept / splits))
    splits = max(1, math.ceil(kept / per_split))
    gp = max(2, _pow2_ceil(g))  # rows the merge reads
    part_o = torch.empty(b * hkv * splits * gp, block_d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(2, b * hkv * splits * gp, dtype=torch.float32, device=q.device)
    part_m, part_l = part_ml[0], part_ml[1]
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else part_m  # dummy when unused
    _launch.decode_partial_kernel(
        (b * hkv, splits), q, k, v, idx, valid, part_o, part_m, part_l,
        n, g, d, kept, per_split, splits, hkv,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0) if key_valid is not None else 0,
        scale * 1.4426950408889634,
        HAS_VALID=key_valid is not None, BLOCK_G=block_g, GP=gp, BLOCK_D=block_d, BS=block_size,
        STEP=PARTIAL_LAUNCH["step"], IEEE=q.dtype == torch.float32,
        num_warps=PARTIAL_LAUNCH["num_warps"], num_stages=PARTIAL_LAUNCH["num_stages"],
    )
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    block_s = max(2, _pow2_ceil(splits))
    # about 4k partial values per merge program
    chunk_d = max(16, min(block_d, _pow2_ceil(max(1, 4096 // (block_s * gp)))))
    _launch.decode_merge_kernel(
        (b * hkv, block_d // chunk_d), part_o, part_m, part_l, out, lse, g, d, splits, hkv,
        out.stride(0), out.stride(1),
        GP=gp, BLOCK_D=block_d, BLOCK_S=block_s, CHUNK_D=chunk_d, num_warps=4,
    )
    return out, lse


#: Warps of the selection kernel for rows of <= 2048 blocks and longer ones; `gpu_decode.py
#: --profile --select-sweep`.
SELECT_LAUNCH = {"num_warps_small": 4, "num_warps_large": 8}

#: Largest number of blocks per row the selection kernel holds in registers.
SELECT_MAX_BLOCKS = 32768


def select_blocks_triton(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the ``keep`` largest of ``scores`` [B, H, NB] (float32) per row, as
    `ops.decode.select_key_blocks` with ``sort=False`` but in one launch (torch.topk takes
    several): int64 [B, H, keep] in ascending block order; of blocks tied at the cut, the
    first ones. Rows of more than `SELECT_MAX_BLOCKS` blocks raise ValueError."""
    reason = unavailable_reason(scores)
    if reason is not None:
        raise ValueError(reason)
    if scores.dtype != torch.float32 or scores.dim() != 3:
        raise ValueError(f"scores must be float32 [B, H, NB], got {scores.dtype} {tuple(scores.shape)}")
    nb = scores.shape[2]
    if not 1 <= keep <= nb:
        raise ValueError(f"keep must be in [1, {nb}], got {keep}")
    if nb > SELECT_MAX_BLOCKS:
        raise ValueError(f"the triton selection holds at most {SELECT_MAX_BLOCKS} blocks a row, got {nb}")
    scores = scores.contiguous()
    idx = torch.empty(*scores.shape[:2], keep, dtype=torch.int64, device=scores.device)
    block = max(16, _pow2_ceil(nb))
    warps = SELECT_LAUNCH["num_warps_small"] if block <= 2048 else SELECT_LAUNCH["num_warps_large"]
    _launch.select_blocks_kernel((scores.shape[0] * scores.shape[1],), scores, idx, nb, keep, BLOCK=block,
                                 num_warps=warps)
    return idx


#: Launch parameters of the statistics + scores kernel (key blocks per program, warps):
#: `benchmarks/gpu_decode.py --profile` measures the alternatives (H100, 8 x 8 heads x D128:
#: one warp is 2x faster than four, 51 vs 101 us at 128k keys).
STATS_LAUNCH = {"tile": 16, "num_warps": 1}


def stats_and_scores_triton(q: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                            kmin: torch.Tensor, kmax: torch.Tensor, count: torch.Tensor, block_size: int,
                            first_block: int, sink_blocks: int, recent_blocks: int, use_counts: bool) -> torch.Tensor:
    """One launch per decode step for `KeyBlockStats` on CUDA: recompute the per-block
    min/max (and attendable counts) of blocks [first_block, ceil(N / block_size)) of
    ``keys`` [B, Hkv, N, D] into ``kmin``/``kmax`` ([B, Hkv, capacity, D], float32 or the
    keys' 16-bit dtype, which holds them exactly) and
    ``count`` (int32 [B, capacity]), then score every block for the decode rows q
    [B, Hq, D] (`ops.decode.block_scores`), with the sink and recent blocks at +inf so a
    top-k keeps them. Returns float32 [B, Hkv, num_blocks]."""
    reason = unavailable_reason(q)
    if reason is not None:
        raise ValueError(reason)
    if block_size & (block_size - 1):
        raise ValueError(f"the triton statistics kernel needs block_size a power of two, got {block_size}")
    b, hq, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    nb = -(-n // block_size)
    if keys.stride(3) != 1:
        keys = keys.contiguous()
    for name, t in (("kmin", kmin), ("kmax", kmax), ("count", count)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    scores = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else scores
    tile = STATS_LAUNCH["tile"]
    _launch.stats_scores_kernel(
        (b * hkv, triton.cdiv(nb, tile)), q, keys, valid, kmin, kmax, count, scores,
        n, hq // hkv, d, nb, first_block, kmin.shape[2], hkv, sink_blocks, recent_blocks,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        valid.stride(0) if key_valid is not None else 0,
        HAS_VALID=key_valid is not None, USE_COUNTS=use_counts,
        BLOCK_G=max(2, _pow2_ceil(hq // hkv)), BLOCK_D=max(16, _pow2_ceil(d)),
        BS=block_size, TILE=tile, num_warps=STATS_LAUNCH["num_warps"],
    )
    return scores


#: Warps of the mass statistics + logits kernel (its tiles are `STATS_LAUNCH`'s, at least 16
#: blocks for tl.dot).
MASS_STATS_LAUNCH = {"num_warps": 2}


def mass_stats_and_scores_triton(q: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                                 kmean: torch.Tensor, kvar: torch.Tensor, count: torch.Tensor, block_size: int,
                                 first_block: int, sink_blocks: int, recent_blocks: int, scale: float) -> torch.Tensor:
    """`stats_and_scores_triton` for score "mass": refresh the per-block key mean and
    variance (``kmean``/``kvar`` [B, Hkv, capacity, D], float32 or the keys' 16-bit dtype:
    the estimate needs no more, and the scores then read half the bytes) and counts from
    ``first_block`` on, then `ops.decode.block_mass_scores` of every block with the sink and
    recent blocks at +inf, in two launches. Rows of more than `SELECT_MAX_BLOCKS` blocks
    raise ValueError. Returns float32 [B, Hkv, num_blocks]."""
    reason = unavailable_reason(q)
    if reason is not None:
        raise ValueError(reason)
    if block_size & (block_size - 1):
        raise ValueError(f"the triton statistics kernel needs block_size a power of two, got {block_size}")
    b, hq, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    nb = -(-n // block_size)
    if nb > SELECT_MAX_BLOCKS:
        raise ValueError(f"the triton mass scores hold at most {SELECT_MAX_BLOCKS} blocks a row, got {nb}")
    if keys.stride(3) != 1:
        keys = keys.contiguous()
    for name, t in (("kmean", kmean), ("kvar", kvar), ("count", count)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if kmean.dtype != kvar.dtype or kmean.dtype not in (torch.float32, keys.dtype):
        raise ValueError(f"kmean and kvar must be float32 or the keys' dtype, got {kmean.dtype} / {kvar.dtype}")
    logits = torch.empty(b, hkv, g, nb, dtype=torch.float32, device=q.device)
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else logits
    tile = max(16, STATS_LAUNCH["tile"])  # tl.dot's smallest tile
    _launch.mass_stats_logits_kernel(
        (b * hkv, triton.cdiv(nb, tile)), q, keys, valid, kmean, kvar, count, logits,
        n, g, d, nb, first_block, kmean.shape[2], hkv, float(scale),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        valid.stride(0) if key_valid is not None else 0,
        HAS_VALID=key_valid is not None, BLOCK_G=max(16, _pow2_ceil(g)), BLOCK_D=max(16, _pow2_ceil(d)),
        BS=block_size, TILE=tile, IEEE=kmean.dtype == torch.float32, num_warps=MASS_STATS_LAUNCH["num_warps"],
    )
    block_g = max(2, _pow2_ceil(g))
    scores = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    block = max(16, _pow2_ceil(nb))
    _launch.mass_shares_kernel((b * hkv,), logits, count, scores, g, nb, kmean.shape[2], hkv, sink_blocks,
                               recent_blocks, BLOCK_G=block_g, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return scores
