"""The logits processor of two-stage creative decoding for transformers' ``generate``.

One concern: turning the dial s into the sampling filters of each decoding step and
publishing s (and K(s) for MoE routers) for the next forward pass. The wrapper that drafts,
picks and refines lives in `wrapper`; model loading in `models`.

`CreativeSparseLogitsProcessor` is a transformers ``LogitsProcessor``. From the prompt
length and ``max_new_tokens`` it knows the step i of every call; the schedule gives
s = s_A (diverge) for i / max_new_tokens < switch and s = s_B (refine) from there on; it
divides the scores by T(s), keeps the nucleus p_nuc(s) (at least one token), and
publishes the s of the next step (`control.set_current_sparsity`) so that the
``creative_sparse`` attention (k_attn(s)) and, for MoE models, the routers (K(s)
experts per token) run the next forward pass at the same point of the manifold.

Use it with sampling and with generate's own warpers neutral, or they stack on top
(transformers adds ``top_k=50`` by default)::

    proc = CreativeSparseLogitsProcessor(input_ids.shape[1], max_new_tokens=60, model=model)
    out = model.generate(input_ids, logits_processor=[proc], do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=60)

Importing this module installs a hook on ``GenerationMixin.generate`` (`install_generate_hook`)
that enters the processor around the call: the prompt's prefill already runs at s_A, and
the published s and the MoE routers are restored afterwards, also when generation stops
early. ``with proc:`` does the same by hand (for a custom decoding loop).

(``**proc.generate_kwargs()`` gives exactly those arguments.) The processor warns once
per generation when it finds generate's temperature / top-k / top-p active.

The filters are transformers' own warpers (`control_warpers`): temperature T(s), token
pruning (top-k), nucleus p_nuc(s) and min-p.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, MinPLogitsWarper,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .control import (ControlPoint, SparsityConfig, SparsityController, TwoStageSchedule, current_sparsity,
                      set_current_sparsity)
from .moe import ExpertRouting

#: Neutral values of generate's own sampling warpers (nothing stacks on the processor).
NEUTRAL_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

# ----------------------------------------------------------------------------- warpers


def temperature_scale(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores / T (T > 0), through transformers' `TemperatureLogitsWarper`."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return TemperatureLogitsWarper(float(temperature))(None, scores)


def nucleus_keep(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool mask [B, V] of the nucleus kept by transformers' `TopPLogitsWarper`: per row,
    the most probable tokens whose probability mass reaches ``top_p`` (a token is kept
    when the mass of the tokens ranked before it is below top_p), always at least the
    most probable token. ``top_p >= 1`` keeps all.

    Example:
        >>> nucleus_keep(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)
        tensor([[ True,  True, False]])
    """
    if top_p >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    return torch.isfinite(TopPLogitsWarper(float(top_p))(None, scores.float()))


def control_warpers(cp: ControlPoint, vocab_size: int, token_pruning_rate: float = 0.0) -> LogitsProcessorList:
    """transformers' warpers for the control point ``cp``, in generate's order: temperature
    T(s), token pruning (top-k keeping ceil((1 - rate) * V) tokens), nucleus p_nuc(s), min-p.
    Filters that keep everything are left out.

    Example:
        >>> cp = SparsityController(SparsityConfig(nucleus_base=0.9, min_p=0.1)).get_sparsity_params(0.7)
        >>> [type(w).__name__ for w in control_warpers(cp, vocab_size=100)]
        ['TemperatureLogitsWarper', 'TopPLogitsWarper', 'MinPLogitsWarper']
    """
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(cp.temperature))])
    if token_pruning_rate > 0.0:
        warpers.append(TopKLogitsWarper(max(1, math.ceil((1.0 - token_pruning_rate) * vocab_size))))
    if cp.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(cp.top_p)))
    if cp.min_p > 0.0:
        warpers.append(MinPLogitsWarper(float(cp.min_p)))
    return warpers


def sampling_problems(generation_config: Any) -> list[str]:
    """Why generate's own settings would distort the processor's T(s) and p_nuc(s):
    greedy decoding, or an active temperature / top-k / top-p warper (they run after
    the user's processors and stack on top). Empty when all is neutral.

    Example:
        >>> from transformers import GenerationConfig
        >>> sampling_problems(GenerationConfig(do_sample=True, top_k=50))
        ['top_k=50 (pass top_k=0)']
    """
    problems = []
    if not getattr(generation_config, "do_sample", False):
        problems.append("do_sample=False (greedy decoding ignores temperature and nucleus; pass do_sample=True)")
    temperature = getattr(generation_config, "temperature", None)
    if temperature is not None and temperature != 1.0:
        problems.append(f"temperature={temperature} (pass temperature=1.0)")
    top_k = getattr(generation_config, "top_k", None)
    if top_k is not None and top_k != 0:
        problems.append(f"top_k={top_k} (pass top_k=0)")
    top_p = getattr(generation_config, "top_p", None)
    if top_p is not None and top_p < 1.0:
        problems.append(f"top_p={top_p} (pass top_p=1.0)")
    return problems


