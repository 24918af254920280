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

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import SparseAttentionConfig
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


@dataclass
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
    from .control import TwoStageSchedule

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
) -> CreativeSparseHandle:
    """Swap sparse attention into a diffusers pipeline or transformer model.

    Args:
        pipe_or_model: a pipeline (its ``transformer`` / ``transformer_2`` are patched) or
            a transformer model (CogVideoX, Flux, Wan, HunyuanVideo, or any family a
            registered `ModelPatch` handles).
        config: kernel thresholds (default `SparseAttentionConfig()`); text tokens are
            always kept dense.
        schedule: a `TwoStageSchedule`: the dial s follows the denoising progress and sets
            the thresholds through `SparsityController` (``options.controller``). Without
            it the config's thresholds are fixed.
        calibration: per-layer thresholds: a `Calibration`, the directory it was saved
            to (checked against the model's layers and head counts), or a mapping layer
            name -> config or dict of fields.
        options: `PatchOptions` (dense_steps, mask_refresh, num_inference_steps).

    Returns:
        A `CreativeSparseHandle`. Calling this again on the same object first disables
        the previous handle.

    Raises:
        ValueError: no supported transformer (the message lists the families), or a
            schedule on a bare transformer without ``options.num_inference_steps``.
        TypeError: arguments of the wrong type.
    """
    if config is None:
        config = SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    if options is None:
        options = PatchOptions()
    if not isinstance(options, PatchOptions):
        raise TypeError(f"options must be a PatchOptions or None, got {type(options).__name__}")
    _check_schedule(schedule)
    if calibration is not None and not isinstance(calibration, Mapping):
        from .calibration import as_calibration  # local: loads safetensors only when used

        calibration = as_calibration(calibration)  # a path is loaded (and checked) here
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
        if hasattr(calibration, "check_fits"):
            calibration.check_fits(handle)  # layer names and head counts; ValueError otherwise
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


def _require_handle(pipe_or_model: Any, what: str) -> CreativeSparseHandle:
    handle = get_handle(pipe_or_model)
    if handle is None:
        raise ValueError(f"{what}: creative sparsity is not enabled on this {type(pipe_or_model).__name__}; "
                         "call enable_creative_sparse first")
    return handle


def disable_creative_sparse(pipe_or_model: Any) -> None:
    """Restore the original attention processors (outputs become bit-identical to those
    before enabling). Works on the pipeline or on any model the handle patched.

    Raises:
        ValueError: creative sparsity is not enabled on ``pipe_or_model``.
    """
    _require_handle(pipe_or_model, "disable_creative_sparse").disable()


def sparsity_report(pipe_or_model: Any) -> SparsityReport:
    """Per layer: calls, mean kept fraction, backend, fallbacks, time (``print`` it).

    Raises:
        ValueError: creative sparsity is not enabled on ``pipe_or_model``.
    """
    return _require_handle(pipe_or_model, "sparsity_report").report()
