"""alpha-entmax attention: softmax replaced by a map with exact zeros, and the key blocks
those zeros empty skipped without approximation.

One file because it is one algorithm: entmax's reference, its block bounds and the compiled
dispatch must agree to the last zero.

Definition (Peters et al. 2019; AdaSplash, Goncalves et al. 2025): for the scaled scores
s_c = scale * q . k_c of a query row over its attendable keys c,

    p_c = [(alpha - 1) s_c - tau]_+ ^ (1 / (alpha - 1)),   tau such that sum_c p_c = 1,

and out = sum_c p_c v_c. alpha -> 1 is softmax, alpha = 2 is sparsemax; 1 < alpha <= 2.
Keys with (alpha - 1) s_c <= tau get weight exactly 0, so a key block whose scores are all
below tau for every row of a query block contributes nothing: skipping it is lossless.
A row with no attendable key (all padded) returns zeros, never NaN. ``X = (alpha - 1) s``
below is "entmax units"; tau is reported in them.

Backends:

* ``reference``: this module in PyTorch. tau per row by bisection (50 halvings, float32
  for 16/32-bit inputs, float64 for float64 inputs), then p / sum(p) as
  ``entmax.entmax_bisect`` does. Dense per query chunk: memory O(B * H * rows * Nk).
* ``cpu`` (csrc/cpu/entmax_fwd.cpp) and ``cuda`` (csrc/cuda/entmax_fwd*.cu): the compiled
  forward, block-sparse in three steps, all exact:

  1. Bounds (`block_score_bounds`: PyTorch, or two Triton kernels on CUDA in
     ops/entmax_bounds_triton.py): every key block's centroid mu and
     radius r (max distance of its attendable keys from mu) bound each score,
     q . k <= q . mu + |q| r (Cauchy-Schwarz); the max over a query block's rows gives
     an upper bound U[i, j] for the (query block, key block) pair.
  2. A lower bound on tau: for any subset of a row's keys, tau >= max_subset X - 1 (the
     row's top key alone would have weight 1 at tau = X_max - 1). The kernels score the
     "seed" blocks (the block of largest U and, causal, the diagonal block) exactly and
     take tau_lo = max X - 1. Every pair with (alpha - 1) U[i, j] <= min over the block's
     rows of tau_lo is skipped: all its weights are 0.
  3. tau exactly, by Newton's method started at tau_lo (our own choice, not AdaSplash's
     histogram start): f(tau) = sum_c [X_c - tau]_+^(1/(alpha-1)) is convex and
     decreasing, so Newton from a point left of the root stays left of it and converges
     monotonically, and each iterate is itself a valid lower bound. The CPU kernel keeps
     the candidate scores and iterates per row (a bisection step guards slow progress);
     the CUDA kernel runs Newton passes over the candidate blocks (recomputing Q K^T) and
     drops the blocks that fall entirely under the current tau after each pass. One last
     pass accumulates p V over the blocks still alive.

Gradients (all backends): the entmax Jacobian, with P recomputed from the forward's tau
(w.r.t. q, k, v and alpha; alpha per head). For a row with g_c = p_c^(2 - alpha) on the
support and u = dL/dp, dL/ds_c = g_c (u_c - sum g u / sum g) and
dL/dalpha = (1/(alpha-1)) [sum u (g s - p ln p) - (sum g u / sum g) sum (g s - p ln p)].

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.entmax import entmax_attention
    >>> q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    >>> out, stats = entmax_attention(q, k, v, alpha=1.5, backend="reference", return_stats=True)
    >>> out.shape, 0.0 <= stats.zero_fraction <= 1.0
    (torch.Size([1, 2, 300, 64]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import BLOCK_M, BLOCK_N
from ._ext import load_extension
from .inputs import AttentionInputs, attention_inputs

ENTMAX_BACKENDS = ("auto", "reference", "cpu", "cuda")
#: Bisection halvings of the reference (float32 resolves tau after ~25; float64 after ~55).
REFERENCE_BISECT_ITERS = 50
REFERENCE_BISECT_ITERS_F64 = 60
#: Newton stops once sum p - 1 <= this (the output is normalised by sum p afterwards).
NEWTON_TOL = 1e-5
#: The CUDA kernel's tolerance: its float32 sums over thousands of keys round at ~1e-6, and
#: every pass re-reads K; 1e-4 moves tau by far less than a 16-bit output's rounding.
CUDA_NEWTON_TOL = 1e-4
#: Most Newton iterations (CPU, per row) or passes (CUDA, per query block).
NEWTON_MAX_ITERS = 60
#: Head dims of the CUDA kernel.
CUDA_HEAD_DIMS = (64, 128)
#: Relative allowance of the GPU bounds for 16-bit rounding (see `block_score_bounds`).
BOUND_MARGIN = 2.0 ** -6
#: Elements of one score chunk in the reference and the bounds (memory cap, float32).
_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class EntmaxStats:
    """What one `entmax_attention` call did.

    zero_fraction: attendable (row, key) pairs whose weight is exactly 0.
    total_blocks: attendable (query block, key block) pairs (128 x 64 blocks).
    empty_blocks: attendable pairs whose weights are all 0 (the block sparsity reached).
    skipped_blocks: pairs whose scores were never computed (the bounds proved them empty);
        0 for the reference, which computes everything.
    tau_iterations: most tau iterations any row (CPU) or query block (CUDA) needed;
        the bisection halvings for the reference.
    backend: which backend ran.
    """

    zero_fraction: float
    total_blocks: int
    empty_blocks: int
    skipped_blocks: int
    tau_iterations: int
    backend: str

    @property
    def block_sparsity(self) -> float:
        """Fraction of attendable block pairs that are empty (0.0 when there are none)."""
        return self.empty_blocks / self.total_blocks if self.total_blocks else 0.0


# ----------------------------------------------------------------------------- checks

def check_alpha(alpha: object, heads: int, device: torch.device) -> torch.Tensor:
    """alpha as float32 [heads], each in (1, 2]; a float or a 0-D/1-D tensor of 1 or
    ``heads`` values. Raises TypeError/ValueError naming ``alpha``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.Tensor)):
        raise TypeError(f"alpha must be a float or a per-head tensor, got {type(alpha).__name__}")
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        flat = alpha.reshape(-1) if alpha.dim() == 0 else alpha
        if flat.dim() != 1 or flat.numel() not in (1, heads):
            raise ValueError(f"alpha must be a scalar or have one value per q head ({heads}), "
                             f"got shape {tuple(alpha.shape)}")
        values = flat.detach().to(device=device, dtype=torch.float32).expand(heads)
    else:
        values = torch.full((heads,), float(alpha), device=device, dtype=torch.float32)
    if torch.isnan(values).any():
        raise ValueError("alpha must not be NaN")
    if bool(((values <= 1.0) | (values > 2.0)).any()):
        raise ValueError(f"alpha must lie in (1, 2] (alpha -> 1 is softmax, 2 is sparsemax), "
                         f"got {values.tolist() if heads <= 8 else values}")
    return values.contiguous()


