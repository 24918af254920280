"""The passes of one calibration over all its layers (`CalibrationSearch`): statistics per
pass, the per-head choices, verification rounds, and merging the statistics of several
processes. `calibration.runner` feeds it recorded calls; `calibration.search` evaluates
the candidates of one layer."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..ops.attention import sparse_attention_inputs
from ..ops.config import SparseAttentionConfig
from ..ops.dense import dense_attention
from ..ops.inputs import AttentionInputs, per_head
from ..ops.masks import attendable_blocks, predict_from_inputs
from .distributed import all_reduce
from .result import LayerCalibration
from .search import (CallOptions, HeadChoice, LayerStats, SearchGrid, choose_masks, choose_pv, observe_masks,
                     observe_pv)

class CalibrationSearch:
    """Statistics, choices and per-layer configs of one calibration (all layers)."""

    def __init__(self, grid: SearchGrid, target_l1: float, pv_target_l1: float | None,
                 base: SparseAttentionConfig, max_chunk_elements: int, safety: float = 1.0,
                 per_call: bool = True) -> None:
        self.grid, self.base = grid, base
        self.per_call = per_call
        self.safety = safety
        self.target = target_l1 * safety
        self.final_target = target_l1 if pv_target_l1 is None else pv_target_l1
        self.max_chunk_elements = max_chunk_elements
        self.mode = "mask"
        self.stats: dict[str, LayerStats] = {}
        self.targets: dict[str, torch.Tensor] = {}
        self.choices: dict[str, HeadChoice] = {}
        self.pv_values: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}  # wall time per pass kind
        self.backends: dict[str, int] = {}  # backend -> verification calls it ran
        self._configs: dict[str, SparseAttentionConfig] = {}

    def ensure(self, name: str, heads: int) -> LayerStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = LayerStats(heads, len(self.grid.simthreshd1), len(self.grid.levels), len(self.grid.pvthreshd))
            self.stats[name] = stats
        elif stats.heads != heads:
            raise ValueError(f"layer {name!r} was called with {heads} q heads after {stats.heads}; calibration needs "
                             "a fixed head count per layer")
        return stats

    def observe(self, name: str, inp: AttentionInputs, opts: CallOptions, dense_out: torch.Tensor | None) -> None:
        stats = self.ensure(name, inp.heads_q)
        if self.mode == "mask":
            observe_masks(stats, inp, self.grid, opts, max_chunk_elements=self.max_chunk_elements)
        elif self.mode == "pv":
            cfg = self.layer_config(name, opts)
            with torch.no_grad():
                mask = predict_from_inputs(
                    inp, simthreshd1=cfg.effective_simthreshd1, cdfthreshd=None if cfg.topk is not None else cfg.cdfthreshd,
                    topk=cfg.topk, attention_sink=cfg.attention_sink, dense_prefix=cfg.dense_prefix,
                    dense_suffix=cfg.dense_suffix)
            observe_pv(stats, inp, mask, self.grid, max_chunk_elements=self.max_chunk_elements)
        elif self.mode == "verify":
            self._verify(name, stats, inp, opts, dense_out)
        else:
            raise RuntimeError(f"unknown mode {self.mode!r}")

    def _verify(self, name: str, stats: LayerStats, inp: AttentionInputs, opts: CallOptions,
                dense_out: torch.Tensor | None) -> None:
        cfg = self.layer_config(name, opts)
        with torch.no_grad():
            out, st = sparse_attention_inputs(inp, cfg)
            self.backends[st.backend] = self.backends.get(st.backend, 0) + 1
            dense = dense_out if dense_out is not None else dense_attention(inp)
            err = (out.float() - dense.float()).abs().sum(dim=(0, 2, 3))
            ref = dense.float().abs().sum(dim=(0, 2, 3))
            total = float(attendable_blocks(inp).sum())
            if st.fallback_reason is None and st.block_mask is not None:
                kept = st.block_mask.sum(dim=(0, 2, 3)).double()
            else:  # the policy ran it dense
                kept = torch.full((inp.heads_q,), total, dtype=torch.float64)
        stats.add("verify_err", err)
        stats.add("verify_abs", ref)
        stats.maximum("verify_worst", ratio(err, ref))
        stats.add("verify_kept", kept)
        stats.add("verify_total", torch.full((inp.heads_q,), total))

    # -- choices ------------------------------------------------------------------------

    def solve_masks(self, names: Iterable[str]) -> None:
        for name in names:
            stats = self.stats[name]
            if name not in self.targets:
                self.targets[name] = torch.full((stats.heads,), float(self.target), dtype=torch.float64)
            self.choices[name] = choose_masks(stats, self.targets[name], per_call=self.per_call)
            default_pv = math.inf if self.grid.pvthreshd else None
            if default_pv is None:
                self.pv_values[name] = per_head("pvthreshd", self.base.pvthreshd, stats.heads, torch.device("cpu"))
            else:
                self.pv_values[name] = torch.full((stats.heads,), math.inf)
            no_skip = torch.full_like(self.pv_values[name], math.inf)
            self.pv_values[name] = torch.where(self.choices[name].dense, no_skip, self.pv_values[name])
            self._configs.pop(name, None)

    def solve_pv(self, names: Iterable[str]) -> None:
        if not self.grid.pvthreshd:
            return
        pv_grid = torch.tensor(self.grid.pvthreshd, dtype=torch.float32)
        for name in names:
            stats = self.stats[name]
            targets = torch.full((stats.heads,), float(self.final_target * self.safety), dtype=torch.float64)
            choice = choose_pv(stats, self.choices[name], targets, per_call=self.per_call)
            self.choices[name] = choice
            self.pv_values[name] = pv_grid[choice.pv_index]
            self._configs.pop(name, None)

    def measured(self, name: str) -> torch.Tensor:
        """The verified relative L1 per head by the criterion: over all calls, or the worst call."""
        stats = self.stats[name]
        measured = ratio(stats.verify_err, stats.verify_abs)
        return torch.maximum(measured, stats.verify_worst) if self.per_call else measured

    def failing(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Layer -> bool [H] of heads whose measured L1 exceeds the final target."""
        out = {}
        for name in names:
            measured = self.measured(name)
            bad = measured > self.final_target
            if bool(bad.any()):
                out[name] = bad
        return out

    def back_off(self, failing: Mapping[str, torch.Tensor], *, to_dense: bool) -> None:
        """Tighten the failing heads' budgets (by the measured overshoot), drop their
        stage-2 skip; with ``to_dense`` make them dense."""
        for name, bad in failing.items():
            stats = self.stats[name]
            measured = self.measured(name)
            if to_dense:
                choice = self.choices[name]
                choice.dense = choice.dense | bad
                choice.level_index = torch.where(bad, torch.full_like(choice.level_index, len(self.grid.levels) - 1),
                                                 choice.level_index)
                choice.estimated_l1 = torch.where(bad, torch.zeros_like(choice.estimated_l1), choice.estimated_l1)
                choice.kept_fraction = torch.where(bad, torch.ones_like(choice.kept_fraction), choice.kept_fraction)
            else:
                shrink = torch.clamp(self.final_target / measured.clamp(min=1e-12), max=0.8)
                self.targets[name] = torch.where(bad, self.targets[name] * shrink, self.targets[name])
                previous = self.choices[name]
                fresh = choose_masks(stats, self.targets[name], per_call=self.per_call)
                keep = ~bad
                self.choices[name] = HeadChoice(
                    sim_index=torch.where(keep, previous.sim_index, fresh.sim_index),
                    level_index=torch.where(keep, previous.level_index, fresh.level_index),
                    pv_index=torch.where(keep, previous.pv_index, torch.zeros_like(previous.pv_index)),
                    dense=torch.where(keep, previous.dense, fresh.dense),
                    estimated_l1=torch.where(keep, previous.estimated_l1, fresh.estimated_l1),
                    kept_fraction=torch.where(keep, previous.kept_fraction, fresh.kept_fraction))
            no_skip = torch.full_like(self.pv_values[name], math.inf)
            self.pv_values[name] = torch.where(bad, no_skip, self.pv_values[name])
            self._configs.pop(name, None)

    def layer_calibration(self, name: str) -> LayerCalibration:
        stats, choice = self.stats[name], self.choices[name]
        sims = torch.tensor(self.grid.simthreshd1, dtype=torch.float32)
        levels = torch.tensor(self.grid.levels, dtype=torch.float32)
        dense = choice.dense.clone()
        measured = ratio(stats.verify_err, stats.verify_abs).float()
        measured = torch.where(stats.verify_abs > 0, measured, torch.full_like(measured, math.nan))
        worst = torch.where(stats.verify_abs > 0, stats.verify_worst.float(), torch.full_like(measured, math.nan))
        return LayerCalibration(
            heads=stats.heads, calls=int(stats.calls.item()),
            simthreshd1=torch.where(dense, torch.ones(stats.heads), sims[choice.sim_index]),
            level=torch.where(dense, torch.ones(stats.heads), levels[choice.level_index]),
            pvthreshd=torch.where(dense, torch.full((stats.heads,), math.inf), self.pv_values[name].float()),
            dense=dense, estimated_l1=choice.estimated_l1.float(), measured_l1=measured, worst_call_l1=worst,
            kept_fraction=choice.kept_fraction.float(),
            runtime_kept_fraction=ratio(stats.verify_kept, stats.verify_total).float())

    def layer_config(self, name: str, opts: CallOptions) -> SparseAttentionConfig:
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = self.layer_calibration(name).config(self.base, self.grid.method)
            self._configs[name] = cfg
        prefix, suffix = max(cfg.dense_prefix, opts.dense_prefix), max(cfg.dense_suffix, opts.dense_suffix)
        if (prefix, suffix) != (cfg.dense_prefix, cfg.dense_suffix):
            cfg = cfg.replace(dense_prefix=prefix, dense_suffix=suffix)
        return cfg


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


