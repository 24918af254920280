"""The Goldilocks sweep: measure Q(s) over sparsity levels, fit the paper's power laws, find s*.

One concern: running the experiment. `find_optimal_sparsity` generates at each level
(`HFGenerator`: the wrapper's generation path), scores (`quality.QualityFunctional`), fits
(`power_laws`) and returns a `SweepResult` (curve, fits, bounds, s*, JSON, `plots`' PNG).

Example:
    >>> res = find_optimal_sparsity(model, "poetry", compute_budget=0.6, tokenizer=tok,
    ...                             levels=[0.4, 0.6, 0.8], num_samples=2)   # doctest: +SKIP
    >>> res.s_star, res.plot_path                                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Sequence

import numpy as np

from .plots import require_matplotlib
from .power_laws import OptimumBounds, PowerLawFit, argmax_on, corollary1_bounds, fit_power_law, fitted_quality
from .quality import QualityFunctional, QualityWeights, constraints_from_spec

#: ``generate_fn(prompts, s, num_samples, seed) -> outputs``, prompt-major:
#: outputs[i * num_samples + j] is sample j of prompts[i].
GenerateFn = Callable[[list[str], float, int, int], list[str]]
#: ``reference_fn(prompts) -> one reference text per prompt`` (novelty's reference set).
ReferenceFn = Callable[[list[str]], list[str]]

DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TASK_TYPES = ("creative_writing", "poetry", "ad_copy", "code")


# ------------------------------------------------------------------------------- results


@dataclass
class LevelResult:
    """What one sparsity level measured (means over its outputs)."""

    s: float
    novelty: float
    diversity: float
    incoherence: float
    quality: float
    quality_std: float
    distinct: dict[int, float]
    self_bleu: float
    control: dict[str, Any]
    seconds: float
    outputs: list[str] = field(default_factory=list)
    #: k_attn(s): the fraction of dense attention compute this level spends.
    attention_compute: float = 1.0

    @property
    def quality_sem(self) -> float:
        """Standard error of the mean Q: sd over outputs / sqrt(number of outputs) (outputs
        of one prompt are not independent, so read it as a rough scale of the noise)."""
        return self.quality_std / math.sqrt(len(self.outputs)) if self.outputs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"s": self.s, "novelty": self.novelty, "diversity": self.diversity, "incoherence": self.incoherence,
                "quality": self.quality, "quality_std": self.quality_std,
                "quality_sem": _nan_to_none(self.quality_sem),
                "distinct": {str(k): v for k, v in self.distinct.items()}, "self_bleu": _nan_to_none(self.self_bleu),
                "control": self.control, "seconds": self.seconds, "outputs": self.outputs,
                "attention_compute": self.attention_compute}


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass
class SweepResult:
    """The Q(s) curve, the fits, Corollary-1 bounds and s*.

    Attributes:
        s_star: the chosen sparsity: the best measured level, refined by the fit. The fit
            refines it only where it agrees with the measurement: when the maximiser of the
            fitted Q over the measured range lies between the best level's neighbours, s* is
            that maximiser; otherwise (the fitted peak is elsewhere, or there is no fit) s*
            stays the best measured level. ``s_star_note`` says which.
        best_measured: the level with the highest measured mean Q.
        s_star_fit: the maximiser of the fitted Q over the measured (and allowed) range
            (None without fit).
        fits: "novelty", "diversity", "incoherence" -> `PowerLawFit` (missing when unfittable).
        bounds: `OptimumBounds` or None; ``bounds_note`` says why not.
        s_min, s_max: the allowed interval of s: where k_attn(s) <= compute_budget
            (`SparsityController.feasible_dial`; k_attn is not monotonic in s).
        plot_path, json_path: where the PNG and JSON were written.

    ``float(result)`` is ``result.s_star``.
    """

    task_type: str
    levels: list[LevelResult]
    weights: QualityWeights
    compute_budget: float
    s_min: float
    best_measured: float
    s_star: float
    s_star_fit: float | None
    fits: dict[str, PowerLawFit]
    bounds: OptimumBounds | None
    bounds_note: str
    prompts: list[str]
    reference: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    plot_path: str | None = None
    json_path: str | None = None
    s_star_note: str = ""
    s_max: float = 1.0

    def __float__(self) -> float:
        return float(self.s_star)

    @property
    def s_values(self) -> list[float]:
        return [lv.s for lv in self.levels]

    @property
    def quality_curve(self) -> list[float]:
        return [lv.quality for lv in self.levels]

    def to_dict(self) -> dict[str, Any]:
        return {"task_type": self.task_type, "s_star": self.s_star, "best_measured": self.best_measured,
                "s_star_fit": self.s_star_fit, "s_star_note": self.s_star_note,
                "compute_budget": self.compute_budget, "s_min": self.s_min, "s_max": self.s_max,
                "weights": self.weights.to_dict(), "fits": {k: v.to_dict() for k, v in self.fits.items()},
                "bounds": self.bounds.to_dict() if self.bounds else None, "bounds_note": self.bounds_note,
                "levels": [lv.to_dict() for lv in self.levels], "prompts": self.prompts,
                "reference": self.reference, "settings": self.settings, "plot_path": self.plot_path}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The result as JSON text (NaN written as null); also written to ``path`` if given."""
        text = json.dumps(_json_safe(self.to_dict()), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            self.json_path = os.fspath(path)
        return text

    def save_plot(self, path: str | os.PathLike) -> str:
        """Write the sweep's PNG figure (`plots.plot_sweep`; needs matplotlib, the ``[plot]``
        extra) and return its path."""
        from .plots import plot_sweep

        self.plot_path = plot_sweep(self, path)
        return self.plot_path


def load_sweep(path: str | os.PathLike) -> SweepResult:
    """A `SweepResult` back from its ``sweep.json`` (to re-plot or re-analyse without
    generating again). NaN values written as null come back as NaN.

    Example:
        >>> res = load_sweep("sweep_out/sweep.json")        # doctest: +SKIP
        >>> res.save_plot("again.png")                      # doctest: +SKIP
    """
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)

    def num(x: Any) -> float:
        return float("nan") if x is None else float(x)

    levels = [LevelResult(s=lv["s"], novelty=num(lv["novelty"]), diversity=num(lv["diversity"]),
                          incoherence=num(lv["incoherence"]), quality=num(lv["quality"]),
                          quality_std=num(lv["quality_std"]),
                          distinct={int(k): num(v) for k, v in lv.get("distinct", {}).items()},
                          self_bleu=num(lv.get("self_bleu")), control=lv.get("control", {}),
                          seconds=num(lv.get("seconds")), outputs=list(lv.get("outputs", [])),
                          attention_compute=num(lv.get("attention_compute", 1.0)))
              for lv in data["levels"]]
    b = data.get("bounds")
    return SweepResult(task_type=data["task_type"], levels=levels, weights=QualityWeights(**data["weights"]),
                       compute_budget=data["compute_budget"], s_min=data["s_min"],
                       best_measured=data["best_measured"], s_star=data["s_star"], s_star_fit=data.get("s_star_fit"),
                       fits={k: PowerLawFit(v["coefficient"], v["exponent"], num(v["r2"]), v["n_points"])
                             for k, v in data.get("fits", {}).items()},
                       bounds=OptimumBounds(**b) if b else None, bounds_note=data.get("bounds_note", ""),
                       prompts=data.get("prompts", []), reference=data.get("reference", []),
                       settings=data.get("settings", {}), plot_path=data.get("plot_path"),
                       s_star_note=data.get("s_star_note", ""), s_max=data.get("s_max", 1.0))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


