"""What a patch may set per layer (`PatchOptions`) and the denoising-step clock every
patched layer of a model shares (`StepClock`): the two inputs of `state.LayerState` that
the patches and the one-liner build."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

@dataclass
class PatchOptions:
    """Runtime policy of a patched model beyond the kernel thresholds.

    Attributes:
        dense_steps: the first this many denoising steps (0-based step < dense_steps) run
            dense attention (dLLM-Serve's ``delay_step``). 0 = sparse from the start.
            None (default): 1 for a layer with an error target (it measures its per-head
            budgets during that dense step, docs/DESIGN.md), else 0.
        mask_refresh: predict the block mask every this many steps and reuse it in
            between (1 = predict on every call). A reused mask skips the prediction cost.
            None (default): the controller's interval, else 1.
        remeasure_every: a layer with an error target re-measures its budgets every this
            many steps after the last measurement (inline, on a sparse step).
        entmax_alpha: alpha-entmax attention instead of softmax (float, or one per head;
            1 < alpha <= 2), whose zeros are exact (ops/entmax.py); the layer then runs
            `entmax_attention` on every call, dense steps and the sparsity dial aside.
        num_inference_steps: number of denoising steps, needed by a schedule when a bare
            transformer (no pipeline, so no scheduler to read it from) is patched.
        controller: the `SparsityController` mapping s to kernel thresholds
            (default `SparsityController()`). When given and ``mask_refresh`` is left at
            1, its config's ``kv_reuse_ratio`` sets ``mask_refresh``
            (`SparsityConfig.mask_refresh_interval`), so the paper's knob and this one agree.

    Example:
        >>> PatchOptions(dense_steps=2, mask_refresh=5).mask_refresh
        5
    """

    dense_steps: int | None = None
    mask_refresh: int | None = None
    num_inference_steps: int | None = None
    controller: Any = None
    remeasure_every: int = 10
    entmax_alpha: Any = None

    def __post_init__(self) -> None:
        for name in ("dense_steps", "mask_refresh", "remeasure_every"):
            value = getattr(self, name)
            if value is None and name != "remeasure_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.dense_steps is not None and self.dense_steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {self.dense_steps}")
        if self.mask_refresh is not None and self.mask_refresh < 1:
            raise ValueError(f"mask_refresh must be >= 1 (1 = predict every step), got {self.mask_refresh}")
        if self.remeasure_every < 1:
            raise ValueError(f"remeasure_every must be >= 1 (steps between budget measurements), "
                             f"got {self.remeasure_every}")
        if self.num_inference_steps is not None:
            if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
                raise TypeError(f"num_inference_steps must be an int or None, got {type(self.num_inference_steps).__name__}")
            if self.num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.controller is not None and not hasattr(self.controller, "get_sparsity_params"):
            raise TypeError("controller must be a SparsityController (with get_sparsity_params(s)), "
                            f"got {type(self.controller).__name__}")

    @property
    def refresh(self) -> int:
        """The effective ``mask_refresh``: an explicit value wins (1 included), else the
        controller's ``kv_reuse_ratio`` interval (`SparsityConfig.mask_refresh_interval`), else 1."""
        if self.mask_refresh is not None:
            return self.mask_refresh
        interval = getattr(getattr(self.controller, "config", None), "mask_refresh_interval", 1)
        return interval if isinstance(interval, int) and interval > 1 else 1

    def warmup_steps(self, measuring: bool) -> int:
        """The effective ``dense_steps`` (see the attribute); ``measuring``: the layer has an
        error target to measure budgets for."""
        if self.dense_steps is not None:
            return self.dense_steps
        return 1 if measuring else 0


def _timestep_value(timestep: Any) -> float | None:
    """The largest timestep of a transformer call as a float (per-sample or per-token
    timesteps share one denoising step), or None when there is none."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().float().max())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    return None


class StepClock:
    """Where the denoising loop is, shared by every layer of one patched model.

    Two drivers:

    * ``source="scheduler"``: the API wraps the pipeline scheduler's ``set_timesteps``
      (calls `begin` with ``len(scheduler.timesteps)``) and ``step`` (calls `advance`).
      Classifier-free guidance that runs the transformer twice per step (Wan, true-CFG
      Flux and HunyuanVideo) therefore still counts one step.
    * ``source="timestep"``: a bare transformer; `on_forward` sees each call's
      ``timestep``: a smaller one is the next step, an equal one another pass of the same
      step, a larger one a new loop (diffusers' timesteps decrease within a loop).

    ``call_in_step`` numbers the transformer calls within the current step (0, 1, ...),
    the slot under which layers cache their block masks.
    """

    def __init__(self, num_steps: int | None = None, *, source: str = "timestep") -> None:
        if source not in ("scheduler", "timestep"):
            raise ValueError(f"source must be 'scheduler' or 'timestep', got {source!r}")
        self.source = source
        self.step = 0
        self.num_steps = num_steps
        self.call_in_step = 0
        self.loop = 0  # increments with every new denoising loop; cached masks never cross loops
        self._last_timestep: float | None = None
        self._forward_step: int | None = None

    def progress(self) -> float | None:
        """step / num_steps clamped to [0, 1], or None when the number of steps is unknown."""
        if not self.num_steps:
            return None
        return min(1.0, max(0.0, self.step / self.num_steps))

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new denoising loop of ``num_steps`` steps (None keeps the known number)."""
        self.step = 0
        self.loop += 1
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.call_in_step = 0
        self._last_timestep = None
        self._forward_step = None

    def advance(self) -> None:
        """One denoising step finished (the scheduler stepped)."""
        self.step += 1

    def on_forward(self, timestep: Any = None) -> None:
        """A transformer forward is starting; ``timestep`` is its timestep argument."""
        if self.source == "scheduler":
            if self._forward_step == self.step:
                self.call_in_step += 1
            else:
                self._forward_step, self.call_in_step = self.step, 0
            return
        t = _timestep_value(timestep)
        last = self._last_timestep
        if t is None:
            if self._forward_step is not None:  # no timestep: every call is a step
                self.step += 1
            self.call_in_step = 0
        elif last is None:
            self.call_in_step = 0
        elif t > last:
            self.step, self.call_in_step = 0, 0
            self.loop += 1
        elif t < last:
            self.step, self.call_in_step = self.step + 1, 0
        else:
            self.call_in_step += 1
        self._last_timestep = t
        self._forward_step = self.step
