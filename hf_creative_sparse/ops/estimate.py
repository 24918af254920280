"""Per-head budgets from an error target: the error is the knob (docs/DESIGN.md).

Keeping blocks by predicted attention mass is not keeping them by output error: a diffuse
row loses much mass but little output when blocks go, a peaked row the opposite. So the
budget is measured, not guessed. For a sample of query rows the exact output (softmax
against every key, float32) is computed once, together with each key block's partial sums;
then the output that every candidate kept fraction on `BUDGET_GRID` would give, with the
same ranking, forced blocks and compensation that the call will run, follows from those
partial sums in one batched product. The budgets are then the fewest kept blocks whose
relative L1 error over the sampled rows, sum |o - o_dense| / sum |o_dense|, stays under the
target: summed over every head of the call (``allocation="call"``, the default: a head whose
error grows slowly, such as a local one, gives its slack to a hard one; on video-like inputs
this kept 1.4-2.2x fewer blocks than per-head bounds at the same call error), or per head
(``allocation="head"``).

Causal inputs stay strictly causal: query block i's budget comes only from sampled rows of
blocks before i (block 0, and any block with no sampled row before it, runs dense).

Cost: for S sampled rows per head, S x Nk x D multiply-adds twice (scores and block
partials) and F x S x Mk x D for the F grid points: about 2 S / Nq of the dense work plus
a few passes over an S x Nk score tile (S = 64 at 32k tokens: ~0.4% of the dense FLOPs).

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.inputs import attention_inputs
    >>> from hf_creative_sparse.ops.masks import block_scores
    >>> from hf_creative_sparse.ops.estimate import estimate_budgets
    >>> q, k, v = (torch.randn(1, 2, 1024, 32) for _ in range(3))
    >>> inp = attention_inputs(q, k, v)
    >>> est = estimate_budgets(inp, block_scores(inp, simthreshd1=-1.0), target_l1=0.05)
    >>> est.topk.shape, bool((est.estimated_l1 <= 0.05).all())
    (torch.Size([1, 2, 8]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import BLOCK_M, BLOCK_N
from .compensation import pooled_kv
from .inputs import AttentionInputs
from .masks import BlockScores, topk_block_counts
from .sampled_scores import ranking_rows

#: Candidate kept fractions (ascending; 1.0 keeps every block, so some candidate always
#: fits). Neighbours are ~1.2-1.3x apart: a head's chosen error lands within about that
#: factor under the target.
BUDGET_GRID = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.115, 0.13, 0.15, 0.17, 0.20, 0.23,
               0.26, 0.30, 0.35, 0.40, 0.45, 0.50, 0.60, 0.70, 0.80, 0.90, 1.0)
#: Query rows sampled per (batch, head), stratified over the sequence: 64 rows put the estimate's relative standard error at a few percent on
#: structured inputs (error sums over 64 x D elements) for ~0.4% of the dense work at 32k.
DEFAULT_SAMPLE_ROWS = 64
#: Causal budgets: query block i is judged on the last this many informative samples before
#: it (error behaviour drifts along a causal sequence as rows see more blocks), and runs
#: dense until it has at least CAUSAL_MIN_SAMPLES of them.
CAUSAL_WINDOW = 16
CAUSAL_MIN_SAMPLES = 4
#: A causal block's budget must meet this share of the target on the samples before it:
#: the rows of a later block see more key blocks and err more at the same fraction.
CAUSAL_MARGIN = 0.5
#: Values of the Lagrange multiplier tried at once by `allocate` (two passes: a coarse grid
#: over e^-12 .. e^24, then a fine one inside the bracket): a few batched ops instead of a
#: bisection's hundreds of small launches (the estimate was host-bound on the GPU).
_LAMBDA_POINTS = 48
#: Heads processed at once: bounds the float32 score tile to this many x S x Nk values.
_HEADS_PER_CHUNK = 4


@dataclass
class BudgetEstimate:
    """The budgets an error target gives, and what they were measured to cost.

    Attributes:
        topk: float32 [B, Hq, Mq]: kept fraction per (batch, head, query block), for
            `masks.select_blocks`; rows of one head share it unless causal.
        head_budget: float32 [B, Hq]: the kept fraction per (batch, head) (causal: the
            last query block's, which has seen every sample).
        call_l1: float32 [B]: relative L1 error of the whole call (all heads) over the
            sampled rows at the chosen budgets: what ``budget_allocation="call"`` bounds.
        estimated_l1: float32 [B, Hq]: relative L1 error over the sampled rows at the
            chosen budgets.
        sampled_rows: query rows measured per (batch, head).
    """

    topk: torch.Tensor
    head_budget: torch.Tensor
    estimated_l1: torch.Tensor
    call_l1: torch.Tensor
    sampled_rows: int


def sample_rows(inp: AttentionInputs, rows: int) -> torch.Tensor:
    """Row indices (int64 [S], ascending, distinct), a Latin hypercube over two strata: the
    sequence (one row in each of S equal strata, so every part of it is measured) and the
    row's position inside its 128-row query block (S equal strata, permuted): rows at a
    block's edges err up to 2x more than its middle on local inputs (their neighbourhoods
    straddle the next key block), and stratifying the position cut the relative standard
    deviation of a 64-row estimate there from 13% to 6% (7% -> 6% on video-like inputs).
    Drawn from a fixed-seed generator (the same rows for the same shape: repeated estimates
    do not jitter), and apart from the rows the "sample" ranking reads where the block allows."""
    n = max(1, min(rows, inp.len_q))
    g = torch.Generator().manual_seed(1234)
    seq_jitter = torch.rand(n, generator=g, dtype=torch.float64)
    pos_jitter = torch.rand(n, generator=g, dtype=torch.float64)
    pos_stratum = torch.randperm(n, generator=g).double()
    anchor = ((torch.arange(n, dtype=torch.float64) + seq_jitter) * (inp.len_q / n)).floor().long()
    start = anchor.clamp(max=inp.len_q - 1) // BLOCK_M * BLOCK_M
    size = (inp.len_q - start).clamp(max=BLOCK_M)
    picked = start + ((pos_stratum + pos_jitter) / n * size).floor().long().clamp(max=BLOCK_M - 1)
    picked = torch.minimum(picked, start + size - 1)
    # A row the "sample" ranking saw would judge its own block's mask too kindly: move it
    # to a neighbour the ranking did not see (ranking rows are never adjacent in a full block).
    seen = ranking_rows(inp.len_q).flatten()
    for step in (1, -1):
        hit = torch.isin(picked, seen)
        moved = picked + step
        ok = hit & (moved >= 0) & (moved < inp.len_q) & ~torch.isin(moved, seen) & ~torch.isin(moved, picked)
        picked = torch.where(ok, moved, picked)
    return picked.unique()  # sorted; two rows drawn onto one count once


def _block_partials(inp: AttentionInputs, rows: torch.Tensor, h0: int, h1: int, pooled_k: torch.Tensor,
                    count_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sampled ``rows`` of q heads [h0, h1): per key block the softmax partial sums
    relative to the row's max (L [B, h, S, Mk], O [B, h, S, Mk, D]) and the pooled token's
    weight on the same scale (C [B, h, S, Mk]; 0 for empty blocks), and the exact row
    output [B, h, S, D]."""
    b, nk, d, mk = inp.batch, inp.len_k, inp.head_dim, inp.num_k_blocks
    group = inp.heads_q // inp.heads_kv
    kv_heads = torch.arange(h0, h1, device=inp.device) // group
    q = inp.q[:, h0:h1].index_select(2, rows.to(inp.device)).float()  # [B, h, S, D]
    k = inp.k.index_select(1, kv_heads).float()
    v = inp.v.index_select(1, kv_heads).float()
    s = (q @ k.transpose(-1, -2)) * inp.scale  # [B, h, S, Nk]
    usable = torch.ones(b, 1, rows.numel(), nk, dtype=torch.bool, device=inp.device)
    if inp.key_padding_mask is not None:
        usable = usable & inp.key_padding_mask[:, None, None, :]
    if inp.is_causal:
        usable = usable & (torch.arange(nk, device=inp.device)[None, :] <= rows.to(inp.device)[:, None])
    s = s.masked_fill(~usable, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)  # [B, h, S, Nk]
    pad = mk * BLOCK_N - nk
    e_blocks = torch.nn.functional.pad(e, (0, pad)).view(*e.shape[:-1], mk, BLOCK_N)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h1 - h0, mk, BLOCK_N, d)
    partial_l = e_blocks.sum(-1)
    partial_o = torch.einsum("bhsjt,bhjtd->bhsjd", e_blocks, v_blocks)
    exact = partial_o.sum(-2) / partial_l.sum(-1, keepdim=True).clamp(min=1e-30)
    pk = pooled_k.index_select(1, kv_heads)  # [B, h, Mk, D]
    count = count_k[:, :, None, :]  # [B, 1, 1, Mk]
    logit = (q @ pk.transpose(-1, -2)) * inp.scale + torch.log(count.clamp(min=1.0))
    weight = torch.exp(logit - row_max)
    weight = torch.where(count > 0, weight, torch.zeros_like(weight))
    return partial_l, partial_o, weight, exact