# --------------------------------------------------------------------------- prompt sets


def load_task(task_type: str) -> dict[str, Any]:
    """The built-in prompt set of a task: ``{"prompts": [...], "constraints": {...}, ...}``.

    Example:
        >>> len(load_task("poetry")["prompts"]) > 0
        True
    """
    data = json.loads(resources.files("hf_creative_sparse").joinpath("data/prompts.json").read_text("utf-8"))
    if task_type not in data or task_type.startswith("_"):
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    return data[task_type]


# ----------------------------------------------------------------------------- generation


class HFGenerator:
    """The default ``generate_fn``: samples a transformers causal LM at the control point
    M(s) of `control.SparsityController`, always through
    `wrapper.CreativeSparseWrapper.generate_creative` (``sparsity_level=s,
    num_candidates=num_samples, return_best=False``): one generation path for the sweep and
    the wrapper (prompt encoding, padding, T / p_nuc / min-p / token pruning, MoE K(s), the
    published s).

    - a `wrapper.CreativeSparseWrapper` (anything with ``generate_creative``): used as is;
    - a plain model with ``use_wrapper=True`` (default): a wrapper built here routes
      attention through ``creative_sparse`` so k_attn(s) applies, and scores nothing (the
      sweep scores). `close` restores the model's attention;
    - ``use_wrapper=False``: a wrapper built here that leaves the model's attention as it is
      (attention patches the caller installed read the published s).

    Chat models (a tokenizer with a chat template) get each prompt as a user turn.
    ``reference(prompts)`` decodes greedily (`CreativeSparseWrapper.generate_greedy`).
    """

    def __init__(self, model_or_wrapper: Any, tokenizer: Any = None, *, max_new_tokens: int = 64,
                 sparsity_config: Any = None, use_wrapper: bool = True, use_chat_template: bool | str = "auto",
                 batch_size: int = 8) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        if use_chat_template not in ("auto", True, False):
            raise ValueError(f"use_chat_template must be 'auto', True or False, got {use_chat_template!r}")
        from ..creative.control import SparsityConfig

        if sparsity_config is not None and not isinstance(sparsity_config, SparsityConfig):
            raise TypeError(f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}")
        self.wrapper = model_or_wrapper if hasattr(model_or_wrapper, "generate_creative") else None
        self._owns_wrapper = False
        model = getattr(model_or_wrapper, "model", None) if self.wrapper is not None else model_or_wrapper
        tokenizer = tokenizer if tokenizer is not None else getattr(model_or_wrapper, "tokenizer", None)
        if model is None or not hasattr(model, "generate") or not hasattr(model, "parameters"):
            raise TypeError("model_or_wrapper must be a transformers generative model or a CreativeSparseWrapper, "
                            f"got {type(model_or_wrapper).__name__}")
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to generate from a plain model: pass tokenizer=...")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.use_chat_template = use_chat_template
        if self.wrapper is None:
            from ..creative.wrapper import CreativeSparseWrapper

            self.wrapper = CreativeSparseWrapper(model, tokenizer, config=sparsity_config, scorer=_no_scores,
                                                 batch_size=batch_size, progress=False, sparse_attention=use_wrapper,
                                                 chat_template=None if use_chat_template == "auto" else use_chat_template)
            self._owns_wrapper = True
        self.controller = self.wrapper.controller

    def close(self) -> None:
        """Undo what this generator installed (the attention patch of its own wrapper)."""
        if self._owns_wrapper and self.wrapper is not None:
            self.wrapper.close()
            self._owns_wrapper = False

    def control(self, s: float) -> dict[str, Any]:
        """The knobs used at s (recorded in the sweep result)."""
        cp = self.controller.get_sparsity_params(s)
        return {"temperature": cp.temperature, "top_p": cp.top_p, "min_p": cp.min_p,
                "attention_budget": cp.attention_budget, "num_experts": cp.num_experts}

    def __call__(self, prompts: list[str], s: float, num_samples: int, seed: int) -> list[str]:
        outputs: list[str] = []
        for i, prompt in enumerate(prompts):
            got = self.wrapper.generate_creative(prompt, max_new_tokens=self.max_new_tokens,
                                                 num_candidates=num_samples, return_best=False, sparsity_level=s,
                                                 seed=seed + 7919 * i, progress=False)
            got = [got] if isinstance(got, str) else list(got)
            if len(got) != num_samples:
                raise RuntimeError(f"generate_creative returned {len(got)} candidates, expected {num_samples}")
            outputs.extend(g if isinstance(g, str) else str(getattr(g, "text", g)) for g in got)
        return outputs

    def reference(self, prompts: list[str]) -> list[str]:
        """Greedy continuations (dense attention): what the model says by default."""
        return [self.wrapper.generate_greedy(p, max_new_tokens=self.max_new_tokens) for p in prompts]


