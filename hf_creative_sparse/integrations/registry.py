"""The registry of model-family patches.

A `ModelPatch` is one model family's glue: it says which model classes it handles,
installs attention processors (or attention functions) that route q/k/v through a
per-layer `LayerState`, and removes them again, restoring the original objects.
``patches/<family>.py`` (installed as ``hf_creative_sparse.patches``) defines one patch
per family and registers it with `register_patch` when imported. The registry imports
those modules only when a model is looked up, so ``import hf_creative_sparse`` never
imports diffusers or transformers.

Example:
    >>> import torch
    >>> from hf_creative_sparse.integrations.registry import find_patch
    >>> try:
    ...     find_patch(torch.nn.Linear(2, 2))
    ... except ValueError as err:
    ...     print(str(err).split(";")[0])
    no creative-sparse patch handles Linear
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch

from ..ops.config import SparseAttentionConfig
from .state import LayerState, PatchOptions, StepClock

#: Modules of ``hf_creative_sparse.patches`` imported on the first lookup, in this order.
BUILTIN_PATCH_MODULES: tuple[str, ...] = ("cogvideox", "flux", "wan", "hunyuan_video", "transformers_attention")

_REGISTRY: list[type["ModelPatch"]] = []
_IMPORT_ERRORS: dict[str, str] = {}
_builtins_loaded = False


def layer_config(calibration: Any, name: str, base: SparseAttentionConfig) -> SparseAttentionConfig:
    """The thresholds of layer ``name``: ``base`` adjusted by a calibration.

    ``calibration`` may be None (``base``), an object with ``config_for(name, base) ->
    SparseAttentionConfig`` (the calibration module's `Calibration`), or a mapping from
    layer name to a `SparseAttentionConfig` or to a dict of fields to replace in ``base``
    (layers not in the mapping keep ``base``).
    """
    if calibration is None:
        return base
    if hasattr(calibration, "config_for"):
        cfg = calibration.config_for(name, base)
    elif isinstance(calibration, Mapping):
        entry = calibration.get(name)
        if entry is None:
            return base
        cfg = base.replace(**entry) if isinstance(entry, Mapping) else entry
    else:
        raise TypeError("calibration must be None, a Calibration (with config_for(name, base)) or a mapping "
                        f"layer name -> SparseAttentionConfig or dict, got {type(calibration).__name__}")
    if not isinstance(cfg, SparseAttentionConfig):
        raise TypeError(f"calibration for layer {name!r} must give a SparseAttentionConfig, got {type(cfg).__name__}")
    return cfg


class ModelPatch(abc.ABC):
    """One model family's glue between a model and `LayerState`.

    Subclasses set ``family`` and ``model_classes``, implement `install` / `remove`, and
    create their layers' states with `make_state`. A subclass that overrides
    ``__init__`` must accept and forward the keyword arguments of this one.

    Args:
        model: the model (a diffusers transformer, a transformers PreTrainedModel, ...).
        config: base kernel thresholds for every layer.
        schedule: a `TwoStageSchedule` (s over denoising steps), or None.
        calibration: per-layer thresholds (see `layer_config`), or None.
        options: `PatchOptions` (dense_steps, mask_refresh, ...).
        clock: the `StepClock` shared by the layers (the API shares one per handle).
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]

    def __init__(self, model: torch.nn.Module, config: SparseAttentionConfig, *, schedule: Any = None,
                 calibration: Any = None, options: PatchOptions | None = None,
                 clock: StepClock | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, SparseAttentionConfig):
            raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
        if options is not None and not isinstance(options, PatchOptions):
            raise TypeError(f"options must be a PatchOptions, got {type(options).__name__}")
        if clock is not None and not isinstance(clock, StepClock):
            raise TypeError(f"clock must be a StepClock, got {type(clock).__name__}")
        self.model = model
        self.config = config
        self.schedule = schedule
        self.calibration = calibration
        self.options = options if options is not None else PatchOptions()
        self.clock = clock if clock is not None else StepClock(self.options.num_inference_steps)
        self.installed = False
        self._states: dict[str, LayerState] = {}

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """True when ``model``'s class (or a base class) is one of ``model_classes``."""
        return any(klass.__name__ in cls.model_classes for klass in type(model).__mro__)

    def make_state(self, name: str) -> LayerState:
        """Create and remember the `LayerState` of layer ``name`` (calibrated config)."""
        config = layer_config(self.calibration, name, self.config)
        state = LayerState(name, config, schedule=self.schedule, clock=self.clock, options=self.options,
                           calibrated=config is not self.config)
        self._states[name] = state
        return state

    @abc.abstractmethod
    def install(self) -> None:
        """Swap in the sparse processors / attention functions."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Restore the original processors / functions exactly."""

    def layer_states(self) -> dict[str, LayerState]:
        """Layer name -> state, for every patched layer."""
        return dict(self._states)