@dataclass
class GridErrors:
    """What every candidate kept fraction would cost on the sampled rows.

    Attributes:
        fractions: float32 [F]: the candidate kept fractions (`BUDGET_GRID`).
        err: float32 [F, B, H, S]: sum over d of |o - o_dense| per sampled row at each fraction.
        ref: float32 [B, H, S]: sum over d of |o_dense| per sampled row.
        rows: int64 [S]: the sampled query rows.
    """

    fractions: torch.Tensor
    err: torch.Tensor
    ref: torch.Tensor
    rows: torch.Tensor


def grid_errors(inp: AttentionInputs, scores: BlockScores, *, compensate: bool = True,
                sample_rows_per_head: int = DEFAULT_SAMPLE_ROWS,
                grid: tuple[float, ...] = BUDGET_GRID) -> GridErrors:
    """The per-row output error of every grid fraction on a sample of query rows, for the
    block ranking in ``scores`` and the given compensation (module docstring)."""
    b, hq = inp.batch, inp.heads_q
    dev = inp.device
    rows = sample_rows(inp, sample_rows_per_head)
    row_blocks = (rows // BLOCK_M).to(dev)
    fractions = torch.tensor(grid, dtype=torch.float32, device=dev)
    nf = fractions.numel()
    with torch.no_grad():
        pooled_k, pooled_v, count_k = pooled_kv(inp, scores.pooled_k, scores.count_k)
        # per sampled row: which blocks each grid point keeps, with the selection rule's ranking
        prob = scores.prob.index_select(2, row_blocks)  # [B, H, S, Mk]
        cand = scores.candidates.index_select(2, row_blocks)
        forced = scores.forced.index_select(2, row_blocks)
        allowed = scores.allowed.index_select(2, row_blocks)  # [B, 1, S, Mk]
        rank = prob.argsort(-1, descending=True).argsort(-1)
        n_sel = torch.minimum(topk_block_counts(fractions.view(nf, 1, 1, 1, 1), allowed[None]),
                              cand.sum(-1, keepdim=True).float()[None])  # [F, B, H, S, 1]
        kept = forced[None] | (cand[None] & (rank[None] < n_sel))  # [F, B, H, S, Mk]
        skipped = (allowed & (count_k[:, :, None, :] > 0))[None] & ~kept if compensate else None

        err = torch.zeros(nf, b, hq, rows.numel(), device=dev)
        ref = torch.zeros(b, hq, rows.numel(), device=dev)
        for h0 in range(0, hq, _HEADS_PER_CHUNK):
            h1 = min(hq, h0 + _HEADS_PER_CHUNK)
            part_l, part_o, weight, exact = _block_partials(inp, rows, h0, h1, pooled_k, count_k)
            a = kept[:, :, h0:h1].float()
            num = torch.einsum("fbhsj,bhsjd->fbhsd", a, part_o)
            den = (a * part_l).sum(-1)
            if skipped is not None:
                c = skipped[:, :, h0:h1].float() * weight
                group = hq // inp.heads_kv
                pv = pooled_v.index_select(1, torch.arange(h0, h1, device=dev) // group)
                num = num + torch.einsum("fbhsj,bhjd->fbhsd", c, pv)
                den = den + c.sum(-1)
            out = num / den.clamp(min=1e-30)[..., None]
            err[:, :, h0:h1] = (out - exact).abs().sum(-1)
            ref[:, h0:h1] = exact.abs().sum(-1)
    return GridErrors(fractions=fractions, err=err, ref=ref, rows=rows)


def estimate_budgets(inp: AttentionInputs, scores: BlockScores, *, target_l1: float, compensate: bool = True,
                     allocation: str = "call", sample_rows_per_head: int = DEFAULT_SAMPLE_ROWS,
                     grid: tuple[float, ...] = BUDGET_GRID) -> BudgetEstimate:
    """Per-(batch, head) budgets whose measured relative L1 error stays under ``target_l1``
    (over the whole call, or per head: ``allocation``, see `allocate`) for the block ranking
    in ``scores`` (`masks.block_scores`) and the given compensation. See the module docstring."""
    if not 0.0 < target_l1 < 1.0:
        raise ValueError(f"target_l1 must lie in (0, 1), got {target_l1}")
    if allocation not in ("call", "head"):
        raise ValueError(f"allocation must be 'call' or 'head', got {allocation!r}")
    g = grid_errors(inp, scores, compensate=compensate, sample_rows_per_head=sample_rows_per_head, grid=grid)
    row_blocks = (g.rows // BLOCK_M).to(inp.device)
    return _choose(inp, g.fractions, g.err, g.ref, row_blocks, target_l1, g.rows.numel(), allocation)


def allocate(fractions: torch.Tensor, err: torch.Tensor, ref: torch.Tensor, target: float, allocation: str,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Grid index per head: int64 [G, H] for G independent groups (batch elements, or
    (batch, query block) pairs) of H heads.

    ``err`` [F, G, H] is each head's summed absolute error at every grid fraction, ``ref``
    [G, H] its summed |o_dense|; heads where ``valid`` is False keep every block.
    - "head": per head the smallest fraction with err / ref <= target.
    - "call": the fewest kept blocks in the group with sum_h err / sum_h ref <= target: a
      knapsack, solved by its Lagrangian (per head argmin of fraction + lam * err share, lam
      bisected per group to the smallest that fits), or the "head" choice where that keeps
      fewer blocks (it fits too, and the Lagrangian only reaches the convex hull's
      corners). Keeping every block has zero error, so a fitting choice always exists.
    """
    nf = fractions.numel()
    if valid is None:
        valid = torch.ones_like(ref, dtype=torch.bool)
    ok = (err <= target * ref[None]) & valid[None]
    ok[-1] = True
    per_head = ok.float().argmax(0)
    if allocation == "head":
        return per_head
    if allocation != "call":
        raise ValueError(f"allocation must be 'call' or 'head', got {allocation!r}")
    share = err / ref.sum(-1, keepdim=True).clamp(min=1e-30)[None]  # [F, G, H]
    share = torch.where(valid[None] | (torch.arange(nf, device=err.device) == nf - 1).view(nf, 1, 1),
                        share, torch.full_like(share, math.inf))
    cost = fractions.view(1, nf, 1, 1)
    inf_share = torch.isinf(share)[None]
    lo = torch.full(ref.shape[:1], -12.0, device=err.device)  # log lam in [-12, 24]
    hi = torch.full_like(lo, 24.0)
    best = torch.full(ref.shape, nf - 1, dtype=torch.long, device=err.device)
    steps = torch.linspace(0.0, 1.0, _LAMBDA_POINTS, device=err.device)
    for _ in range(2):  # a coarse grid of lam, then a fine one inside the bracket it found
        log_lam = lo[None] + steps[:, None] * (hi - lo)[None]  # [L, G]
        obj = torch.where(inf_share, math.inf, cost + log_lam.exp().view(-1, 1, log_lam.shape[1], 1) * share[None])
        idx = obj.argmin(1)  # [L, G, H]
        total = torch.gather(share[None].expand(log_lam.shape[0], -1, -1, -1), 1, idx[:, None]).squeeze(1).sum(-1)
        fits = total <= target  # [L, G]; lam grows with L, so fits is monotone in L
        found = fits.any(0)
        first = torch.where(found, fits.float().argmax(0), torch.full_like(lo, _LAMBDA_POINTS - 1).long())
        best = torch.where(found[:, None], idx.gather(0, first.view(1, -1, 1).expand(1, -1, idx.shape[2]))[0], best)
        new_hi = log_lam.gather(0, first[None])[0]
        new_lo = log_lam.gather(0, (first - 1).clamp(min=0)[None])[0]
        lo, hi = torch.where(found, new_lo, lo), torch.where(found, new_hi, hi)
    head_cheaper = fractions[per_head].sum(-1) < fractions[best].sum(-1)
    best = torch.where(head_cheaper[:, None], per_head, best)
    return _spend_slack(fractions, share, best, target)


def _spend_slack(fractions: torch.Tensor, share: torch.Tensor, idx: torch.Tensor, target: float) -> torch.Tensor:
    """Greedy descent from a fitting choice: while some head can step one grid point down
    (fewer blocks) and the group still fits, step the one that saves the most blocks per
    unit of error. The Lagrangian stops at a corner of the convex hull, which can leave a
    fifth of the target unused (Wan video at 0.03: L1 0.024, kept 0.188 -> 0.148 after this).
    In numpy on the host: [F, G, H] is small and the loop short (at most H x F steps)."""
    f = fractions.detach().cpu().double().numpy()
    sh = share.detach().cpu().double().numpy()  # [F, G, H]
    cur = idx.detach().cpu().numpy().copy()  # [G, H]
    groups, heads = cur.shape
    g_index, h_index = np.arange(groups)[:, None], np.arange(heads)[None, :]
    with np.errstate(invalid="ignore"):
        for _ in range(heads * f.size):
            now = sh[cur, g_index, h_index]  # [G, H]
            total = now.sum(-1, keepdims=True)
            down = np.maximum(cur - 1, 0)
            d_err = sh[down, g_index, h_index] - now
            fits = (cur > 0) & np.isfinite(d_err) & (total + d_err <= target)
            if not fits.any():
                break
            gain = np.where(fits, (f[cur] - f[down]) / np.maximum(d_err, 1e-12), -1.0)
            pick = gain.argmax(-1)
            step = fits[np.arange(groups), pick]
            cur[np.arange(groups)[step], pick[step]] -= 1
    return torch.from_numpy(cur).to(idx.device)


def _choose(inp: AttentionInputs, fractions: torch.Tensor, err: torch.Tensor, ref: torch.Tensor,
            row_blocks: torch.Tensor, target: float, n_rows: int, allocation: str) -> BudgetEstimate:
    """The budgets of `allocate` over the relevant samples (module docstring)."""
    b, hq, mq = inp.batch, inp.heads_q, inp.num_q_blocks
    nf = fractions.numel()
    if not inp.is_causal:
        e_head, r_head = err.sum(-1), ref.sum(-1)  # [F, B, H], [B, H]
        first = allocate(fractions, e_head, r_head, target, allocation)  # [B, H]
        budget = fractions[first]
        chosen = e_head.gather(0, first[None])[0]
        return BudgetEstimate(topk=budget[..., None].expand(b, hq, mq).contiguous(), head_budget=budget,
                              estimated_l1=chosen / r_head.clamp(min=1e-30),
                              call_l1=chosen.sum(-1) / r_head.sum(-1).clamp(min=1e-30), sampled_rows=n_rows)
    # causal: block i uses only samples of blocks before it: the last CAUSAL_WINDOW samples
    # that can lose anything (rows kept whole by forced blocks say nothing about budgets)
    informative = err[0] > 0  # [B, H, S]
    before = row_blocks[None, :] < torch.arange(mq, device=inp.device)[:, None]  # [Mq, S]
    seen = informative.long().cumsum(-1)  # informative samples up to and including s
    n_before = before.sum(-1)  # samples strictly before block i
    seen_at = torch.where(n_before > 0, seen.index_select(-1, (n_before - 1).clamp(min=0)),
                          torch.zeros_like(seen[..., :1]).expand(b, hq, mq))  # [B, H, Mq]
    window = (before[None, None] & informative[:, :, None, :]
              & (seen_at[..., None] - seen[:, :, None, :] < CAUSAL_WINDOW))  # [B, H, Mq, S]
    wf = window.float()
    cum_err = torch.einsum("fbhs,bhis->fbih", err, wf).reshape(nf, b * mq, hq)
    cum_ref = torch.einsum("bhs,bhis->bih", ref, wf).reshape(b * mq, hq)
    valid = (window.sum(-1) >= CAUSAL_MIN_SAMPLES).transpose(1, 2).reshape(b * mq, hq)
    first = allocate(fractions, cum_err, cum_ref, target * CAUSAL_MARGIN, allocation, valid)
    first = first.view(b, mq, hq).transpose(1, 2)  # [B, H, Mq]
    topk = fractions[first]
    # error each sample gets at its own block's budget
    sample_first = first.index_select(2, row_blocks)  # [B, H, S]
    sample_err = err.gather(0, sample_first[None]).squeeze(0)
    r_head = ref.sum(-1)
    return BudgetEstimate(topk=topk, head_budget=topk[..., -1], estimated_l1=sample_err.sum(-1) / r_head.clamp(min=1e-30),
                          call_l1=sample_err.sum((-1, -2)) / r_head.sum(-1).clamp(min=1e-30), sampled_rows=n_rows)


def mean_budget(estimate: BudgetEstimate) -> float:
    """The mean kept-fraction budget over batch and heads (for reports)."""
    value = float(estimate.head_budget.float().mean())
    return value if math.isfinite(value) else 1.0