def _no_scores(texts: Sequence[str]) -> list[float]:
    """Scorer for the sweep's own wrapper: the sweep scores every output itself."""
    return [0.0] * len(texts)


# -------------------------------------------------------------------------------- the sweep


def _check_levels(levels: Any) -> list[float]:
    try:
        out = sorted(float(x) for x in levels)
    except TypeError as exc:
        raise TypeError(f"levels must be a sequence of floats in [0, 1], got {levels!r}") from exc
    if not out:
        raise ValueError("levels must hold at least one sparsity level")
    if any(not (0.0 <= x <= 1.0) for x in out):
        raise ValueError(f"levels must lie in [0, 1], got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"levels must be distinct, got {out}")
    return out


def find_optimal_sparsity(model_or_wrapper: Any, task_type: str = "creative_writing", compute_budget: float = 1.0,
                          quality_weights: Any = None, levels: Sequence[float] | None = None,
                          prompts: Sequence[str] | None = None, num_samples: int = 4, *, tokenizer: Any = None,
                          generate_fn: GenerateFn | None = None, reference_fn: ReferenceFn | None = None,
                          reference_data: Sequence[str] | None = None, quality: QualityFunctional | None = None,
                          max_new_tokens: int = 64, sparsity_config: Any = None, use_wrapper: bool = True,
                          seed: int = 0, output_dir: str | os.PathLike | None = None, plot: bool = True,
                          progress: bool = True) -> SweepResult:
    """Sweep the sparsity dial, measure Q(s), fit the power laws and return s*.

    Args:
        model_or_wrapper: a transformers causal LM (with ``tokenizer``), a
            `wrapper.CreativeSparseWrapper`, or anything when ``generate_fn`` is given.
        task_type: "creative_writing", "poetry", "ad_copy" or "code": the built-in prompt
            set and its constraints (``prompts`` replaces the prompts).
        compute_budget: fraction of dense attention FLOPs allowed, in (0, 1]; levels whose
            attention keeps more, k_attn(s) > compute_budget, are skipped (k_attn is not
            monotonic: the allowed s form the interval `SparsityController.feasible_dial`),
            and each level reports the fraction it spends (``attention_compute``).
        quality_weights: (alpha, beta, gamma) of Q; default (0.4, 0.3, 0.3).
        levels: the s values to measure (default 0.1, 0.2, ..., 0.9).
        num_samples: samples per prompt and level.
        generate_fn: ``(prompts, s, num_samples, seed) -> outputs`` (prompt-major); default
            `HFGenerator` (``max_new_tokens``, ``sparsity_config`` and ``use_wrapper`` go to it;
            every level uses the same ``seed``, so levels differ by s, not by luck).
        reference_fn / reference_data: novelty's reference set. Default: the model's greedy
            continuation of each prompt (`HFGenerator.reference`); with a custom
            ``generate_fn`` and no reference, ``generate_fn(prompts, 0.0, 1, seed)``.
        quality: the `QualityFunctional` (its weights are replaced by ``quality_weights``
            when given); default MiniLM embeddings, the generating model as scorer when it
            is a transformers model (else SmolLM2), and the task's constraints.
        output_dir: where ``sweep.json`` and ``sweep.png`` go (default: a new temp folder).
        plot: draw ``sweep.png`` (needs matplotlib, the ``[plot]`` extra: checked before
            generating).

    Returns:
        `SweepResult`; ``result.s_star`` is the recommended sparsity.

    Example:
        >>> res = find_optimal_sparsity(model, "poetry", compute_budget=0.6, tokenizer=tok,
        ...                             levels=[0.4, 0.6, 0.8], num_samples=2)   # doctest: +SKIP
        >>> res.s_star, res.plot_path                                            # doctest: +SKIP
    """
    if isinstance(compute_budget, bool) or not isinstance(compute_budget, (int, float)) \
            or not (0.0 < float(compute_budget) <= 1.0):
        raise ValueError(f"compute_budget must be a fraction of dense attention FLOPs in (0, 1], got {compute_budget!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if plot:
        require_matplotlib()
    task = load_task(task_type)
    prompt_list = list(task["prompts"]) if prompts is None else [str(p) for p in prompts]
    if not prompt_list or any(not isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts must be a non-empty list of strings")
    all_levels = _check_levels(DEFAULT_LEVELS if levels is None else levels)
    weights = QualityWeights.coerce(quality_weights) if quality_weights is not None else None

    generator: HFGenerator | None = None
    if generate_fn is None:
        generator = HFGenerator(model_or_wrapper, tokenizer, max_new_tokens=max_new_tokens,
                                sparsity_config=sparsity_config, use_wrapper=use_wrapper)
        generate_fn = generator
    elif not callable(generate_fn):
        raise TypeError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
    from ..creative.control import SparsityController

    controller = generator.controller if generator is not None else SparsityController(sparsity_config)
    feasible = controller.feasible_dial(float(compute_budget))
    run_levels = [s for s in all_levels if controller.attention_budget(s) <= float(compute_budget) + 1e-12]
    if not run_levels or feasible is None:
        if generator is not None:
            generator.close()
        raise ValueError(f"no level satisfies k_attn(s) <= compute_budget = {float(compute_budget):g} (allowed s: "
                         f"{'none' if feasible is None else f'[{feasible[0]:.4g}, {feasible[1]:.4g}]'}); "
                         f"levels were {all_levels}")
    s_min, s_max = feasible
    try:
        if quality is None:
            scorer = None
            if generator is not None:
                from .scorers import LMScorer

                scorer = LMScorer(generator.model, generator.tokenizer)
            quality = QualityFunctional(weights, scorer=scorer, constraints=constraints_from_spec(task.get("constraints")))
        elif not isinstance(quality, QualityFunctional):
            raise TypeError(f"quality must be a QualityFunctional, got {type(quality).__name__}")
        weights = weights or quality.weights

        if reference_data is not None:
            reference = [str(r) for r in reference_data]
        elif reference_fn is not None:
            reference = list(reference_fn(prompt_list))
        elif generator is not None:
            reference = generator.reference(prompt_list)
        else:
            reference = list(generate_fn(prompt_list, 0.0, 1, seed))
        if not reference:
            raise ValueError("the reference set for novelty is empty")

        groups = [i for i in range(len(prompt_list)) for _ in range(num_samples)]
        results: list[LevelResult] = []
        from tqdm.auto import tqdm

        bar = tqdm(run_levels, desc=f"sweep {task_type}", unit="level", disable=not progress)
        for s in bar:
            start = time.perf_counter()
            outputs = list(generate_fn(prompt_list, s, num_samples, seed))
            if len(outputs) != len(groups):
                raise RuntimeError(f"generate_fn returned {len(outputs)} outputs at s={s}, expected "
                                   f"{len(groups)} ({len(prompt_list)} prompts x {num_samples} samples)")
            report = quality.evaluate(outputs, reference, groups=groups, weights=weights)
            control = generator.control(s) if generator is not None else {}
            results.append(LevelResult(s=s, novelty=report.mean_novelty, diversity=report.mean_diversity,
                                       incoherence=report.mean_incoherence, quality=report.mean_quality,
                                       quality_std=float(np.std(report.quality)), distinct=report.distinct,
                                       self_bleu=report.self_bleu, control=control,
                                       seconds=time.perf_counter() - start, outputs=outputs,
                                       attention_compute=controller.attention_budget(s)))
            bar.set_postfix(s=f"{s:.2f}", Q=f"{report.mean_quality:.3f}")
    finally:
        if generator is not None:
            generator.close()

    result = _analyse(results, task_type, weights, float(compute_budget), s_min, prompt_list, reference)
    result.s_max = s_max
    result.settings = {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "seed": seed,
                       "levels_requested": all_levels, "constraints": task.get("constraints", {}),
                       "nll_scale": _safe_nll_scale(quality), "violation_weight": quality.violation_weight}
    folder = os.fspath(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="hcs_sweep_")
    os.makedirs(folder, exist_ok=True)
    if plot:
        result.save_plot(os.path.join(folder, "sweep.png"))
    result.to_json(os.path.join(folder, "sweep.json"))
    return result


def _safe_nll_scale(quality: QualityFunctional) -> float | None:
    try:
        return quality.nll_scale
    except ValueError:
        return None


def _analyse(results: list[LevelResult], task_type: str, weights: QualityWeights, budget: float, s_min: float,
             prompts: list[str], reference: list[str]) -> SweepResult:
    """Fits, bounds and s* from the measured levels (see `SweepResult.s_star`)."""
    s = [lv.s for lv in results]
    fits: dict[str, PowerLawFit] = {}
    notes = []
    for key in ("novelty", "diversity", "incoherence"):
        try:
            fits[key] = fit_power_law(s, [getattr(lv, key) for lv in results])
        except ValueError as exc:
            notes.append(f"{key}: {exc}")
    bounds, note = (None, "; ".join(notes)) if notes else corollary1_bounds(
        fits["novelty"], fits["diversity"], fits["incoherence"], weights)
    q = [lv.quality for lv in results]
    k = int(np.argmax(q))
    best = s[k]
    s_fit, s_star, why = None, best, "best measured level (no fit)"
    if not notes:
        lo_range, hi_range = max(s[0], s_min, 1e-6), s[-1]
        s_fit = argmax_on(lambda x: fitted_quality(x, fits, weights), lo_range, hi_range)
        # the neighbours of the best level (the level itself at either end of the range)
        lo, hi = (s[k - 1] if k > 0 else s[k]), (s[k + 1] if k + 1 < len(s) else s[k])
        inside = (lo < s_fit < hi) or (k == 0 and s_fit == lo) or (k == len(s) - 1 and s_fit == hi) \
            or (lo == hi == s_fit)
        if inside:
            s_star, why = s_fit, "fitted optimum, between the best measured level's neighbours"
        else:
            why = (f"best measured level; the fitted optimum ({s_fit:.4g}) lies outside its neighbours "
                   f"({lo:g}, {hi:g}), so the fit does not refine it")
    return SweepResult(task_type=task_type, levels=results, weights=weights, compute_budget=budget, s_min=s_min,
                       best_measured=best, s_star=s_star, s_star_fit=s_fit, fits=fits, bounds=bounds,
                       bounds_note=note, prompts=prompts, reference=reference, s_star_note=why)
