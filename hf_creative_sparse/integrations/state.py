"""Per-layer runtime state of a patched attention layer.

Every attention layer that a `ModelPatch` takes over owns one `LayerState`. The layer's
processor computes q/k/v exactly as the model would and hands them to
`LayerState.attend`, which decides *how* to attend on this call:

1. ``dense_steps``: the first denoising steps run dense (dLLM-Serve's ``delay_step``:
   the layout of the image is decided early, when attention is least predictable);
2. the sparsity dial: with a `TwoStageSchedule`, progress = step / num_steps -> s ->
   kernel thresholds through `SparsityController`; else the ``s`` published by a running
   logits processor (`control.current_sparsity()`); else the fixed config;
3. ``mask_refresh``: the block mask is predicted every k steps and reused in between (the
   pattern is stable across neighbouring denoising steps), one cached mask per call slot
   within a step so the conditional and unconditional passes of classifier-free guidance
   never share a mask;
4. the ops (`sparse_attention_inputs`), then statistics and the per-call hooks.

The denoising step comes from a `StepClock` that the API shares between all layers of a
handle: driven by the pipeline's scheduler (``set_timesteps`` starts a loop, ``step``
ends a step) or, for a bare transformer, by the ``timestep`` argument of its forward.

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.config import SparseAttentionConfig
    >>> from hf_creative_sparse.integrations.state import LayerState
    >>> state = LayerState("blocks.0.attn", SparseAttentionConfig(topk=0.5, min_seq_len=0))
    >>> q = k = v = torch.randn(1, 2, 256, 32)
    >>> state.attend(q, k, v).shape
    torch.Size([1, 2, 256, 32])
    >>> state.report_row()["calls"]
    1
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ops.config import SparseAttentionConfig, SparseStats
from ..ops.attention import early_fallback, path_seconds_for, sparse_attention_inputs
from ..ops.estimate import estimate_budgets
from ..ops.gpu_policy import explicit_budget_reason
from ..ops.masks import block_scores
from ..ops.dense import dense_attention, run_cudnn_direct
from ..ops.inputs import AttentionInputs, attention_inputs
from .call_timer import CallTimer
from .options import PatchOptions, StepClock  # noqa: F401  (StepClock re-exported: the patches import it here)

#: Fallback reason recorded for the first ``dense_steps`` denoising steps.
DENSE_STEP_REASON = "dense step"


def _calibrated_under_schedule(calibrated: SparseAttentionConfig, point: Any) -> SparseAttentionConfig:
    """A calibrated layer at dial point ``point``: the calibration holds the sparsest
    thresholds that meet its error budget, so the schedule may make the layer denser but
    never sparser. A dense point gives dense attention; a top-k calibration keeps, per
    head, the larger of its kept fraction and the point's budget; a cdf calibration keeps
    its thresholds (its kept fraction is data-dependent and cannot be compared)."""
    dense = point.attention_config(calibrated)
    if getattr(point, "is_dense", False):
        return dense
    if calibrated.topk is None:
        return calibrated
    budget = float(point.attention_budget)
    topk = calibrated.topk
    topk = torch.clamp(topk.float(), min=budget) if isinstance(topk, torch.Tensor) else max(float(topk), budget)
    return calibrated.replace(topk=topk)


@dataclass
class AttentionCall:
    """What one `LayerState.attend` call did; handed to the layer's hooks.

    Attributes:
        layer: the layer name.
        step: the denoising step (`StepClock.step`) of the call.
        s: the sparsity dial used (None for a fixed config or a dense step).
        inputs: the validated q/k/v (HND views) with scale and key padding mask.
        config: the thresholds used (None for a dense step).
        stats: what the ops reported (``stats.block_mask`` is the mask used, if any).
        output: the attention output, HND [B, Hq, Nq, D].
        mask_reused: the block mask came from the cache (``mask_refresh``).
    """

    layer: str
    step: int
    s: float | None
    inputs: AttentionInputs
    config: SparseAttentionConfig | None
    stats: SparseStats
    output: torch.Tensor
    mask_reused: bool


Hook = Callable[[AttentionCall], None]


@dataclass
class _Budgets:
    topk: torch.Tensor  # float32 [Hq]
    step: int
    estimated_l1: float | None
    target_l1: float


@dataclass
class _DenseSlot:
    """A call slot's dense decision (`LayerState._dense_slot_key`): the config it was made
    with, the cuDNN op to run (or None: `dense_attention`), the warm-up it applies after,
    whether budgets were to be measured, and the stats every such call reports."""

    config: SparseAttentionConfig
    op: Any
    warmup: int
    measuring: bool
    stats: SparseStats


@dataclass
class _CachedMask:
    mask: torch.Tensor
    loop: int
    step: int
    key: str


def _config_key(cfg: SparseAttentionConfig) -> str:
    return repr(sorted(cfg.to_dict().items()))


def _reason_category(reason: str) -> str:
    """'short sequence: len_k=..' -> 'short sequence' (the part before the details)."""
    return reason.split(":", 1)[0].strip()


@dataclass
class _Totals:
    # the sums may be 0-d device tensors (`SparseStats.raw`): read when reported, not per call
    calls: int = 0
    sparse_calls: int = 0
    kept_sum: float | torch.Tensor = 0.0
    predicted_sum: float | torch.Tensor = 0.0
    predicted_calls: int = 0
    pv_skipped_sum: float | torch.Tensor = 0.0
    masks_reused: int = 0
    backends: collections.Counter = field(default_factory=collections.Counter)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)


class LayerState:
    """Runtime state of one patched attention layer (see the module docstring).

    Args:
        name: the layer's name in the model (e.g. ``"transformer_blocks.0.attn"``).
        config: its kernel thresholds (possibly calibrated for this layer).
        schedule: a `TwoStageSchedule`; maps progress to s, then s to thresholds.
        clock: the shared `StepClock` (a private one when None: step stays 0).
        options: `PatchOptions` (dense_steps, mask_refresh, controller).
    """

    def __init__(self, name: str, config: SparseAttentionConfig, *, schedule: Any = None,
                 clock: StepClock | None = None, options: PatchOptions | None = None,
                 calibrated: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(config, SparseAttentionConfig):
            raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
        if schedule is not None and not hasattr(schedule, "s_at"):
            raise TypeError(f"schedule must be a TwoStageSchedule (with s_at(progress)), got {type(schedule).__name__}")
        if options is not None and not isinstance(options, PatchOptions):
            raise TypeError(f"options must be a PatchOptions, got {type(options).__name__}")
        self.name = name
        self.config = config
        self.calibrated = bool(calibrated)
        self.schedule = schedule
        self.clock = clock if clock is not None else StepClock()
        self.options = options if options is not None else PatchOptions()
        self.last_stats: SparseStats | None = None
        self.last_s: float | None = None
        self._hooks: list[Hook] = []
        self._masks: dict[int, _CachedMask] = {}
        self._dense_slots: dict[tuple, _DenseSlot] = {}
        self._budgets: dict[int, _Budgets] = {}
        self._resolved: dict[tuple, SparseAttentionConfig] = {}
        self._controller = self.options.controller
        self._totals = _Totals()
        self._timer = CallTimer()

    # -- the dial -------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The current denoising step (0-based)."""
        return self.clock.step

    def current_s(self) -> float | None:
        """The sparsity dial for this call: the schedule's s at the clock's progress, else
        the s a running logits processor published, else None (fixed config)."""
        if self.schedule is not None:
            progress = self.clock.progress()
            if progress is not None:
                return float(self.schedule.s_at(progress))
        from ..creative.control import current_sparsity  # local: control imports nothing of ours at import time

        return current_sparsity()

    def config_for(self, s: float | None, dense_prefix: int = 0, dense_suffix: int = 0) -> SparseAttentionConfig:
        """The thresholds used at dial ``s`` (None: the fixed config) with the call's text
        tokens kept dense (the larger of the config's and the call's prefix/suffix)."""
        key = (s, dense_prefix, dense_suffix)
        cfg = self._resolved.get(key)
        if cfg is not None:
            return cfg
        cfg = self.config
        if s is not None:
            if self._controller is None:
                from ..creative.control import SparsityController

                self._controller = SparsityController()
            point = self._controller.get_sparsity_params(s)
            cfg = _calibrated_under_schedule(cfg, point) if self.calibrated else point.attention_config(cfg)
        prefix, suffix = max(cfg.dense_prefix, dense_prefix), max(cfg.dense_suffix, dense_suffix)
        if (prefix, suffix) != (cfg.dense_prefix, cfg.dense_suffix):
            cfg = cfg.replace(dense_prefix=prefix, dense_suffix=suffix)
        if len(self._resolved) > 256:  # a continuous dial; keep the memo bounded
            self._resolved.clear()
        self._resolved[key] = cfg
        return cfg

    # -- the call -------------------------------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str = "HND",
        is_causal: bool = False,
        scale: float | None = None,
        key_padding_mask: torch.Tensor | None = None,
        dense_prefix: int = 0,
        dense_suffix: int = 0,
    ) -> torch.Tensor:
        """Attention of one call through this layer's policy; output in q's layout.

        Args:
            q: [B, Hq, Nq, D] ("HND") or [B, Nq, Hq, D] ("NHD").
            k, v: [B, Hkv, Nk, D] (or NHD).
            key_padding_mask: bool [B, Nk], True = attend (e.g. HunyuanVideo's text mask).
            dense_prefix, dense_suffix: text tokens at the start / end of the sequence;
                they attend and are attended densely.
        """
        fast = self._dense_slot_key(q, k, v, layout, is_causal, scale, key_padding_mask, dense_prefix, dense_suffix)
        if fast is not None:
            entry = self._dense_slots.get(fast[0])
            if entry is not None and self._dense_slot_valid(entry, fast[1], dense_prefix, dense_suffix):
                return self._attend_dense_slot(entry, q, k, v, layout, is_causal, scale, fast[1])
        inp = attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale,
                               key_padding_mask=key_padding_mask)
        for name, value in (("dense_prefix", dense_prefix), ("dense_suffix", dense_suffix)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        timer = self._timer.start(inp.device)
        step = self.clock.step
        reused = False
        if self.options.entmax_alpha is not None:
            from ..ops.entmax import entmax_attention_inputs

            out, est = entmax_attention_inputs(inp, self.options.entmax_alpha, return_stats=True)
            empty = est.empty_blocks / est.total_blocks if est.total_blocks else 0.0
            self._timer.stop(timer)
            self.last_stats, self.last_s = SparseStats(kept_fraction=1.0 - empty, backend=f"entmax-{est.backend}"), None
            self._record(self.last_stats, False)
            return inp.to_layout(out)
        s = fast[1] if fast is not None else self.current_s()  # read once a call
        cfg = self.config_for(s, dense_prefix, dense_suffix)
        measuring = cfg.selection == "target"
        warmup = self.options.warmup_steps(measuring)
        if step < warmup:
            out = dense_attention(inp)
            stats = SparseStats(kept_fraction=1.0, backend="sdpa",
                                fallback_reason=f"{DENSE_STEP_REASON}: step {step} < dense_steps={warmup}")
            if measuring:  # the warm-up step measures this layer's budgets (docs/DESIGN.md)
                self._measure_budgets(inp, cfg, step)
            cfg, s = None, None
        else:
            budgets = self._budgets.get(self.clock.call_in_step) if measuring else None
            if budgets is not None and step - budgets.step < self.options.remeasure_every:
                cfg = cfg.with_budgets(budgets.topk, inp.is_causal)  # as they were measured
            refresh = self.options.refresh
            cached = self._cached_mask(inp, cfg, step) if refresh > 1 else None
            reused = cached is not None
            out, stats = sparse_attention_inputs(inp, cfg, block_mask=cached, mask_uses=refresh)
            if fast is not None and stats.fallback_reason is not None and not reused and stats.head_budgets is None \
                    and stats.backend == "sdpa":
                early = early_fallback(inp, cfg, refresh, True)
                if early is not None and early[0] == stats.fallback_reason:  # decided from shapes and config alone
                    self._remember_dense_slot(fast[0], _DenseSlot(cfg, early[1], warmup, measuring, stats))
            if stats.head_budgets is not None:  # an inline measurement (first call or re-measure)
                self._store_budgets(stats.head_budgets, stats.estimated_l1, cfg.effective_target_l1, step)
            if refresh > 1 and not reused and stats.block_mask is not None:
                self._masks[self.clock.call_in_step] = _CachedMask(stats.block_mask, self.clock.loop, step, _config_key(cfg))
        self._timer.stop(timer)
        self.last_stats, self.last_s = stats, s
        self._record(stats, reused)
        if self._hooks:
            call = AttentionCall(layer=self.name, step=step, s=s, inputs=inp, config=cfg, stats=stats,
                                 output=out, mask_reused=reused)
            for hook in list(self._hooks):
                hook(call)
        return inp.to_layout(out)

    # -- the dense fast path -----------------------------------------------------------

    def _dense_slot_key(self, q: Any, k: Any, v: Any, layout: str, is_causal: bool, scale: Any,
                        key_padding_mask: Any, dense_prefix: Any, dense_suffix: Any) -> tuple[tuple, float | None] | None:
        """(key, s) of a call that may take the dense fast path, or None. A call slot whose
        policy ran dense for its shapes and config alone (`early_fallback`: a short
        sequence, or on the GPU "prediction cannot pay") runs dense again while nothing it
        was decided from changes; the key holds all of that, so the call skips validation
        (the same shapes, dtypes and devices passed it) and the policy: at the Flux shape
        these were ~60 us of host time before a ~460 us launch."""
        if (self._hooks or self.options.entmax_alpha is not None or key_padding_mask is not None
                or type(dense_prefix) is not int or type(dense_suffix) is not int
                or not (scale is None or type(scale) is float)
                or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor))):
            return None
        s = self.current_s()
        key = (self.clock.call_in_step, s, dense_prefix, dense_suffix, q.shape, k.shape, v.shape, q.dtype, k.dtype,
               v.dtype, q.device, k.device, v.device, layout, is_causal, scale)
        return key, s

    def _dense_slot_valid(self, entry: "_DenseSlot", s: float | None, dense_prefix: int, dense_suffix: int) -> bool:
        if self.clock.step < entry.warmup or self.config_for(s, dense_prefix, dense_suffix) is not entry.config:
            return False
        # measured budgets replace the config: the slow path decides with them
        return not (entry.measuring and self._budgets.get(self.clock.call_in_step) is not None)

    def _remember_dense_slot(self, key: tuple, entry: "_DenseSlot") -> None:
        if len(self._dense_slots) >= 64:  # shapes that keep changing: keep the memo bounded
            self._dense_slots.clear()
        self._dense_slots[key] = entry

    def _attend_dense_slot(self, entry: "_DenseSlot", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: str, is_causal: bool, scale: float | None, s: float | None) -> torch.Tensor:
        if layout == "NHD":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        timer = self._timer.start(q.device)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        out = None
        if entry.op is not None and q.is_contiguous() and k.is_contiguous() and v.is_contiguous():
            out = run_cudnn_direct(entry.op, q, k, v, is_causal, scale)
        if out is None:
            out = dense_attention(AttentionInputs(q=q, k=k, v=v, layout="HND", is_causal=is_causal, scale=scale,
                                                  key_padding_mask=None))
        self._timer.stop(timer)
        self.last_stats, self.last_s = entry.stats, s
        self._record(entry.stats, False)
        return out.transpose(1, 2) if layout == "NHD" else out

    def _measure_budgets(self, inp: AttentionInputs, cfg: SparseAttentionConfig, step: int) -> None:
        """Measure per-head budgets for ``cfg``'s error target on this call's inputs (a dense
        warm-up step) and keep them for the next steps."""
        if inp.len_k < cfg.min_seq_len or cfg.backend == "sdpa":
            return  # this layer's calls run dense anyway: nothing to budget
        if inp.q.is_cuda and cfg.backend == "auto" and \
                explicit_budget_reason(inp, 0.0, self.options.refresh, path_seconds_for(inp, cfg)) is not None:
            return  # no budget can pay at this size on the GPU: its calls run dense
        with torch.no_grad():
            scores = block_scores(inp, simthreshd1=cfg.effective_simthreshd1, attention_sink=cfg.sink_for(inp.is_causal),
                                  dense_prefix=cfg.dense_prefix, dense_suffix=cfg.dense_suffix, ranking=cfg.ranking_for(inp.is_causal))
            estimate = estimate_budgets(inp, scores, target_l1=cfg.effective_target_l1,
                                        compensate=cfg.effective_compensate, allocation=cfg.allocation_for(inp.is_causal))
        self._store_budgets(estimate.head_budget, float(estimate.call_l1.float().mean()),
                            cfg.effective_target_l1, step)

    def _store_budgets(self, head_budgets: torch.Tensor, estimated_l1: float | None, target: float, step: int) -> None:
        # one budget per head, the largest over the batch (classifier-free guidance's two
        # halves share a call): the kept fraction of every row then meets the target
        # kept on the host: configs validate their thresholds there (no device sync per call)
        per_head = head_budgets.float().reshape(-1, head_budgets.shape[-1]).amax(0).cpu()
        self._budgets[self.clock.call_in_step] = _Budgets(per_head, step, estimated_l1, target)

    @property
    def budgets(self) -> torch.Tensor | None:
        """The per-head kept-fraction budgets measured for the first call slot, or None."""
        entry = self._budgets.get(0)
        return None if entry is None else entry.topk

    def record_fallback(self, reason: str, seconds: float = 0.0) -> None:
        """Count a call that the layer's processor handed to the model's original
        processor (e.g. an attention mask the sparse path does not take)."""
        stats = SparseStats(kept_fraction=1.0, backend="original", fallback_reason=reason)
        self._timer.add(seconds)
        self.last_stats, self.last_s = stats, None
        self._record(stats, False)

    def _cached_mask(self, inp: AttentionInputs, cfg: SparseAttentionConfig, step: int) -> torch.Tensor | None:
        entry = self._masks.get(self.clock.call_in_step)
        if entry is None or entry.loop != self.clock.loop or not 0 <= step - entry.step < self.options.refresh:
            return None
        expected = (inp.batch, inp.heads_q, inp.num_q_blocks, inp.num_k_blocks)
        if tuple(entry.mask.shape) != expected or entry.key != _config_key(cfg):
            return None
        return entry.mask if entry.mask.device == inp.device else entry.mask.to(inp.device)

    # -- hooks ----------------------------------------------------------------------

    def add_hook(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(AttentionCall)`` after every call (e.g. to record q/k/v and masks
        for calibration). Returns a function that removes the hook."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        self._hooks.append(hook)

        def remove() -> None:
            if hook in self._hooks:
                self._hooks.remove(hook)

        return remove

    # -- statistics -----------------------------------------------------------------

    def _record(self, stats: SparseStats, reused: bool) -> None:
        t = self._totals
        t.calls += 1
        # raw: sums of device values stay on the device (reading them each call would wait for the GPU)
        t.kept_sum += stats.raw("kept_fraction")
        t.backends[stats.backend] += 1
        if stats.fallback_reason is None:
            t.sparse_calls += 1
            t.pv_skipped_sum += stats.raw("pv_skipped_fraction")
        else:
            t.fallbacks[_reason_category(stats.fallback_reason)] += 1
        if stats.raw("predicted_kept_fraction") is not None:
            t.predicted_sum += stats.raw("predicted_kept_fraction")
            t.predicted_calls += 1
        t.masks_reused += int(reused)

    def reset_stats(self) -> None:
        """Forget the statistics (not the cached masks)."""
        self._timer.reset()
        self._totals = _Totals()
        self.last_stats = None

    def clear_cache(self) -> None:
        """Forget the cached block masks (the next call predicts), measured budgets and
        remembered dense decisions."""
        self._masks.clear()
        self._budgets.clear()
        self._dense_slots.clear()

    def report_row(self) -> dict[str, Any]:
        """This layer's statistics.

        Keys: layer, calls, sparse_calls, mean_kept_fraction (over calls; dense calls
        count 1.0), mean_predicted_kept_fraction (over calls that predicted a mask),
        mean_pv_skipped_fraction (over sparse calls), backend (the most used, with the
        others after it), fallbacks (count), fallback_reasons (dict), masks_reused,
        time_ms (total time in the attention call), last_s.
        """
        t = self._totals
        ordered = [name for name, _ in t.backends.most_common()]
        return {
            "layer": self.name,
            "calls": t.calls,
            "sparse_calls": t.sparse_calls,
            "mean_kept_fraction": float(t.kept_sum) / t.calls if t.calls else math.nan,
            "mean_predicted_kept_fraction": float(t.predicted_sum) / t.predicted_calls if t.predicted_calls else math.nan,
            "mean_pv_skipped_fraction": float(t.pv_skipped_sum) / t.sparse_calls if t.sparse_calls else 0.0,
            "backend": ",".join(ordered) if ordered else "-",
            "fallbacks": sum(t.fallbacks.values()),
            "fallback_reasons": dict(t.fallbacks),
            "masks_reused": t.masks_reused,
            "time_ms": self._timer.seconds() * 1000.0,
            "last_s": self.last_s,
            **self._budget_report(),
        }

    def _budget_report(self) -> dict[str, Any]:
        """target_l1, the per-head budgets and the error measured for them (first call slot)."""
        entry = self._budgets.get(0)
        if entry is None:
            return {"target_l1": None, "head_budgets": None, "mean_budget": math.nan, "estimated_l1": None}
        return {"target_l1": entry.target_l1, "head_budgets": [round(x, 4) for x in entry.topk.tolist()],
                "mean_budget": float(entry.topk.mean()), "estimated_l1": entry.estimated_l1}
