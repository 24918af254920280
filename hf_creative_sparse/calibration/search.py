"""The vectorised per-head threshold search behind `calibrate` (one attention layer).

SpargeAttn tunes each head by bisection, one kernel call per candidate, and its users
report hours to days per model. Here every candidate is evaluated from statistics that
are computed once per recorded call:

1. **Mask candidates** (simthreshd1 x cdfthreshd-or-topk). For every simthreshd1 on the
   grid, the predictor's ranking of key blocks (the compressed softmax of pooled q/k, as
   `predict_from_inputs`) gives each (query block, key block) pair the first selection
   level that keeps it: ``seg`` in [0, C], 0 for blocks that are always kept (not
   self-similar, sink, text, causal diagonal), C for "never". The masks of all C levels
   are nested: level c keeps ``seg <= c``. They equal the predictor's masks exactly.
2. **Block statistics** (exact, float32). Per query-block chunk: scores s = q k^T * scale,
   the row max m, and per (row, key block j) the mass l_rj = sum_c exp(s_rc - m) and
   the numerator PV_rj = sum_c exp(s_rc - m) v_c. The output of any block mask is
   (sum of PV_rj over kept j) / (sum of l_rj over kept j) -- the reference semantics --
   so all C nested masks cost one [C, Mk] @ [Mk, 128 * D] product per query block, 1/64
   of a dense P@V each, instead of a kernel call each. Dense attention is the sum over
   all blocks.
3. **Stage-2 candidates** (pvthreshd), once the mask is chosen: the block maxima and
   their exclusive running maximum over kept blocks give, per candidate threshold, the
   (row, block) pairs the kernel skips (as `reference_attention`: a skipped block never
   raises the running max, so the running max is the cumulative max of the kept blocks);
   the output without them is again a weighted sum of PV_rj.

Errors are SpargeAttn's relative L1, sum |out - dense| / sum |dense| per head, summed
over the recorded calls (numerator and denominator separately, so statistics from
several processes merge by addition), and the largest relative L1 of a single call
(merged by maximum). Memory is bounded by chunking over query blocks:
the largest tensors are [B, H, Qc*128, Nk] scores and [B, H, Qc, Mk, 128, D] block
numerators, with Qc chosen from ``max_chunk_elements``; never N x N per head at once.

The estimates are exact float32 math; `calibrate` still verifies the chosen thresholds
with real `sparse_attention` calls (kernel precision, the dense-fallback policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..ops.config import BLOCK_M, BLOCK_N
from ..ops.inputs import AttentionInputs
from ..ops.masks import attendable_blocks, block_scores, topk_block_counts

#: simthreshd1 candidates: a lower value calls more blocks self-similar, so fewer are
#: kept unconditionally (sparser); the pooled mean cosine similarity lies in [0, 1].
SIM_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)
#: cdfthreshd candidates (ascending; 1.0 keeps every block, so some candidate always fits).
#: The tail reaches 1 - 1e-6: a sharp head's compressed softmax puts almost all its mass
#: on a few blocks, so the levels that add its next blocks lie very close to 1.
CDF_GRID: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999,
                               0.99999, 0.999999, 1.0)
#: topk candidates: a geometric grid of kept fractions from 2% to all.
TOPK_GRID: tuple[float, ...] = (0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.55, 0.75, 0.9, 1.0)
#: pvthreshd candidates (descending; inf = no stage-2 skip). A kept block is skipped for a
#: row when its scores are more than this below the row's running max (weights < e^-t).
PV_GRID: tuple[float, ...] = (math.inf, 40.0, 30.0, 20.0, 15.0, 12.0, 10.0, 8.0, 6.0, 4.0)
#: Default bound on the elements of the largest chunk tensor (float32): 2**27 = 512 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 2 ** 27
METHODS = ("cdf", "topk")


def _check_grid(name: str, values: object, low: float, high: float, *, allow_inf: bool = False) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of floats, got {type(values).__name__}")
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must hold floats, got {x!r}")
        x = float(x)
        if math.isnan(x) or not (low <= x <= high or (allow_inf and x == math.inf)):
            raise ValueError(f"{name} values must lie in [{low}, {high}]{' or be inf' if allow_inf else ''}, got {x}")
        out.append(x)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


@dataclass(frozen=True)
class SearchGrid:
    """The candidate thresholds `calibrate` evaluates per head.

    Attributes:
        method: "cdf" (``levels`` are cdfthreshd values, SpargeAttn's choice) or "topk"
            (``levels`` are kept fractions).
        simthreshd1: candidate self-similarity thresholds.
        levels: candidate cdfthreshd / topk values; sorted ascending, and 1.0 (keep every
            block) is added when missing, so every head has a candidate that fits any
            budget. Default `CDF_GRID` or `TOPK_GRID`.
        pvthreshd: stage-2 candidates; sorted descending with inf (no skip) added. An
            empty tuple turns the stage-2 search off (the base config's pvthreshd is kept).

    Example:
        >>> SearchGrid(method="topk", levels=(0.1, 0.5)).levels
        (0.1, 0.5, 1.0)
    """

    method: str = "cdf"
    simthreshd1: tuple[float, ...] = SIM_GRID
    levels: tuple[float, ...] | None = None
    pvthreshd: tuple[float, ...] = PV_GRID

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        sims = tuple(sorted(set(_check_grid("simthreshd1", self.simthreshd1, -1.0, 2.0))))
        levels = self.levels if self.levels is not None else (CDF_GRID if self.method == "cdf" else TOPK_GRID)
        levels = _check_grid("levels", levels, 0.0, 1.0)
        if self.method == "topk" and min(levels) <= 0.0:
            raise ValueError(f"topk levels must lie in (0, 1], got {min(levels)}")
        levels = tuple(sorted(set(levels) | {1.0}))
        pv = tuple(self.pvthreshd)
        if pv:
            pv = tuple(sorted(set(_check_grid("pvthreshd", pv, 0.0, math.inf, allow_inf=True)) | {math.inf},
                              reverse=True))
        object.__setattr__(self, "simthreshd1", sims)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "pvthreshd", pv)

    def to_dict(self) -> dict:
        return {"method": self.method, "simthreshd1": list(self.simthreshd1), "levels": list(self.levels),
                "pvthreshd": ["inf" if math.isinf(x) else x for x in self.pvthreshd]}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchGrid":
        pv = tuple(math.inf if x == "inf" else float(x) for x in data.get("pvthreshd", ()))
        return cls(method=data["method"], simthreshd1=tuple(data["simthreshd1"]), levels=tuple(data["levels"]),
                   pvthreshd=pv)


@dataclass(frozen=True)
class CallOptions:
    """The parts of a call's config that shape its block mask."""

    dense_prefix: int = 0
    dense_suffix: int = 0
    attention_sink: bool = False


# -- stage 1: the nested candidate masks ------------------------------------------------


def candidate_segments(inp: AttentionInputs, grid: SearchGrid, opts: CallOptions) -> torch.Tensor:
    """The first selection level that keeps each block, for every simthreshd1 candidate.

    Returns:
        int64 [S, B, Hq, Mq, Mk] with values in [0, C] (C = len(grid.levels)): the block
        mask that `predict_from_inputs` gives for ``simthreshd1=grid.simthreshd1[s]`` and
        level ``grid.levels[c]`` is ``seg[s] <= c``. C means "never kept" (not attendable).
    """
    device = inp.device
    levels = torch.tensor(grid.levels, dtype=torch.float32, device=device)
    n_levels = levels.numel()
    positions = torch.arange(inp.num_k_blocks, device=device)
    out = []
    for s in grid.simthreshd1:  # the predictor's own scores (masks.block_scores): one path for both
        scores = block_scores(inp, simthreshd1=s, attention_sink=opts.attention_sink,
                              dense_prefix=opts.dense_prefix, dense_suffix=opts.dense_suffix)
        prob, candidates, allowed = scores.prob, scores.candidates, scores.allowed
        sorted_prob, order = prob.sort(dim=-1, descending=True)  # the predictor's own ordering
        n_candidates = candidates.sum(-1, keepdim=True)  # [B, H, Mq, 1]
        if grid.method == "topk":
            n_select = torch.minimum(topk_block_counts(levels, allowed), n_candidates.float())
        else:
            cdf = sorted_prob.cumsum(-1)
            below = (cdf[..., None] < levels).sum(-2) + 1  # [B, H, Mq, C]
            n_select = torch.where(levels >= 1.0, n_candidates, torch.minimum(below, n_candidates)).float()
        # sorted position p is selected at level c iff p < n_select[c]; n_select grows with c
        first_sorted = (n_select[..., None, :] <= positions[:, None].float()).sum(-1)  # [B, H, Mq, Mk]
        first = torch.empty_like(first_sorted).scatter_(-1, order, first_sorted)
        never = torch.full_like(first, n_levels)
        seg = torch.where(scores.forced, torch.zeros_like(first), torch.where(candidates, first, never))
        out.append(torch.where(allowed, seg, torch.full_like(seg, n_levels)))
    return torch.stack(out)


# -- stage 2: exact block statistics, chunked over query blocks --------------------------


@dataclass
class _Chunk:
    """Block statistics of query blocks [qb0, qb1) (rows padded to whole blocks).

    pv: float32 [B, Hq, Qc, Mk, 128, D]; mass: [B, Hq, Qc, Mk, 128]; dense: [B, Hq, Qc, 128, D];
    row_valid: [Qc, 128] (rows past len_q are padding); block_max: [B, Hq, Qc, 128, Mk]
    (only when asked; -inf where the block has no usable key for the row).
    """

    qb0: int
    qb1: int
    pv: torch.Tensor
    mass: torch.Tensor
    dense: torch.Tensor
    row_valid: torch.Tensor
    block_max: torch.Tensor | None = None


def chunk_blocks(inp: AttentionInputs, max_chunk_elements: int) -> int:
    """Query blocks per chunk so the largest chunk tensor stays under ``max_chunk_elements``."""
    per_block = inp.batch * inp.heads_q * BLOCK_M * max(inp.num_k_blocks * BLOCK_N, inp.num_k_blocks * inp.head_dim)
    return max(1, min(inp.num_q_blocks, max_chunk_elements // max(per_block, 1)))


def iter_chunks(inp: AttentionInputs, *, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
                with_block_max: bool = False):
    """Yield `_Chunk` statistics over all query blocks of ``inp``."""
    b, hq, nq, d = inp.q.shape
    hkv, nk = inp.heads_kv, inp.len_k
    group = hq // hkv
    mk = inp.num_k_blocks
    nkp = mk * BLOCK_N
    device = inp.device
    k = torch.nn.functional.pad(inp.k.float(), (0, 0, 0, nkp - nk))
    v = torch.nn.functional.pad(inp.v.float(), (0, 0, 0, nkp - nk)).view(b, hkv, mk, BLOCK_N, d)
    cols = torch.arange(nkp, device=device)
    col_ok = cols < nk
    if inp.key_padding_mask is not None:
        kpm = torch.nn.functional.pad(inp.key_padding_mask, (0, nkp - nk), value=False)
        col_ok = col_ok[None, :] & kpm  # [B, Nkp]
    else:
        col_ok = col_ok[None, :]
    step = chunk_blocks(inp, max_chunk_elements)
    for qb0 in range(0, inp.num_q_blocks, step):
        qb1 = min(inp.num_q_blocks, qb0 + step)
        qc = qb1 - qb0
        r0, r1 = qb0 * BLOCK_M, min(nq, qb1 * BLOCK_M)
        rows = qc * BLOCK_M
        q = torch.nn.functional.pad(inp.q[:, :, r0:r1].float(), (0, 0, 0, rows - (r1 - r0)))
        s = (q.reshape(b, hkv, group * rows, d) @ k.transpose(-1, -2)).view(b, hq, rows, nkp)
        s.mul_(inp.scale)
        usable = col_ok[:, None, None, :]  # [B or 1, 1, 1, Nkp]
        if inp.is_causal:
            row_ids = torch.arange(r0, r0 + rows, device=device)
            usable = usable & (cols[None, :] <= row_ids[:, None])[None, None]
        s.masked_fill_(~usable, float("-inf"))
        block_max = None
        if with_block_max:
            block_max = s.view(b, hq, qc, BLOCK_M, mk, BLOCK_N).amax(-1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = s.sub_(m).exp_()  # [B, Hq, rows, Nkp]; masked entries are 0
        mass = p.view(b, hq, qc, BLOCK_M, mk, BLOCK_N).sum(-1).permute(0, 1, 2, 4, 3)  # [B, Hq, Qc, Mk, 128]
        # per key block: [B, Hkv, Mk, group * rows, 64] @ [B, Hkv, Mk, 64, D]
        p_blocks = p.view(b, hkv, group * rows, mk, BLOCK_N).permute(0, 1, 3, 2, 4)
        pv = p_blocks @ v  # [B, Hkv, Mk, group * rows, D]
        del p, p_blocks, s
        pv = pv.view(b, hkv, mk, group, qc, BLOCK_M, d).permute(0, 1, 3, 4, 2, 5, 6).reshape(b, hq, qc, mk, BLOCK_M, d)
        total = mass.sum(3)  # [B, Hq, Qc, 128]
        dense = pv.sum(3) / torch.where(total == 0, torch.ones_like(total), total)[..., None]
        row_valid = (torch.arange(r0, r0 + rows, device=device) < nq).view(qc, BLOCK_M)
        yield _Chunk(qb0, qb1, pv, mass.contiguous(), dense, row_valid, block_max)


def _weighted_outputs(weights: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """Outputs for per-block weights [B, H, Qc, C, Mk] (shared by the 128 rows of a
    query block): [B, H, Qc, C, 128, D]."""
    b, h, qc, mk, rows, d = chunk.pv.shape
    n = weights.shape[3]
    num = (weights @ chunk.pv.reshape(b, h, qc, mk, rows * d)).view(b, h, qc, n, rows, d)
    den = weights @ chunk.mass  # [B, H, Qc, C, 128]
    return num / torch.where(den == 0, torch.ones_like(den), den)[..., None]


def _l1_per_head(out: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """sum |out - dense| over batch, rows (valid only) and D for out [B, H, Qc, C, 128, D]: [H, C] float64."""
    diff = (out - chunk.dense[:, :, :, None]).abs().sum(-1)  # [B, H, Qc, C, 128]
    diff = diff * chunk.row_valid[None, None, :, None, :]
    return diff.sum(dim=(0, 2, 4)).double()


def _dense_l1(chunk: _Chunk) -> torch.Tensor:
    """sum |dense| per head: [H] float64."""
    return (chunk.dense.abs().sum(-1) * chunk.row_valid[None, None]).sum(dim=(0, 2, 3)).double()


# -- the per-layer accumulators ----------------------------------------------------------


@dataclass
class LayerStats:
    """Summed statistics of one layer over the recorded calls (merge by addition).

    Shapes: H q heads, S simthreshd1 candidates, C levels, P pvthreshd candidates.

    Attributes:
        mask_err: [H, S, C] sum |out - dense| of each mask candidate.
        dense_abs: [H] sum |dense|.
        kept: [H, S, C] kept blocks of each mask candidate; total: [H] attendable blocks.
        pv_err: [H, P] sum |out - dense| with the chosen mask and each pvthreshd candidate.
        pv_skipped: [H, P] skipped (row, block) pairs; pv_visited: [H] visited pairs.
        pv_dense_abs: [H] sum |dense| seen by the stage-2 pass.
        verify_err, verify_abs: [H] measured with real `sparse_attention` calls.
        verify_kept: [H] kept blocks of those calls (all attendable ones for a dense
            fallback); verify_total: [H] attendable blocks.
        calls: [1] recorded calls (of the mask pass).
        mask_worst, pv_worst, verify_worst: the largest relative L1 of a single call
            ([H, S, C], [H, P], [H]); merged by maximum, not by addition.
    """

    heads: int
    sims: int
    levels: int
    pvs: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    SHAPES = {"mask_err": "HSC", "dense_abs": "H", "kept": "HSC", "total": "H", "pv_err": "HP", "pv_skipped": "HP",
              "pv_visited": "H", "pv_dense_abs": "H", "verify_err": "H", "verify_abs": "H", "verify_kept": "H",
              "verify_total": "H", "calls": "1", "mask_worst": "HSC", "pv_worst": "HP", "verify_worst": "H"}
    #: Statistics merged by maximum (the others by addition).
    MAXIMA = ("mask_worst", "pv_worst", "verify_worst")

    def __post_init__(self) -> None:
        sizes = {"H": self.heads, "S": self.sims, "C": self.levels, "P": max(self.pvs, 1), "1": 1}
        for name, dims in self.SHAPES.items():
            if name not in self.tensors:
                self.tensors[name] = torch.zeros(*(sizes[c] for c in dims), dtype=torch.float64)

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors")
        if tensors is not None and name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] += value.detach().to("cpu", torch.float64)

    def maximum(self, name: str, value: torch.Tensor) -> None:
        torch.maximum(self.tensors[name], value.detach().to("cpu", torch.float64), out=self.tensors[name])

    def reset(self, *names: str) -> None:
        for name in names:
            self.tensors[name].zero_()


def observe_masks(stats: LayerStats, inp: AttentionInputs, grid: SearchGrid, opts: CallOptions, *,
                  max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
    """Add one call's mask-candidate errors and kept-block counts to ``stats``."""
    with torch.no_grad():
        seg = candidate_segments(inp, grid, opts)  # [S, B, H, Mq, Mk]
        n_levels = len(grid.levels)
        level_ids = torch.arange(n_levels, device=inp.device)
        kept = (seg[..., None] <= level_ids).sum(dim=(1, 3, 4))  # [S, H, C]
        stats.add("kept", kept.permute(1, 0, 2))
        stats.add("total", torch.full((inp.heads_q,), float(attendable_blocks(inp).sum())))
        err = torch.zeros(inp.heads_q, len(grid.simthreshd1), n_levels, dtype=torch.float64, device=inp.device)
        dense_abs = torch.zeros(inp.heads_q, dtype=torch.float64, device=inp.device)
        for chunk in iter_chunks(inp, max_chunk_elements=max_chunk_elements):
            dense_abs += _dense_l1(chunk)
            for s_idx in range(len(grid.simthreshd1)):
                weights = (seg[s_idx, :, :, chunk.qb0:chunk.qb1, None, :] <= level_ids[:, None]).float()
                err[:, s_idx] += _l1_per_head(_weighted_outputs(weights, chunk), chunk)
        stats.add("mask_err", err)
        stats.add("dense_abs", dense_abs)
        stats.maximum("mask_worst", _ratio(err, dense_abs[:, None, None]))
        stats.add("calls", torch.ones(1))


def observe_pv(stats: LayerStats, inp: AttentionInputs, block_mask: torch.Tensor, grid: SearchGrid, *,
               max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
    """Add one call's stage-2 candidate errors for the chosen ``block_mask`` (bool
    [B, H, Mq, Mk], the mask the predictor gives with the chosen thresholds)."""
    if not grid.pvthreshd:
        return
    with torch.no_grad():
        thr = torch.tensor(grid.pvthreshd, dtype=torch.float32, device=inp.device)
        n_pv = thr.numel()
        err = torch.zeros(inp.heads_q, n_pv, dtype=torch.float64, device=inp.device)
        skipped = torch.zeros(inp.heads_q, n_pv, dtype=torch.float64, device=inp.device)
        visited = torch.zeros(inp.heads_q, dtype=torch.float64, device=inp.device)
        dense_abs = torch.zeros(inp.heads_q, dtype=torch.float64, device=inp.device)
        for chunk in iter_chunks(inp, max_chunk_elements=max_chunk_elements, with_block_max=True):
            kept = block_mask[:, :, chunk.qb0:chunk.qb1, None, :]  # [B, H, Qc, 1, Mk]
            bmax = chunk.block_max  # [B, H, Qc, 128, Mk]
            has_keys = kept & torch.isfinite(bmax) & chunk.row_valid[None, None, :, :, None]
            kept_max = bmax.masked_fill(~kept, float("-inf"))
            shifted = torch.nn.functional.pad(kept_max[..., :-1], (1, 0), value=float("-inf"))
            running = torch.cummax(shifted, dim=-1).values
            gain = bmax - running
            # [B, H, Qc, 128, Mk, P]: skipped at threshold p
            skip = (gain[..., None] < -thr) & (has_keys & torch.isfinite(running))[..., None]
            use = (kept[..., None] & ~skip).float()
            # per row: [P, Mk] @ [Mk, D]
            pv_rows = chunk.pv.permute(0, 1, 2, 4, 3, 5)  # [B, H, Qc, 128, Mk, D]
            num = use.transpose(-1, -2) @ pv_rows  # [B, H, Qc, 128, P, D]
            den = (use * chunk.mass.permute(0, 1, 2, 4, 3)[..., None]).sum(-2)  # [B, H, Qc, 128, P]
            out = num / torch.where(den == 0, torch.ones_like(den), den)[..., None]
            diff = (out - chunk.dense[:, :, :, :, None]).abs().sum(-1) * chunk.row_valid[None, None, :, :, None]
            err += diff.sum(dim=(0, 2, 3)).double()
            skipped += skip.sum(dim=(0, 2, 3, 4)).double()
            visited += has_keys.sum(dim=(0, 2, 3, 4)).double()
            dense_abs += _dense_l1(chunk)
        stats.add("pv_err", err)
        stats.maximum("pv_worst", _ratio(err, dense_abs[:, None]))
        stats.add("pv_skipped", skipped)
        stats.add("pv_visited", visited)
        stats.add("pv_dense_abs", dense_abs)


# -- the choice ---------------------------------------------------------------------------


@dataclass
class HeadChoice:
    """Chosen thresholds per head of one layer (tensors [H]).

    ``sim_index`` / ``level_index`` index the grid (level index C-1 is 1.0 = keep all);
    ``dense`` marks heads that keep every block (and skip nothing).
    """

    sim_index: torch.Tensor
    level_index: torch.Tensor
    pv_index: torch.Tensor
    dense: torch.Tensor
    estimated_l1: torch.Tensor
    kept_fraction: torch.Tensor


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def choose_masks(stats: LayerStats, targets: torch.Tensor, *, per_call: bool = False) -> HeadChoice:
    """Per head, the mask candidate with the fewest kept blocks whose estimated relative
    L1 is at most ``targets`` [H] (ties: the smaller error): the L1 over all calls, or
    with ``per_call`` that of the worst single call (which bounds the former). A head
    whose best candidate keeps every block is dense."""
    err = _ratio(stats.mask_err, stats.dense_abs[:, None, None])  # [H, S, C]
    if per_call:
        err = torch.maximum(err, stats.mask_worst)
    kept = stats.kept
    feasible = err <= targets[:, None, None]
    heads, sims, levels = err.shape
    # lexicographic: kept blocks, then error; infeasible last
    big = kept.max() + 1.0 if kept.numel() else torch.tensor(1.0, dtype=torch.float64)
    key = torch.where(feasible, kept + err.clamp(max=0.999999) / 1.0, big * 2.0 + err)
    flat = key.view(heads, -1).argmin(-1)
    sim_index, level_index = flat // levels, flat % levels
    rows = torch.arange(heads)
    chosen_kept = kept[rows, sim_index, level_index]
    total = stats.total
    dense = (chosen_kept >= total) | (level_index == levels - 1) | (total == 0)
    kept_fraction = torch.where(total > 0, chosen_kept / total.clamp(min=1.0), torch.ones_like(total))
    estimated = err[rows, sim_index, level_index]
    level_index = torch.where(dense, torch.full_like(level_index, levels - 1), level_index)
    kept_fraction = torch.where(dense, torch.ones_like(kept_fraction), kept_fraction)
    estimated = torch.where(dense, torch.zeros_like(estimated), estimated)
    return HeadChoice(sim_index=sim_index, level_index=level_index, pv_index=torch.zeros(heads, dtype=torch.long),
                      dense=dense, estimated_l1=estimated, kept_fraction=kept_fraction)


def choose_pv(stats: LayerStats, choice: HeadChoice, targets: torch.Tensor, *, per_call: bool = False) -> HeadChoice:
    """Per (non-dense) head, the pvthreshd candidate that skips the most (row, block)
    pairs with estimated relative L1 (mask and skip together; with ``per_call`` of the
    worst call) at most ``targets`` [H]; index 0 (inf, no skip) when none does."""
    err = _ratio(stats.pv_err, stats.pv_dense_abs[:, None])  # [H, P]
    if per_call:
        err = torch.maximum(err, stats.pv_worst)
    feasible = err <= targets[:, None]
    feasible[:, 0] = True
    skipped = torch.where(feasible, stats.pv_skipped, torch.full_like(stats.pv_skipped, -1.0))
    # most skipped; ties -> the larger threshold (lower index)
    best = torch.argmax(skipped - torch.arange(skipped.shape[1], dtype=torch.float64) * 1e-9, dim=-1)
    skips_nothing = stats.pv_skipped.gather(1, best[:, None])[:, 0] <= 0
    best = torch.where(choice.dense | skips_nothing, torch.zeros_like(best), best)
    estimated = torch.where(best > 0, err.gather(1, best[:, None])[:, 0], choice.estimated_l1)
    return HeadChoice(sim_index=choice.sim_index, level_index=choice.level_index, pv_index=best, dense=choice.dense,
                      estimated_l1=estimated, kept_fraction=choice.kept_fraction)