def processor_kind(processor: Any, names: tuple[str, ...], module: str) -> str | None:
    """The class name of ``processor`` when it is one of diffusers' own ``names`` defined
    in ``module`` (not a user subclass, an IP-Adapter variant or a same-named class of
    another model, whose math the replacements do not repeat)."""
    kind = type(processor)
    if kind.__name__ in names and kind.__module__ == module:
        return kind.__name__
    return None


class SparseProcessor:
    """Base of the replacement processors: holds the layer's `LayerState` and the
    original processor, to which calls the sparse path does not handle are handed.

    ``_attention_backend`` and ``_parallel_config`` (set by diffusers'
    ``set_attention_backend`` / context parallelism) are read from and written to the
    original processor, so a fallback call behaves exactly as the model would.
    """

    def __init__(self, state: LayerState, original: Any) -> None:
        self.state = state
        self.original = original

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    def fallback(self, reason: str, *args: Any, **kwargs: Any) -> Any:
        """Run the original processor on this call and count it as a fallback."""
        start = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.state.record_fallback(reason, time.perf_counter() - start)
        return out


class AttentionProcessorPatch(ModelPatch):
    """Base of the diffusers families: swap the processor of every attention module whose
    processor is one the family replaces, and put the very same objects back on `remove`.

    Subclasses implement `make_processor` (return None to leave a module alone) and may
    add forward hooks with `add_forward_pre_hook` (removed with the processors).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._originals: dict[str, tuple[torch.nn.Module, Any]] = {}
        self._hook_handles: list[Any] = []

    @abc.abstractmethod
    def make_processor(self, name: str, module: torch.nn.Module) -> Any | None:
        """The replacement processor of attention module ``name``, or None to keep it."""

    def add_forward_pre_hook(self, module: torch.nn.Module, hook: Callable[..., Any]) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=True)``, removed by `remove`."""
        self._hook_handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def add_forward_hook(self, module: torch.nn.Module, hook: Callable[..., Any]) -> None:
        """``module.register_forward_hook(hook, always_call=True)``, removed by `remove`."""
        self._hook_handles.append(module.register_forward_hook(hook, always_call=True))

    def install(self) -> None:
        if self.installed:
            raise RuntimeError(f"{type(self).__name__} is already installed")
        for name, module in self.model.named_modules():
            if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
                continue
            processor = self.make_processor(name, module)
            if processor is None:
                continue
            self._originals[name] = (module, module.processor)
            module.set_processor(processor)
        if not self._originals:
            for handle in self._hook_handles:
                handle.remove()
            self._hook_handles.clear()
            raise ValueError(f"{type(self.model).__name__} has no attention layer that the {self.family!r} patch "
                             "replaces (were its processors changed, e.g. by an IP-Adapter?)")
        self.installed = True

    def remove(self) -> None:
        for module, original in self._originals.values():
            module.set_processor(original)
        self._originals.clear()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self.installed = False


def register_patch(cls: type[ModelPatch]) -> type[ModelPatch]:
    """Class decorator: make ``cls`` available to `find_patch` (idempotent per class name)."""
    if not (isinstance(cls, type) and issubclass(cls, ModelPatch)):
        raise TypeError(f"register_patch expects a ModelPatch subclass, got {cls!r}")
    for attr in ("family", "model_classes"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define the class attribute {attr!r}")
    if not isinstance(cls.model_classes, tuple) or not all(isinstance(c, str) for c in cls.model_classes):
        raise TypeError(f"{cls.__name__}.model_classes must be a tuple of class names")
    key = f"{cls.__module__}.{cls.__qualname__}"
    _REGISTRY[:] = [c for c in _REGISTRY if f"{c.__module__}.{c.__qualname__}" != key]
    _REGISTRY.append(cls)
    return cls


def load_builtin_patches() -> None:
    """Import the built-in patch modules once; a module whose dependency is missing is
    skipped and its error shown when no patch matches."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    for short in BUILTIN_PATCH_MODULES:
        full = f"hf_creative_sparse.patches.{short}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as err:
            if err.name != full:  # the module exists but a dependency is missing
                _IMPORT_ERRORS[short] = f"{type(err).__name__}: {err}"
        except ImportError as err:
            _IMPORT_ERRORS[short] = f"{type(err).__name__}: {err}"
    _builtins_loaded = True


def registered_patches() -> list[type[ModelPatch]]:
    """The registered patch classes, built-ins included."""
    load_builtin_patches()
    return list(_REGISTRY)


def supported_families() -> str:
    """'family (ClassA, ClassB), ...' for error messages."""
    return ", ".join(f"{c.family} ({', '.join(c.model_classes)})" for c in registered_patches())


def find_patch(model: torch.nn.Module) -> type[ModelPatch]:
    """The patch class that handles ``model``.

    Raises:
        ValueError: no registered patch matches; the message lists the supported families.
    """
    for cls in registered_patches():
        if cls.matches(model):
            return cls
    missing = "".join(f"; patches.{k} not loaded ({v})" for k, v in _IMPORT_ERRORS.items())
    raise ValueError(f"no creative-sparse patch handles {type(model).__name__}; supported families: "
                     f"{supported_families() or 'none registered'}{missing}")