def _alpha_for_grad(alpha: object, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """alpha [heads] in ``dtype``, still attached to autograd when the caller's tensor is."""
    if isinstance(alpha, torch.Tensor):
        flat = alpha.reshape(-1).to(device=device, dtype=dtype)
        return flat.expand(heads)
    return torch.full((heads,), float(alpha), device=device, dtype=dtype)


# ------------------------------------------------------------------------ dense pieces

def _key_allowed(inp: AttentionInputs, rows: torch.Tensor) -> torch.Tensor:
    """bool [B or 1, 1, len(rows), Nk]: key c attendable by row r."""
    cols = torch.arange(inp.len_k, device=inp.device)
    allowed = torch.ones(1, 1, rows.numel(), inp.len_k, dtype=torch.bool, device=inp.device)
    if inp.is_causal:
        allowed = allowed & (cols[None, :] <= rows[:, None])[None, None]
    if inp.key_padding_mask is not None:
        allowed = allowed & inp.key_padding_mask[:, None, None, :]
    return allowed


def _scores(inp: AttentionInputs, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Scaled scores s [B, Hq, rows, Nk] in ``dtype``, -inf where not attendable."""
    group = inp.heads_q // inp.heads_kv
    q = inp.q[:, :, rows].to(dtype)
    k = inp.k.to(dtype).repeat_interleave(group, dim=1) if group > 1 else inp.k.to(dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) * inp.scale
    idx = torch.arange(inp.len_q, device=inp.device)[rows]
    return s.masked_fill(~_key_allowed(inp, idx), float("-inf"))


def _pow_beta(z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """z^(1/(alpha-1)) for z >= 0 [B, H, R, N], alpha [H]; 0 where z == 0. alpha 1.5 and 2
    (the common choices) without pow."""
    if bool((alpha == 1.5).all()):
        return z * z
    if bool((alpha == 2.0).all()):
        return z.clone()
    beta = (1.0 / (alpha - 1.0)).view(1, -1, 1, 1)
    return torch.where(z > 0, z.pow(beta), torch.zeros_like(z))


def _probs_from_tau(x: torch.Tensor, tau: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """p = [x - tau]_+ ^ (1/(alpha-1)) / sum; x [B, H, R, N] in entmax units, tau [B, H, R],
    alpha [H]. Rows without any attendable key (x all -inf) give zeros."""
    p = _pow_beta((x - tau.unsqueeze(-1)).clamp_min(0), alpha)
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))


def bisect_tau(x: torch.Tensor, alpha: torch.Tensor, n_iter: int) -> torch.Tensor:
    """tau [B, H, R] of entmax over the last dim of x [B, H, R, N] (entmax units,
    -inf = not attendable) by bisection, as ``entmax.entmax_bisect``: tau lies in
    [max - 1, max - n^(1 - alpha)], n the row's attendable count. Rows without a key: -inf."""
    count = torch.isfinite(x).sum(-1).clamp_min(1).to(x.dtype)
    x_max = x.amax(-1)
    empty = ~torch.isfinite(x_max)
    x_max = torch.where(empty, torch.zeros_like(x_max), x_max)
    xs = torch.where(empty.unsqueeze(-1), torch.zeros_like(x), x)  # keeps -inf - (-inf) out
    lo = x_max - 1.0
    hi = x_max - count.pow(-(alpha.view(1, -1, 1) - 1.0))
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        f = _pow_beta((xs - mid.unsqueeze(-1)).clamp_min(0), alpha).sum(-1)
        above = f >= 1  # tau is at least mid
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return torch.where(empty, torch.full_like(lo, float("-inf")), lo)


def _row_chunk(inp: AttentionInputs) -> int:
    per_row = inp.batch * inp.heads_q * inp.len_k
    return max(1, min(inp.len_q, _CHUNK_ELEMS // max(per_row, 1)))


def _work_dtype(inp: AttentionInputs) -> torch.dtype:
    return torch.float64 if inp.dtype == torch.float64 else torch.float32


def reference_forward(inp: AttentionInputs, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, EntmaxStats]:
    """The definition: (out [B, Hq, Nq, D] in q's dtype, tau float [B, Hq, Nq] in entmax
    units (-inf for rows with no key), stats). alpha [Hq] (float32 or float64)."""
    dtype = _work_dtype(inp)
    n_iter = REFERENCE_BISECT_ITERS_F64 if dtype == torch.float64 else REFERENCE_BISECT_ITERS
    a = alpha.to(dtype)
    group = inp.heads_q // inp.heads_kv
    v = inp.v.to(dtype).repeat_interleave(group, dim=1) if group > 1 else inp.v.to(dtype)
    out = torch.empty(inp.q.shape, dtype=inp.dtype, device=inp.device)
    tau = torch.empty(inp.batch, inp.heads_q, inp.len_q, dtype=dtype, device=inp.device)
    zeros = allowed_pairs = 0
    nonempty = torch.zeros(inp.batch, inp.heads_q, inp.num_q_blocks, inp.num_k_blocks, dtype=torch.bool,
                           device=inp.device)
    step = _row_chunk(inp)
    step = max(BLOCK_M, step - step % BLOCK_M) if step >= BLOCK_M else step
    for start in range(0, inp.len_q, step):
        rows = slice(start, min(start + step, inp.len_q))
        x = _scores(inp, rows, dtype) * (a - 1.0).view(1, -1, 1, 1)
        t = bisect_tau(x, a, n_iter)
        p = _probs_from_tau(x, t, a)
        out[:, :, rows] = torch.matmul(p, v).to(inp.dtype)
        tau[:, :, rows] = t
        finite = torch.isfinite(x)
        allowed_pairs += int(finite.sum())
        zeros += int((finite & (p == 0)).sum())
        nonempty |= _block_any(p > 0, start, inp)
    total = _total_blocks(inp)
    stats = EntmaxStats(zero_fraction=zeros / allowed_pairs if allowed_pairs else 0.0, total_blocks=total,
                        empty_blocks=total - int(nonempty.sum()), skipped_blocks=0, tau_iterations=n_iter,
                        backend="reference")
    return out, tau, stats


def _block_any(flags: torch.Tensor, row0: int, inp: AttentionInputs) -> torch.Tensor:
    """bool [B, Hq, Mq, Mk]: whether any flag of rows [row0, row0 + R) is set in each block pair."""
    b, h, r, n = flags.shape
    mk = inp.num_k_blocks
    per_row = torch.nn.functional.pad(flags, (0, mk * BLOCK_N - n)).view(b, h, r, mk, BLOCK_N).any(-1)
    q_block = torch.arange(row0, row0 + r, device=flags.device) // BLOCK_M
    hits = torch.zeros(b, h, inp.num_q_blocks, mk, dtype=torch.int32, device=flags.device)
    hits.index_add_(2, q_block, per_row.to(torch.int32))
    return hits > 0


def _total_blocks(inp: AttentionInputs) -> int:
    """Attendable (query block, key block) pairs over batch and q heads."""
    per = _attendable_blocks(inp)
    return int(per.sum()) * inp.heads_q * (inp.batch if per.shape[0] == 1 else 1)


def _attendable_blocks(inp: AttentionInputs) -> torch.Tensor:
    """bool [B, 1, Mq, Mk]: the block pair holds at least one attendable (row, key)."""
    mq, mk = inp.num_q_blocks, inp.num_k_blocks
    device = inp.device
    if inp.key_padding_mask is not None:
        kpm = torch.nn.functional.pad(inp.key_padding_mask, (0, mk * BLOCK_N - inp.len_k))
        key_block_any = kpm.view(inp.batch, mk, BLOCK_N).any(-1)  # [B, Mk]
        valid = kpm.view(inp.batch, mk, BLOCK_N)
        idx = torch.arange(mk * BLOCK_N, device=device).view(mk, BLOCK_N)
        first = torch.where(valid, idx, torch.full_like(idx, mk * BLOCK_N)).amin(-1)  # [B, Mk]
    else:
        key_block_any = torch.ones(1, mk, dtype=torch.bool, device=device)
        first = (torch.arange(mk, device=device) * BLOCK_N).view(1, mk)
    out = key_block_any[:, None, :].expand(-1, mq, -1)
    if inp.is_causal:
        last_row = torch.clamp((torch.arange(mq, device=device) + 1) * BLOCK_M - 1, max=inp.len_q - 1)
        out = out & (first[:, None, :] <= last_row[None, :, None])
    return out.unsqueeze(1)


# ----------------------------------------------------------------------- block bounds

def block_score_bounds(inp: AttentionInputs) -> torch.Tensor:
    """Upper bounds U float32 [B, Hq, Mq, Mk] on the scaled score s = scale q . k of every
    attendable (row, key) pair in each (128-row, 64-key) block pair; -inf for pairs with no
    attendable key. The smaller of two bounds over a key block's attendable keys: the ball
    (centroid mu, radius r: s <= scale q . mu + |scale| |q| r) and the per-dimension box
    (s <= |scale| sum_d max(q_d hi_d, q_d lo_d)). Causal pairs above the diagonal are -inf."""
    from . import entmax_bounds_triton

    if entmax_bounds_triton.unavailable_reason(inp) is None:  # CUDA, 16-bit: two kernels, no score-sized temporaries
        bounds = entmax_bounds_triton.block_score_bounds_triton(inp, BOUND_MARGIN)
        return bounds.masked_fill(~_attendable_blocks(inp), float("-inf"))
    b, hq, nq, d = inp.q.shape
    hkv, nk = inp.heads_kv, inp.len_k
    mq, mk = inp.num_q_blocks, inp.num_k_blocks
    group = hq // hkv
    scale = inp.scale
    k = torch.nn.functional.pad(inp.k.float(), (0, 0, 0, mk * BLOCK_N - nk)).view(b, hkv, mk, BLOCK_N, d)
    if inp.key_padding_mask is not None:
        valid = torch.nn.functional.pad(inp.key_padding_mask, (0, mk * BLOCK_N - nk)).view(b, 1, mk, BLOCK_N)
    else:
        valid = (torch.arange(mk * BLOCK_N, device=inp.device) < nk).view(1, 1, mk, BLOCK_N)
    w = valid.to(k.dtype).unsqueeze(-1)
    count = w.sum(3)  # [B|1, 1, Mk, 1]
    mu = (k * w).sum(3) / count.clamp_min(1)  # [B, Hkv, Mk, D]
    radius = torch.where(valid, (k - mu.unsqueeze(3)).norm(dim=-1), torch.zeros(())).amax(-1)  # [B, Hkv, Mk]
    big = torch.finfo(torch.float32).max
    k_hi = torch.where(valid.unsqueeze(-1), k, torch.full((), -big)).amax(3)  # per-dimension box
    k_lo = torch.where(valid.unsqueeze(-1), k, torch.full((), big)).amin(3)
    k_hi, k_lo = torch.where(count > 0, k_hi, 0.0), torch.where(count > 0, k_lo, 0.0)
    if scale < 0:  # bound -q . k instead
        k_hi, k_lo = -k_lo, -k_hi

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(group, dim=1) if group > 1 else t

    mu_q, rad_q, hi_q, lo_q = heads(mu), heads(radius), heads(k_hi), heads(k_lo)
    # On GPU the products run in the inputs' 16-bit dtype (tensor cores; float32 would cost
    # a quarter of a dense attention's time at 32k): q, hi and lo are exact there; mu, r, |q|
    # and the 16-bit results round by <= 2^-8 relative, so each block's bound gets
    # 2^-6 |scale| max|q| (|mu| + r + |max(|hi|, |lo|)|), which covers every product's error.
    half = inp.device.type == "cuda" and inp.dtype in (torch.float16, torch.bfloat16)
    mm = inp.dtype if half else torch.float32
    sign = 1.0 if scale >= 0 else -1.0
    # One product per bound: ball = [q, |q|] . [sign mu, r], box = [q+, q-] . [hi, lo]
    # (both in units of |scale|).
    extra = torch.zeros(*rad_q.shape, 8, dtype=mu_q.dtype, device=inp.device)  # K = D + 8: tensor-core friendly
    extra[..., 0] = rad_q
    w_ball = torch.cat([sign * mu_q, extra], -1).to(mm).transpose(-1, -2)
    w_box = torch.cat([hi_q, lo_q], -1).to(mm).transpose(-1, -2)
    bounds = torch.empty(b, hq, mq, mk, dtype=torch.float32, device=inp.device)
    q_norm_max = torch.empty(b, hq, mq, 1, dtype=torch.float32, device=inp.device)
    step = max(BLOCK_M, (_CHUNK_ELEMS // max(b * hq * mk, 1)) // BLOCK_M * BLOCK_M)
    for start in range(0, nq, step):
        q = inp.q[:, :, start:start + step].to(mm)
        q_norm = q.float().norm(dim=-1, keepdim=True)
        rows = q.shape[2]
        pad = (-rows) % BLOCK_M
        ball = torch.matmul(torch.cat([q, q_norm.to(mm), q.new_zeros(*q.shape[:-1], 7)], -1), w_ball)
        box = torch.matmul(torch.cat([q.clamp_min(0), q.clamp_max(0)], -1), w_box)
        ub = torch.nn.functional.pad(torch.minimum(ball, box), (0, 0, 0, pad), value=float("-inf"))
        blocks = slice(start // BLOCK_M, (start + rows + pad) // BLOCK_M)
        bounds[:, :, blocks] = ub.view(b, hq, -1, BLOCK_M, mk).amax(3).float() * abs(scale)
        q_norm_max[:, :, blocks] = torch.nn.functional.pad(q_norm, (0, 0, 0, pad)).view(b, hq, -1, BLOCK_M).amax(
            3, keepdim=True)
    if half:
        size = mu_q.norm(dim=-1) + rad_q + torch.maximum(hi_q.abs(), lo_q.abs()).norm(dim=-1)  # [B, Hq, Mk]
        bounds += BOUND_MARGIN * abs(scale) * q_norm_max * size.unsqueeze(2)
    return bounds.masked_fill(~_attendable_blocks(inp), float("-inf"))


def seed_blocks(inp: AttentionInputs, bounds: torch.Tensor) -> torch.Tensor:
    """int32 [B, Hq, Mq, 2]: the key blocks each query block scores first for its lower
    bound on tau (the largest bound; causal: the diagonal block holding key 128 i, which
    every unpadded row of query block i can see), -1 where unused."""
    best = bounds.argmax(-1)
    best = torch.where(torch.isfinite(bounds.amax(-1)), best, torch.full_like(best, -1))
    second = torch.full_like(best, -1)
    if inp.is_causal:
        diag = (torch.arange(inp.num_q_blocks, device=inp.device) * (BLOCK_M // BLOCK_N)).clamp(
            max=inp.num_k_blocks - 1)
        diag = diag.view(1, 1, -1).expand_as(best)
        ok = torch.isfinite(bounds.gather(-1, diag.unsqueeze(-1)).squeeze(-1)) & (diag != best)
        second = torch.where(ok, diag, second)
    return torch.stack([best, second], -1).to(torch.int32).contiguous()


# ---------------------------------------------------------------------------- backends

def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.hcs_entmax, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _cuda_reason(inp: AttentionInputs) -> str | None:
    if inp.device.type != "cuda":
        return f"the cuda kernel needs CUDA tensors, got q on {inp.device}"
    if inp.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda kernel runs float16/bfloat16, got {inp.dtype}"
    if inp.head_dim not in CUDA_HEAD_DIMS:
        return f"the cuda kernel supports head_dim {CUDA_HEAD_DIMS}, got {inp.head_dim}"
    if _has_op("cuda_forward"):  # registered already (the extension, or a standalone build)
        return None
    error = load_extension("cuda").error
    if error is not None:
        return error
    if not _has_op("cuda_forward"):
        return "the cuda extension has no entmax kernel (csrc/cuda/entmax_fwd.cu not built)"
    return None


def _cpu_reason(inp: AttentionInputs) -> str | None:
    if inp.device.type != "cpu":
        return f"the cpu kernel needs CPU tensors, got q on {inp.device}"
    if inp.dtype == torch.float64:
        return "the cpu kernel runs float32/float16/bfloat16, got float64"
    if _has_op("cpu_forward"):
        return None
    error = load_extension("cpu").error
    if error is not None:
        return error
    if not _has_op("cpu_forward"):
        return "the cpu extension has no entmax kernel (csrc/cpu/entmax_fwd.cpp not built)"
    return None


def unsupported_reason(backend: str, inp: AttentionInputs) -> str | None:
    """None when ``backend`` ("reference", "cpu" or "cuda") can run ``inp``, else why not."""
    if backend == "reference":
        return None
    return _cpu_reason(inp) if backend == "cpu" else _cuda_reason(inp)


def _pick_backend(backend: str, inp: AttentionInputs) -> str:
    if backend not in ENTMAX_BACKENDS:
        raise ValueError(f"backend must be one of {ENTMAX_BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = unsupported_reason(backend, inp)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
        return backend
    for name in ("cuda", "cpu"):
        if unsupported_reason(name, inp) is None:
            return name
    return "reference"


def compiled_forward(backend: str, inp: AttentionInputs, alpha: torch.Tensor, max_iters: int = NEWTON_MAX_ITERS,
                     want_stats: bool = True) -> tuple[torch.Tensor, torch.Tensor, EntmaxStats | None]:
    """The compiled forward (``backend`` "cpu" or "cuda"): (out in q's dtype, tau float32
    [B, Hq, Nq], stats or None when not ``want_stats``: they need a device sync)."""
    bounds = block_score_bounds(inp)
    seeds = seed_blocks(inp, bounds)
    kpm = inp.key_padding_mask.contiguous() if inp.key_padding_mask is not None else None
    if backend == "cpu":
        q, k, v = (t.float().contiguous() for t in (inp.q, inp.k, inp.v))
        out, tau, counts = torch.ops.hcs_entmax.cpu_forward(q, k, v, kpm, bounds, seeds, alpha, inp.scale,
                                                          inp.is_causal, NEWTON_TOL, max_iters)
        out = out.to(inp.dtype)
    else:
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        out, tau, counts = torch.ops.hcs_entmax.cuda_forward(q, k, v, kpm, bounds, seeds, alpha, inp.scale,
                                                           inp.is_causal, CUDA_NEWTON_TOL, max_iters)
    if not want_stats:
        return out, tau, None
    # counts int64 [B, Hq, Mq, 4]: candidate pairs scored, pairs with a non-zero weight,
    # tau iterations, non-zero (row, key) weights.
    sums = counts.sum((0, 1, 2)).tolist()
    attendable = _attendable_pairs(inp)
    total = _total_blocks(inp)
    stats = EntmaxStats(zero_fraction=1.0 - sums[3] / attendable if attendable else 0.0, total_blocks=total,
                        empty_blocks=total - int(sums[1]), skipped_blocks=total - int(sums[0]),
                        tau_iterations=int(counts[..., 2].max()) if counts.numel() else 0, backend=backend)
    return out, tau, stats


def _attendable_pairs(inp: AttentionInputs) -> int:
    """Number of attendable (row, key) pairs over batch and heads."""
    nq, nk = inp.len_q, inp.len_k
    if inp.key_padding_mask is None:
        per = nq * (nq + 1) // 2 if inp.is_causal else nq * nk
        return per * inp.batch * inp.heads_q
    valid = inp.key_padding_mask
    if inp.is_causal:  # row r sees the valid keys c <= r: sum over c of valid[c] * (nq - c)
        weight = torch.arange(nk, 0, -1, device=valid.device)
        per = int((valid.long() * weight).sum())
    else:
        per = int(valid.sum()) * nq
    return per * inp.heads_q


# ---------------------------------------------------------------------------- autograd

def entmax_backward(inp: AttentionInputs, alpha: torch.Tensor, tau: torch.Tensor, grad_out: torch.Tensor,
                    need_alpha: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv in HND, dalpha [Hq] or None) of out w.r.t. q, k, v, alpha,
    with P recomputed from ``tau`` (entmax units, float [B, Hq, Nq]). Dense per query chunk."""
    dtype = _work_dtype(inp)
    a = alpha.to(dtype)
    group = inp.heads_q // inp.heads_kv
    k = inp.k.to(dtype).repeat_interleave(group, dim=1) if group > 1 else inp.k.to(dtype)
    v = inp.v.to(dtype).repeat_interleave(group, dim=1) if group > 1 else inp.v.to(dtype)
    dq = torch.empty(inp.q.shape, dtype=dtype, device=inp.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=inp.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=inp.device)
    dalpha = torch.zeros(inp.heads_q, dtype=dtype, device=inp.device)
    step = _row_chunk(inp)
    for start in range(0, inp.len_q, step):
        rows = slice(start, min(start + step, inp.len_q))
        s = _scores(inp, rows, dtype)
        x = s * (a - 1.0).view(1, -1, 1, 1)
        p = _probs_from_tau(x, tau[:, :, rows].to(dtype), a)
        go = grad_out[:, :, rows].to(dtype)
        dv += torch.matmul(p.transpose(-1, -2), go)
        u = torch.matmul(go, v.transpose(-1, -2))  # dL/dp
        support = p > 0
        g = torch.where(support, p.pow((2.0 - a).view(1, -1, 1, 1)), torch.zeros_like(p))
        g_sum = g.sum(-1, keepdim=True)
        mean_u = torch.where(g_sum > 0, (g * u).sum(-1, keepdim=True) / g_sum.clamp_min(torch.finfo(dtype).tiny),
                             torch.zeros_like(g_sum))
        ds = g * (u - mean_u)  # dL/ds, s the scaled scores
        dq[:, :, rows] = torch.matmul(ds, k) * inp.scale
        dk += torch.matmul(ds.transpose(-1, -2), inp.q[:, :, rows].to(dtype)) * inp.scale
        if need_alpha:
            s_fin = torch.where(support, s, torch.zeros_like(s))
            plogp = torch.where(support, p * p.clamp_min(torch.finfo(dtype).tiny).log(), torch.zeros_like(p))
            d = g * s_fin - plogp
            per_row = (u * d).sum(-1) - mean_u.squeeze(-1) * d.sum(-1)
            dalpha += per_row.sum((0, 2)) / (a - 1.0)
    if group > 1:
        dk = dk.view(inp.batch, inp.heads_kv, group, inp.len_k, -1).sum(2)
        dv = dv.view(inp.batch, inp.heads_kv, group, inp.len_k, -1).sum(2)
    return dq, dk, dv, (dalpha if need_alpha else None)


class _EntmaxAttentionFn(torch.autograd.Function):
    """out = entmax attention of HND q, k, v with per-head alpha; forward by ``backend``,
    backward from the forward's tau (`entmax_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha_h, layout_meta, backend, max_iters, want_stats):  # noqa: ANN001
        is_causal, scale, kpm = layout_meta
        inp = AttentionInputs(q=q, k=k, v=v, layout="HND", is_causal=is_causal, scale=scale, key_padding_mask=kpm)
        if backend == "reference":  # alpha in the work dtype: float64 gradchecks need its exact value
            out, tau, stats = reference_forward(inp, alpha_h.detach())
        else:
            out, tau, stats = compiled_forward(backend, inp, alpha_h.detach().float().contiguous(), max_iters,
                                               want_stats)
        ctx.save_for_backward(q, k, v, alpha_h, tau)
        ctx.meta = layout_meta
        ctx.stats = stats
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v, alpha_h, tau = ctx.saved_tensors
        is_causal, scale, kpm = ctx.meta
        inp = AttentionInputs(q=q, k=k, v=v, layout="HND", is_causal=is_causal, scale=scale, key_padding_mask=kpm)
        alpha = alpha_h.detach().to(_work_dtype(inp))
        dq, dk, dv, dalpha = entmax_backward(inp, alpha, tau, grad_out, ctx.needs_input_grad[3])
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None if dalpha is None else dalpha.to(alpha_h.dtype), None, None, None, None)


# ---------------------------------------------------------------------------- public op

def entmax_attention_inputs(
    inp: AttentionInputs,
    alpha: float | torch.Tensor = 1.5,
    *,
    backend: str = "auto",
    return_stats: bool = False,
    max_iters: int = NEWTON_MAX_ITERS,
) -> torch.Tensor | tuple[torch.Tensor, EntmaxStats]:
    """`entmax_attention` on validated `AttentionInputs`; returns the HND output (and the
    stats when ``return_stats``). For callers that already hold validated inputs (the
    diffusers processors)."""
    if not isinstance(inp, AttentionInputs):
        raise TypeError(f"inp must be AttentionInputs (ops.inputs.attention_inputs), got {type(inp).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    alpha32 = check_alpha(alpha, inp.heads_q, inp.device)
    name = _pick_backend(backend, inp)
    alpha_h = _alpha_for_grad(alpha, inp.heads_q, inp.device, _work_dtype(inp))
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (inp.q, inp.k, inp.v)) or alpha_h.requires_grad)
    meta = (inp.is_causal, inp.scale, inp.key_padding_mask)
    if needs_grad:
        out = _EntmaxAttentionFn.apply(inp.q, inp.k, inp.v, alpha_h, meta, name, max_iters, return_stats)
        stats = out.grad_fn.stats  # the custom Function's ctx is its grad_fn
    elif name == "reference":
        out, _, stats = reference_forward(inp, alpha_h.detach())
    else:
        out, _, stats = compiled_forward(name, inp, alpha32, max_iters, return_stats)
    return (out, stats) if return_stats else out


def entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float | torch.Tensor = 1.5,
    *,
    layout: str = "HND",
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    max_iters: int = NEWTON_MAX_ITERS,
) -> torch.Tensor | tuple[torch.Tensor, EntmaxStats]:
    """alpha-entmax attention (see the module docstring for the definition and kernels).

    Args:
        q: [B, Hq, Nq, D] ("HND") or [B, Nq, Hq, D] ("NHD"); k, v: the same with Hkv heads
            (Hq a multiple of Hkv: GQA). float32, float16, bfloat16 (float64: reference).
        alpha: float or per-q-head tensor [Hq], each in (1, 2]; a tensor that requires
            grad gets a gradient.
        is_causal: key c usable by row r iff c <= r (needs Nq == Nk).
        scale: score scale (default head_dim ** -0.5).
        key_padding_mask: bool [B, Nk], True = attend; a row with no key returns zeros.
        backend: "auto" (cuda, then cpu, then reference), "reference", "cpu", "cuda".
        return_stats: also return an `EntmaxStats`.
        max_iters: cap on Newton iterations (cpu, per row) / passes (cuda) for tau.

    Returns:
        out in q's layout and dtype (and `EntmaxStats` when ``return_stats``).

    Example:
        >>> import torch
        >>> q = torch.randn(2, 3, 200, 32); k = torch.randn(2, 1, 200, 32); v = torch.randn(2, 1, 200, 32)
        >>> entmax_attention(q, k, v, alpha=2.0, is_causal=True, backend="reference").shape
        torch.Size([2, 3, 200, 32])
    """
    inp = _inputs(q, k, v, layout, is_causal, scale, key_padding_mask)
    result = entmax_attention_inputs(inp, alpha, backend=backend, return_stats=return_stats, max_iters=max_iters)
    if return_stats:
        out, stats = result
        return inp.to_layout(out), stats
    return inp.to_layout(result)


def _inputs(q, k, v, layout, is_causal, scale, key_padding_mask) -> AttentionInputs:  # noqa: ANN001
    """attention_inputs, also accepting float64 (the reference's gradcheck dtype)."""
    if all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (q, k, v)):
        inp = attention_inputs(q.float(), k.float(), v.float(), layout=layout, is_causal=is_causal, scale=scale,
                               key_padding_mask=key_padding_mask)
        tr = (lambda t: t.transpose(1, 2)) if layout == "NHD" else (lambda t: t)
        return AttentionInputs(q=tr(q), k=tr(k), v=tr(v), layout=layout, is_causal=inp.is_causal, scale=inp.scale,
                               key_padding_mask=inp.key_padding_mask)
    return attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale,
                            key_padding_mask=key_padding_mask)


__all__ = ["EntmaxStats", "block_score_bounds", "check_alpha", "entmax_attention", "entmax_attention_inputs"]
