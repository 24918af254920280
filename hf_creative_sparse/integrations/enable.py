"""The one-liner: `enable_creative_sparse`, `disable_creative_sparse`, `sparsity_report`.

``enable_creative_sparse(pipe)`` finds the pipeline's transformer(s) (``transformer``,
and ``transformer_2`` of Wan 2.2), picks the family's `ModelPatch` from the registry,
swaps in the sparse attention processors and returns a `CreativeSparseHandle`. It also
gives the layers a shared `StepClock`:

* with a pipeline, the scheduler's ``set_timesteps`` starts a loop (the number of steps
  is ``len(scheduler.timesteps)``) and its ``step`` ends a step, so classifier-free
  guidance run as two transformer calls per step still counts one step;
* with a bare transformer, the ``timestep`` argument of each forward is read (a smaller
  timestep is the next step); a schedule then needs
  ``PatchOptions(num_inference_steps=...)``.

``disable_creative_sparse`` puts the original processor objects (and scheduler methods)
back, so outputs afterwards are bit-identical to those before.

Example:
    >>> import torch
    >>> from diffusers import WanTransformer3DModel
    >>> import hf_creative_sparse as hcs
    >>> model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
    ...     in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
    ...     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    >>> handle = hcs.enable_creative_sparse(model, hcs.SparseAttentionConfig(topk=0.5, min_seq_len=0))
    >>> out = model(torch.randn(1, 4, 2, 32, 32), timestep=torch.tensor([500]),
    ...             encoder_hidden_states=torch.randn(1, 8, 16)).sample
    >>> len(hcs.sparsity_report(model).rows)
    2
    >>> hcs.disable_creative_sparse(model)
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ops.config import SparseAttentionConfig
from .registry import ModelPatch, find_patch, registered_patches, supported_families
from .state import LayerState, PatchOptions, StepClock

#: Attribute under which the handle is stored on the pipeline and on each patched model.
HANDLE_ATTR = "_hf_creative_sparse_handle"
#: Pipeline components tried first, in this order (Wan 2.2 has two transformers).
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


@dataclass
class SparsityReport:
    """Per-layer statistics of a patched model; ``print(report)`` shows a table.

    Attributes:
        rows: one dict per layer (see `LayerState.report_row`).
    """

    rows: list[dict[str, Any]]

    @property
    def calls(self) -> int:
        """Attention calls over all layers."""
        return sum(r["calls"] for r in self.rows)

    @property
    def mean_kept_fraction(self) -> float:
        """Kept fraction averaged over all calls of all layers (NaN before any call)."""
        calls = self.calls
        if not calls:
            return math.nan
        return sum(r["mean_kept_fraction"] * r["calls"] for r in self.rows if r["calls"]) / calls

    @property
    def time_ms(self) -> float:
        """Time spent in the patched attention calls, all layers."""
        return sum(r["time_ms"] for r in self.rows)

    def table(self) -> str:
        """The rows as an aligned text table with a total line."""
        header = ("layer", "calls", "kept", "backend", "fallbacks", "time ms")
        lines = [header]
        for r in self.rows:
            reasons = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallback_reasons"].items()))
            lines.append((r["layer"], str(r["calls"]), _fmt(r["mean_kept_fraction"]), r["backend"],
                          f"{r['fallbacks']}" + (f" ({reasons})" if reasons else ""), f"{r['time_ms']:.1f}"))
        lines.append(("total", str(self.calls), _fmt(self.mean_kept_fraction), "",
                      str(sum(r["fallbacks"] for r in self.rows)), f"{self.time_ms:.1f}"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        out = []
        for n, row in enumerate(lines):
            out.append("  ".join(cell.ljust(w) if i in (0, 3, 4) else cell.rjust(w)
                                 for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0 or n == len(lines) - 2:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


@dataclass(repr=False)
class CreativeSparseHandle:
    """What `enable_creative_sparse` installed; `disable` undoes it.

    Attributes:
        target: the pipeline or model it was called on.
        patches: component name ("" for a bare model) -> installed `ModelPatch`.
        clock: the `StepClock` shared by every patched layer.
        config, schedule, options: what was asked for.
    """

    target: Any
    patches: dict[str, ModelPatch]
    clock: StepClock
    config: SparseAttentionConfig
    schedule: Any
    options: PatchOptions
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    active: bool = True

    def __repr__(self) -> str:
        """One line: what is patched, how many layers, whether it is active."""
        parts = ", ".join(f"{component or type(patch.model).__name__}: {patch.family}"
                          for component, patch in self.patches.items())
        return (f"CreativeSparseHandle({type(self.target).__name__}; {parts or 'nothing patched'}; "
                f"{len(self.layer_states())} layers; {'active' if self.active else 'disabled'})")

    def layer_states(self) -> dict[str, LayerState]:
        """Layer name -> state; names carry the component ("transformer_2.blocks.0.attn1")
        when more than one component is patched."""
        prefix = len(self.patches) > 1
        out: dict[str, LayerState] = {}
        for component, patch in self.patches.items():
            for name, state in patch.layer_states().items():
                out[f"{component}.{name}" if prefix and component else name] = state
        return out

    def report(self) -> SparsityReport:
        """Per-layer statistics since enabling (or the last `reset_stats`)."""
        rows = []
        for name, state in self.layer_states().items():
            row = state.report_row()
            row["layer"] = name
            rows.append(row)
        return SparsityReport(rows)

    def reset_stats(self) -> None:
        """Forget every layer's statistics (e.g. after a warm-up run)."""
        for state in self.layer_states().values():
            state.reset_stats()

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new denoising loop by hand (bare transformers; pipelines do it through
        the scheduler)."""
        self.clock.begin(num_steps)

    def disable(self) -> None:
        """Restore the original processors and scheduler methods; idempotent."""
        if not self.active:
            return
        errors = []
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as err:  # restore as much as possible, then report
                errors.append(err)
        self._undo.clear()
        self.active = False
        if errors:
            raise RuntimeError(f"disable_creative_sparse could not restore everything: {errors}")


def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "components", None), Mapping)


def _matching_patch(model: Any) -> type[ModelPatch] | None:
    if not isinstance(model, torch.nn.Module):
        return None
    for cls in registered_patches():
        if cls.matches(model):
            return cls
    return None


def _targets(pipe_or_model: Any) -> dict[str, torch.nn.Module]:
    """Component name -> model to patch ("" for a bare model)."""
    if isinstance(pipe_or_model, torch.nn.Module):
        find_patch(pipe_or_model)  # raises the listing error early
        return {"": pipe_or_model}
    if not _is_pipeline(pipe_or_model):
        raise TypeError("pipe_or_model must be a diffusers pipeline (with .components) or a torch.nn.Module, "
                        f"got {type(pipe_or_model).__name__}")
    components = pipe_or_model.components
    found = {name: components[name] for name in TRANSFORMER_COMPONENTS
             if _matching_patch(components.get(name)) is not None}
    if not found:
        found = {name: module for name, module in components.items() if _matching_patch(module) is not None}
    if not found:
        kinds = ", ".join(f"{k}={type(v).__name__}" for k, v in components.items() if isinstance(v, torch.nn.Module))
        raise ValueError(f"{type(pipe_or_model).__name__} has no component that a creative-sparse patch handles "
                         f"(its models: {kinds or 'none'}); supported families: {supported_families()}")
    return found


def _wrap_method(obj: Any, name: str, after: Callable[[Any], None]) -> Callable[[], None]:
    """Replace ``obj.name`` by a wrapper calling ``after(obj)`` after it; return the undo."""
    had_own = name in vars(obj)
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        after(obj)
        return out

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__doc__ = getattr(original, "__doc__", None)
    setattr(obj, name, wrapper)

    def undo() -> None:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)

    return undo


def _timestep_reader(model: torch.nn.Module) -> Callable[[tuple, dict], Any]:
    params = list(inspect.signature(type(model).forward).parameters)[1:]
    index = params.index("timestep") if "timestep" in params else None

    def read(args: tuple, kwargs: dict) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if index is not None and len(args) > index:
            return args[index]
        return None

    return read


def _check_schedule(schedule: Any) -> None:
    if schedule is None:
        return
    from ..creative.control import TwoStageSchedule

    if not isinstance(schedule, TwoStageSchedule):
        raise TypeError(f"schedule must be a TwoStageSchedule or None, got {type(schedule).__name__}")


def get_handle(pipe_or_model: Any) -> CreativeSparseHandle | None:
    """The active handle of a pipeline or model, or None."""
    handle = getattr(pipe_or_model, HANDLE_ATTR, None)
    return handle if isinstance(handle, CreativeSparseHandle) and handle.active else None


def enable_creative_sparse(
    pipe_or_model: Any,
    config: SparseAttentionConfig | None = None,
    *,
    schedule: Any = None,
    calibration: Any = None,
    options: PatchOptions | None = None,
    allow_other_model: bool = False,
    retention: Any = None,
) -> CreativeSparseHandle:
    """Swap sparse attention into a diffusers pipeline or transformer model.

    Args:
        pipe_or_model: a pipeline (its ``transformer`` / ``transformer_2`` are patched) or
            a transformer model (CogVideoX, Flux, Wan, HunyuanVideo, or any family a
            registered `ModelPatch` handles).
        config: kernel thresholds and policy; text tokens are always kept dense. Default:
            with a `Calibration`, the config it was fitted with (its ``min_seq_len``,
            backend, ...: what was calibrated is what runs), else `SparseAttentionConfig()`.
            A config given here overrides the calibration's policy fields.
        schedule: a `TwoStageSchedule`: the dial s follows the denoising progress and sets
            the thresholds through `SparsityController` (``options.controller``). Without
            it the config's thresholds are fixed.
        calibration: per-layer thresholds: a `Calibration`, the directory it was saved
            to (checked against the model's class, family, layers and head counts), or a
            mapping layer name -> config or dict of fields (every name must be a patched
            layer of the model).
        options: `PatchOptions` (dense_steps, mask_refresh, num_inference_steps).
        retention: diffusion LMs (DiffusionGemma): keep this share of the cached context KV
            after ``delay_step`` dense denoising steps of each canvas: a `RetentionConfig`, a
            ratio, or one per batch row (see `hf_creative_sparse.integrations.retention`); the other
            arguments do not apply to it.
        allow_other_model: apply a `Calibration` made for another model class or family
            (e.g. a fine-tune defined as another class); its layer names and head counts
            must still match.

    Returns:
        A `CreativeSparseHandle`. Calling this again on the same object first disables
        the previous handle.

    Raises:
        ValueError: no supported transformer (the message lists the families), a
            schedule on a bare transformer without ``options.num_inference_steps``, or a
            calibration that does not fit the model.
        TypeError: arguments of the wrong type.
    """
    if retention is not None:  # diffusion LMs: context KV retention (hf_creative_sparse/integrations/retention.py)
        from .retention import enable_retention

        extra = [n for n, v in (("config", config), ("schedule", schedule), ("calibration", calibration),
                                ("options", options), ("allow_other_model", allow_other_model or None)) if v is not None]
        if extra:
            raise ValueError(f"retention= runs alone: {', '.join(extra)} would be ignored (the dial over denoising "
                             "steps is hcs.DiffusionDialProcessor)")
        return enable_retention(pipe_or_model, retention)
    if not isinstance(allow_other_model, bool):
        raise TypeError(f"allow_other_model must be a bool, got {type(allow_other_model).__name__}")
    if calibration is not None and not isinstance(calibration, Mapping):
        from ..calibration.result import as_calibration  # local: loads safetensors only when used

        calibration = as_calibration(calibration)  # a path is loaded (and checked) here
    if config is None:
        fitted = getattr(calibration, "config", None)  # a Calibration's base config
        config = fitted if isinstance(fitted, SparseAttentionConfig) else SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    if options is None:
        options = PatchOptions()
    if not isinstance(options, PatchOptions):
        raise TypeError(f"options must be a PatchOptions or None, got {type(options).__name__}")
    _check_schedule(schedule)
    targets = _targets(pipe_or_model)
    is_pipe = _is_pipeline(pipe_or_model)
    scheduler = pipe_or_model.components.get("scheduler") if is_pipe else None
    driven = scheduler is not None and callable(getattr(scheduler, "set_timesteps", None)) \
        and callable(getattr(scheduler, "step", None))
    if schedule is not None and not driven and options.num_inference_steps is None:
        raise ValueError("a schedule on a bare transformer needs the number of denoising steps: pass "
                         "options=PatchOptions(num_inference_steps=N), or enable on the pipeline")

    previous = [h for h in {id(h): h for h in (get_handle(pipe_or_model), *(get_handle(m) for m in targets.values()))
                            if h is not None}.values()]
    for handle in previous:
        handle.disable()

    clock = StepClock(options.num_inference_steps, source="scheduler" if driven else "timestep")
    handle = CreativeSparseHandle(target=pipe_or_model, patches={}, clock=clock, config=config,
                                  schedule=schedule, options=options)
    try:
        if driven:
            handle._undo.append(_wrap_method(scheduler, "set_timesteps",
                                             lambda s: clock.begin(len(s.timesteps) if getattr(s, "timesteps", None)
                                                                   is not None else None)))
            handle._undo.append(_wrap_method(scheduler, "step", lambda s: clock.advance()))
        for component, model in targets.items():
            patch_cls = find_patch(model)
            layer_cal = calibration.for_component(component, len(targets) > 1) \
                if hasattr(calibration, "for_component") else calibration
            patch = patch_cls(model, config, schedule=schedule, calibration=layer_cal, options=options, clock=clock)
            read = _timestep_reader(model)
            hook = model.register_forward_pre_hook(lambda mod, args, kwargs, read=read: clock.on_forward(read(args, kwargs)),
                                                   with_kwargs=True)
            handle._undo.append(hook.remove)
            patch.install()
            handle._undo.append(patch.remove)
            handle.patches[component] = patch
            _set_handle(model, handle)
        if hasattr(calibration, "check_fits"):  # class, family, layer names, head counts
            calibration.check_fits(handle, allow_other_model=allow_other_model)
        elif isinstance(calibration, Mapping):
            _check_mapping_names(calibration, handle)
        _set_handle(pipe_or_model, handle)
    except BaseException:
        handle.disable()
        raise
    return handle


def _set_handle(obj: Any, handle: CreativeSparseHandle) -> None:
    had_own = HANDLE_ATTR in vars(obj)
    previous = vars(obj).get(HANDLE_ATTR)
    setattr(obj, HANDLE_ATTR, handle)

    def undo() -> None:
        if vars(obj).get(HANDLE_ATTR) is not handle:
            return
        if had_own:
            setattr(obj, HANDLE_ATTR, previous)
        else:
            delattr(obj, HANDLE_ATTR)

    handle._undo.append(undo)


def _check_mapping_names(calibration: Mapping, handle: CreativeSparseHandle) -> None:
    """A mapping calibration may only name patched layers: a typo or a layer of another
    model would otherwise be accepted and do nothing."""
    known = {name for patch in handle.patches.values() for name in patch.layer_states()}
    bad_keys = [key for key in calibration if not isinstance(key, str)]
    if bad_keys:
        raise TypeError(f"calibration keys must be layer names (str), got {bad_keys[0]!r}")
    unknown = sorted(key for key in calibration if key not in known)
    if unknown:
        shown = ", ".join(sorted(known)[:6]) + (", ..." if len(known) > 6 else "")
        raise ValueError(f"calibration names {len(unknown)} layer(s) that this model does not have or does not "
                         f"patch: {', '.join(unknown[:6])}{', ...' if len(unknown) > 6 else ''}; its patched "
                         f"layers: {shown or 'none'}")


#: ``attn_implementation`` under which transformers models run sparse attention without a
#: handle (``from_pretrained(..., attn_implementation="creative_sparse")``).
TRANSFORMERS_IMPLEMENTATION = "creative_sparse"


def _uses_creative_sparse_attention(model: Any) -> bool:
    """Whether a transformers model (or one of its sub-models) was loaded or switched to
    ``attn_implementation="creative_sparse"``."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(getattr(getattr(m, "config", None), "_attn_implementation", None) == TRANSFORMERS_IMPLEMENTATION
               for m in model.modules())