def _running_generation_config(max_depth: int = 8) -> Any | None:
    """The GenerationConfig of the generate() call that is calling us, found by walking up
    a few frames to transformers' decoding loop (its ``generation_config`` argument)."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("generation_config")
        if candidate is not None and type(candidate).__name__ == "GenerationConfig":
            return candidate
        frame = frame.f_back
    return None


# --------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class StepRecord:
    """What the processor applied at one step."""

    step: int
    stage: str
    s: float
    temperature: float
    top_p: float
    num_experts: int | None


class CreativeSparseLogitsProcessor(LogitsProcessor):
    """Applies T(s) and p_nuc(s) of the two-stage schedule at every decoding step.

    Args:
        prompt_length: length of the input_ids handed to generate (prompt plus padding).
        max_new_tokens: length of the whole schedule in new tokens.
        schedule: the `TwoStageSchedule` (default diverge 0.7, refine 0.3, switch 0.5).
        sparsity_level: a fixed s for every step instead of the schedule.
        controller: maps s to M(s) (default: `SparsityController.for_model(model, config)`).
        config: the `SparsityConfig` of a default controller.
        model: the model being decoded; needed for MoE K(s) (routers' top_k) and for
            nothing else.
        step_offset: schedule step of the first token this processor sees (a generation
            that continues an earlier one, like the wrapper's stage B).
        publish: publish s for the attention patch (`set_current_sparsity`).

    Step i (0-based) = step_offset + input_ids.shape[1] - prompt_length. The processor
    sets the s (and K) for step i + 1 after handling step i, because the forward pass for
    step i + 1 runs after it; ``model.generate`` (through the hook this module installs)
    or ``with processor:`` sets step ``step_offset``'s before the prefill and restores the
    published s and the routers after the call.

    Example:
        >>> proc = CreativeSparseLogitsProcessor(prompt_length=3, max_new_tokens=4,
        ...                                      schedule=TwoStageSchedule(0.7, 0.3, switch=0.5))
        >>> [proc.stage_at_step(i) for i in range(4)]
        ['diverge', 'diverge', 'refine', 'refine']
    """

    def __init__(self, prompt_length: int, max_new_tokens: int, *, schedule: TwoStageSchedule | None = None,
                 sparsity_level: float | None = None, controller: SparsityController | None = None,
                 config: SparsityConfig | None = None, model: torch.nn.Module | None = None,
                 step_offset: int = 0, publish: bool = True) -> None:
        for name, value, low in (("prompt_length", prompt_length, 0), ("max_new_tokens", max_new_tokens, 1),
                                 ("step_offset", step_offset, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if schedule is not None and not isinstance(schedule, TwoStageSchedule):
            raise TypeError(f"schedule must be a TwoStageSchedule, got {type(schedule).__name__}")
        if sparsity_level is not None:
            if schedule is not None:
                raise ValueError("give either schedule or sparsity_level, not both")
            schedule = TwoStageSchedule(sparsity_level, sparsity_level, switch=1.0)
        if controller is not None and not isinstance(controller, SparsityController):
            raise TypeError(f"controller must be a SparsityController, got {type(controller).__name__}")
        if controller is not None and config is not None:
            raise ValueError("give either controller or config, not both")
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.step_offset = step_offset
        self.schedule = schedule if schedule is not None else TwoStageSchedule()
        self.controller = controller if controller is not None else (
            SparsityController.for_model(model, config) if model is not None else SparsityController(config))
        self.routing = ExpertRouting.for_model(model) if model is not None else None
        if self.routing is not None and self.controller.num_experts is None:
            self.controller = SparsityController(self.controller.config, num_experts=self.routing.num_experts,
                                                 experts_per_token=self.routing.default_k)
        self.publish = publish
        self.history: list[StepRecord] = []
        self._saved: tuple[float | None, list[int] | None] | None = None
        self._entered = False
        self._checked_config = False

    # -- the schedule ----------------------------------------------------------------

    def step_of(self, input_ids: torch.Tensor) -> int:
        """The schedule step for a call with these input_ids."""
        step = self.step_offset + input_ids.shape[-1] - self.prompt_length
        if step < self.step_offset:
            raise ValueError(f"input_ids has {input_ids.shape[-1]} tokens, fewer than prompt_length="
                             f"{self.prompt_length}: was the processor built for another prompt?")
        return step

    def _progress(self, step: int) -> float:
        return min(1.0, step / self.max_new_tokens)

    def stage_at_step(self, step: int) -> str:
        """"diverge" or "refine" at schedule step ``step``."""
        return self.schedule.stage_at(self._progress(step))

    def s_at_step(self, step: int) -> float:
        """The dial s at schedule step ``step``."""
        return self.schedule.s_at(self._progress(step))

    def control_at_step(self, step: int) -> ControlPoint:
        """M(s) at schedule step ``step``."""
        return self.controller.get_sparsity_params(self.s_at_step(step))

    @property
    def switch_step(self) -> int:
        """The first step of stage B."""
        return self.schedule.switch_step(self.max_new_tokens)

    # -- publishing s and K for the next forward --------------------------------------

    def _save(self) -> None:
        if self._saved is None:
            routers = [m.top_k for m in self.routing.routers] if self.routing is not None else None
            self._saved = (current_sparsity(), routers)

    def _restore(self) -> None:
        if self._saved is None:
            return
        s, routers = self._saved
        if self.publish:
            set_current_sparsity(s)
        if routers is not None:
            for m, k in zip(self.routing.routers, routers):
                m.top_k = k
        self._saved = None

    def apply_step(self, step: int) -> ControlPoint:
        """Set up the forward pass of ``step``: publish its s and set K(s) on the routers."""
        self._save()
        cp = self.control_at_step(step)
        if self.publish:
            set_current_sparsity(cp.s)
        if self.routing is not None and cp.num_experts is not None:
            self.routing.set(cp.num_experts)
        return cp

    def __enter__(self) -> "CreativeSparseLogitsProcessor":
        self.history.clear()
        self._checked_config = False
        self._entered = True
        self.apply_step(self.step_offset)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._entered = False
        self._restore()

    def generate_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Arguments for ``model.generate``: this processor, sampling on, generate's own
        warpers neutral, ``max_new_tokens`` to the end of the schedule. ``overrides`` are
        merged in; ones that would stack on the processor are warned about."""
        kwargs: dict[str, Any] = dict(NEUTRAL_SAMPLING)
        kwargs["max_new_tokens"] = self.max_new_tokens - self.step_offset
        kwargs["logits_processor"] = LogitsProcessorList([self])
        kwargs.update(overrides)

        class _Settings:  # the merged sampling settings, for sampling_problems
            pass

        settings = _Settings()
        for key in NEUTRAL_SAMPLING:
            setattr(settings, key, kwargs[key])
        for problem in sampling_problems(settings):
            warnings.warn(f"CreativeSparseLogitsProcessor: generate's {problem} distorts T(s) and p_nuc(s)",
                          stacklevel=2)
        return kwargs

    # -- the call --------------------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._checked_config:
            self._checked_config = True
            running = _running_generation_config()
            if running is not None:
                for problem in sampling_problems(running):
                    warnings.warn(f"CreativeSparseLogitsProcessor: generate's {problem} distorts T(s) "
                                  "and p_nuc(s)", stacklevel=2)
        step = self.step_of(input_ids)
        cp = self.control_at_step(step)
        scores = control_warpers(cp, scores.shape[-1], self.controller.config.token_pruning_rate)(input_ids, scores)
        self.history.append(StepRecord(step=step, stage=self.stage_at_step(step), s=cp.s,
                                       temperature=cp.temperature, top_p=cp.top_p, num_experts=cp.num_experts))
        if step + 1 < self.max_new_tokens:
            self.apply_step(step + 1)
        elif not self._entered:
            self._restore()
        return scores


def _creative_processors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[CreativeSparseLogitsProcessor]:
    """The `CreativeSparseLogitsProcessor` objects in a generate() call's logits_processor
    (keyword, or the third positional argument as in GenerationMixin.generate)."""
    procs = kwargs.get("logits_processor")
    if procs is None and len(args) > 2:
        procs = args[2]
    return [p for p in (procs or ()) if isinstance(p, CreativeSparseLogitsProcessor)]


def install_generate_hook() -> None:
    """Make ``model.generate(..., logits_processor=[proc])`` enter ``proc`` around the call.

    The prefill (the one forward over the whole prompt) runs before the processor's first
    call, so without this the attention of the prefill would see no dial (or a stale one).
    The hook wraps ``GenerationMixin.generate``: for every `CreativeSparseLogitsProcessor`
    in ``logits_processor`` that is not already inside ``with proc:``, it publishes the
    processor's first s (and K(s) on MoE routers) before the call and restores both after
    it, also when generation stops early or raises. Installed once, on import of this
    module; idempotent.
    """
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    if getattr(original, "_hcs_dial_hook", False):
        return

    @functools.wraps(original)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        procs = [p for p in _creative_processors(args, kwargs) if not p._entered]
        if not procs:
            return original(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            for proc in procs:
                stack.enter_context(proc)
            return original(self, *args, **kwargs)

    generate._hcs_dial_hook = True  # type: ignore[attr-defined]
    GenerationMixin.generate = generate


install_generate_hook()