PASS_TENSORS = {"mask": ("mask_err", "dense_abs", "kept", "total", "calls", "mask_worst"),
                 "pv": ("pv_err", "pv_skipped", "pv_visited", "pv_dense_abs", "pv_worst"),
                 "verify": ("verify_err", "verify_abs", "verify_kept", "verify_total", "verify_worst")}


def run_passes(search: CalibrationSearch, run_pass: Callable[[str], list[str]], max_verify_rounds: int) -> int:
    """Mask pass, stage-2 pass, verification rounds; ``run_pass(mode)`` feeds the calls
    and returns the layer names that have statistics. Returns the rounds used."""
    def timed(mode: str) -> list[str]:
        start = time.perf_counter()
        search.mode = mode
        out = run_pass(mode)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        search.seconds[mode] = search.seconds.get(mode, 0.0) + time.perf_counter() - start
        return out

    names = timed("mask")
    search.solve_masks(names)
    if search.grid.pvthreshd:
        timed("pv")
        search.solve_pv(names)
    rounds = 0
    for rnd in range(max_verify_rounds):
        rounds = rnd + 1
        for name in names:
            search.stats[name].reset(*PASS_TENSORS["verify"])
        timed("verify")
        failing = search.failing(names)
        if not failing:
            break
        if rnd == max_verify_rounds - 1:
            search.back_off(failing, to_dense=True)
            warnings.warn(f"calibration: {sum(int(b.sum()) for b in failing.values())} head(s) still exceeded the "
                          f"target after {max_verify_rounds} verification rounds and were made dense without a "
                          "further check", RuntimeWarning, stacklevel=3)
            break
        search.back_off(failing, to_dense=rnd == max_verify_rounds - 2)
    return rounds


def merge_over_processes(search: CalibrationSearch, dist: Any, names: list[str], mode: str) -> None:
    """Add up the statistics of ``mode`` over the processes (layers in a fixed order;
    layers a process never saw get zero statistics of the agreed head count)."""
    if dist is None:
        return
    if mode == "mask":
        heads = torch.tensor([float(search.stats[n].heads) if n in search.stats else 0.0 for n in names])
        (heads,) = all_reduce(dist, [heads], op="max")
        for n, h in zip(names, heads.tolist()):
            if h > 0:
                search.ensure(n, int(h))
    present = [n for n in names if n in search.stats]
    for op in ("sum", "max"):
        keys = [key for key in PASS_TENSORS[mode] if (key in LayerStats.MAXIMA) == (op == "max")]
        merged = all_reduce(dist, [search.stats[n].tensors[key] for n in present for key in keys], op=op)
        i = 0
        for n in present:
            for key in keys:
                search.stats[n].tensors[key] = merged[i]
                i += 1