def _implementation_report(model: torch.nn.Module) -> SparsityReport:
    """The report of a model using the attention implementation without a handle: one row
    per attention layer that has run (layers get their state on their first call)."""
    from .registry import load_builtin_patches

    load_builtin_patches()  # makes hf_creative_sparse.patches importable from a checkout
    module = importlib.import_module("hf_creative_sparse.patches.transformers_attention")
    rows = []
    for name, state in module.layer_states(model).items():
        row = state.report_row()
        row["layer"] = name
        rows.append(row)
    return SparsityReport(rows)


def disable_creative_sparse(pipe_or_model: Any) -> None:
    """Restore the original attention processors (outputs become bit-identical to those
    before enabling). Works on the pipeline or on any model the handle patched. On an
    object without an active handle (already disabled, or never enabled) it does nothing
    and warns.
    """
    handle = get_handle(pipe_or_model)
    if handle is not None:
        handle.disable()
        return
    hint = ""
    if _uses_creative_sparse_attention(pipe_or_model):
        hint = (" (it was loaded with attn_implementation='creative_sparse': switch back with "
                "model.set_attn_implementation('sdpa'))")
    warnings.warn(f"disable_creative_sparse: creative sparsity is not enabled on this "
                  f"{type(pipe_or_model).__name__} (already disabled, or never enabled); nothing to do{hint}",
                  stacklevel=2)


def sparsity_report(pipe_or_model: Any) -> SparsityReport:
    """Per layer: calls, mean kept fraction, backend, fallbacks, time (``print`` it).

    Works however sparse attention was switched on: `enable_creative_sparse`, or a
    transformers model loaded with ``attn_implementation="creative_sparse"`` (its
    layers appear after their first call).

    Raises:
        ValueError: creative sparsity is not enabled on ``pipe_or_model``.
    """
    handle = get_handle(pipe_or_model)
    if handle is not None:
        return handle.report()
    if _uses_creative_sparse_attention(pipe_or_model):
        return _implementation_report(pipe_or_model)
    raise ValueError(f"sparsity_report: creative sparsity is not enabled on this {type(pipe_or_model).__name__}; "
                     "call enable_creative_sparse first (or load a transformers model with "
                     "attn_implementation='creative_sparse')")
