"""``creative_sparse`` as a diffusers attention backend, with Ulysses context parallelism.

diffusers routes the attention of most of its transformers (Flux, Wan, HunyuanVideo,
Qwen-Image, ...) through ``attention_dispatch.dispatch_attention_fn``, which calls the
backend a processor names (``model.set_attention_backend(name)``) and, under context
parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``), wraps that
backend's forward op in its Ulysses or ring template. The registry of backends is private
and its names are a closed ``Enum``; this module is the one place that touches it: it adds
the member ``creative_sparse`` to ``AttentionBackendName`` and registers
`creative_sparse_attention` with ``supports_context_parallel=True``. It refuses diffusers
versions outside `SUPPORTED_DIFFUSERS` with a clear error.

One code path underneath: every call goes to a `LayerState.attend` (the per-layer
machinery the processor patches use: dial, schedule, dense steps, mask reuse, statistics).
Two ways in:

* ``hcs.register_diffusers_backend(config)`` then ``model.set_attention_backend(
  "creative_sparse")``: every layer shares one `LayerState` with ``config``.
* ``hcs.enable_diffusers_backend(pipe_or_model, config, schedule=, calibration=,
  options=)``: one `LayerState` per attention module (per-layer calibration, a report
  per layer, the step clock of `enable_creative_sparse`); forward hooks on the attention
  modules tell the backend which layer is calling. ``hcs.disable_creative_sparse`` and
  ``hcs.sparsity_report`` work on it as on the processor patches.

The backend sees only q/k/v: text tokens inside a joint sequence (Flux, HunyuanVideo) are
not known to it and are predicted like any token (give ``dense_prefix`` / ``dense_suffix``
in the config when the text length is fixed; the processor patches of
`enable_creative_sparse` keep text dense by themselves, without context parallelism).
CogVideoX calls SDPA directly and never reaches a backend.

Context parallelism (Ulysses; ring is refused) lives in `context_parallel`: a call made
under a ``ContextParallelConfig`` goes to `context_parallel.ulysses_attention`.

Inference only: the backward op raises, and ``return_lse=True`` is refused.

Example:
    >>> import torch
    >>> import hf_creative_sparse as hcs
    >>> from hf_creative_sparse.testing import tiny_random_transformer
    >>> model = tiny_random_transformer("wan")
    >>> handle = hcs.enable_diffusers_backend(model, hcs.SparseAttentionConfig(topk=0.5, min_seq_len=0))
    >>> out = model(torch.randn(1, 4, 2, 32, 32), timestep=torch.tensor([500]),
    ...             encoder_hidden_states=torch.randn(1, 8, 16)).sample
    >>> sorted(r["layer"] for r in hcs.sparsity_report(model).rows)[:2]
    ['blocks.0.attn1', 'blocks.0.attn2']
    >>> hcs.disable_creative_sparse(model)
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..ops.config import SparseAttentionConfig
from .registry import ModelPatch
from .context_parallel import BackendLayer, ulysses_attention
from .state import LayerState, PatchOptions, StepClock

#: The backend's name in diffusers (``model.set_attention_backend(BACKEND_NAME)``).
BACKEND_NAME = "creative_sparse"
#: The ``AttentionBackendName`` member name added for it.
MEMBER_NAME = "CREATIVE_SPARSE"
#: diffusers versions whose private registry and context-parallel templates this module
#: was written against: [low, high). Tested on 0.42.1; 0.36 introduced the
#: ``supports_context_parallel`` registry and the ``forward_op`` templates used here.
SUPPORTED_DIFFUSERS = ("0.36.0", "0.43.0")

# -- diffusers' private registry ----------------------------------------------------------


def check_diffusers_version(version: str | None = None) -> str:
    """The installed diffusers version when this module supports it.

    Args:
        version: a version string to check instead of the installed one (for tests).

    Raises:
        ImportError: diffusers is not installed.
        RuntimeError: the version lies outside `SUPPORTED_DIFFUSERS`; the message names the
            range (the backend touches diffusers' private registry, which changes between
            releases).
    """
    from packaging.version import Version

    if version is None:
        try:
            import diffusers
        except ImportError as err:
            raise ImportError("the creative_sparse diffusers backend needs diffusers: pip install "
                              f"'diffusers>={SUPPORTED_DIFFUSERS[0]},<{SUPPORTED_DIFFUSERS[1]}'") from err
        version = diffusers.__version__
    low, high = (Version(v) for v in SUPPORTED_DIFFUSERS)
    if not (low <= Version(version) < high):
        raise RuntimeError(
            f"the creative_sparse diffusers backend supports diffusers >= {low}, < {high} (it registers itself in "
            f"diffusers' private attention registry, whose layout changes between releases); found {version}. "
            f"Install a supported diffusers, or use hf_creative_sparse.enable_creative_sparse (attention processors).")
    return version


def _dispatch_module() -> Any:
    check_diffusers_version()
    from diffusers.models import attention_dispatch as ad

    missing = [name for name in ("AttentionBackendName", "_AttentionBackendRegistry",
                                 "_templated_context_parallel_attention", "_check_device", "_check_shape")
               if not hasattr(ad, name)]
    if missing:
        raise RuntimeError(f"diffusers.models.attention_dispatch lacks {missing}: this diffusers is not one the "
                           "creative_sparse backend supports")
    return ad


def _backend_member(ad: Any) -> Any:
    """``AttentionBackendName.CREATIVE_SPARSE``, added to the closed Enum on first use.

    diffusers validates backend names against the Enum's members (``set_attention_backend``,
    ``AttentionBackendName(name)``), so a new backend needs a real member: built as Enum
    does for a ``str`` mix-in and entered in the Enum's name and value maps.
    """
    enum_cls = ad.AttentionBackendName
    existing = enum_cls._value2member_map_.get(BACKEND_NAME)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, BACKEND_NAME)
    member._name_ = MEMBER_NAME
    member._value_ = BACKEND_NAME
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(MEMBER_NAME, member)
    else:
        type.__setattr__(enum_cls, MEMBER_NAME, member)
        enum_cls._member_map_[MEMBER_NAME] = member
    enum_cls._member_names_.append(MEMBER_NAME)
    enum_cls._value2member_map_[BACKEND_NAME] = member
    return member


#: The LayerState of calls made outside `enable_diffusers_backend` (plain
#: ``set_attention_backend``); set by `register_diffusers_backend`.
_DEFAULT_STATE: list[LayerState] = []


def register_diffusers_backend(config: SparseAttentionConfig | None = None) -> str:
    """Register ``creative_sparse`` in diffusers' attention dispatch (idempotent).

    Afterwards ``model.set_attention_backend("creative_sparse")`` works on every model whose
    processors call ``dispatch_attention_fn``, with and without Ulysses context parallelism.

    Args:
        config: the thresholds of calls that no `enable_diffusers_backend` layer claims
            (default `SparseAttentionConfig()`); a new config replaces the previous one.

    Returns:
        The backend name, ``"creative_sparse"``.

    Raises:
        ImportError / RuntimeError: diffusers missing or unsupported (`check_diffusers_version`).
        TypeError: ``config`` is not a `SparseAttentionConfig`.
    """
    if config is not None and not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    ad = _dispatch_module()
    member = _backend_member(ad)
    registry = ad._AttentionBackendRegistry
    if registry._backends.get(member) is not creative_sparse_attention:
        registry.register(member, constraints=[ad._check_device, ad._check_shape],
                          supports_context_parallel=True)(creative_sparse_attention)
    if config is not None or not _DEFAULT_STATE:
        _DEFAULT_STATE[:] = [LayerState(BACKEND_NAME, config if config is not None else SparseAttentionConfig())]
    return BACKEND_NAME


def default_state() -> LayerState:
    """The `LayerState` that calls outside `enable_diffusers_backend` layers go to (its
    ``report_row()`` counts them)."""
    if not _DEFAULT_STATE:
        register_diffusers_backend()
    return _DEFAULT_STATE[0]


#: The layer of the attention module being run (set by `DiffusersBackendPatch`'s hooks).
_CURRENT: contextvars.ContextVar[BackendLayer | None] = contextvars.ContextVar("hcs_diffusers_layer", default=None)
_DEFAULT_LAYER: list[BackendLayer] = []


def _current_layer() -> BackendLayer:
    layer = _CURRENT.get()
    if layer is not None:
        return layer
    state = default_state()
    if not _DEFAULT_LAYER or _DEFAULT_LAYER[0].state is not state:
        _DEFAULT_LAYER[:] = [BackendLayer(state)]
    return _DEFAULT_LAYER[0]


# -- the backend --------------------------------------------------------------------------


def key_padding_mask_from(attn_mask: torch.Tensor | None, batch: int, len_q: int, len_k: int) -> torch.Tensor | None:
    """diffusers' ``attn_mask`` as a bool key padding mask [B, Nk] (True = attend), or
    None for no mask. A mask that varies over queries or heads, or a float mask with
    values other than 0 and -inf, is not a key padding mask: raises ValueError (the
    backend then runs dense SDPA with the mask).

    Accepted: bool or 0/-inf float of shape [B, Nk], [B, 1, 1, Nk], [1, Nk] or [Nk]
    (broadcast over the batch).
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.shape[-1] != len_k:
        raise ValueError(f"attn_mask's last dim must be the key length {len_k}, got shape {tuple(attn_mask.shape)}")
    lead = attn_mask.shape[:-1]
    if len(lead) > 3 or any(d != 1 for d in lead[1:]) or (len(lead) >= 1 and lead[0] not in (1, batch)):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not a key padding mask")
    if attn_mask.dtype == torch.bool:
        keep = attn_mask
    elif attn_mask.is_floating_point():
        zero, neg_inf = attn_mask == 0, attn_mask == float("-inf")
        if not bool((zero | neg_inf).all()):
            raise ValueError("a float attn_mask with values other than 0 and -inf is not a key padding mask")
        keep = zero
    else:
        raise ValueError(f"attn_mask of dtype {attn_mask.dtype} is not a key padding mask")
    return keep.reshape(-1, len_k).expand(batch, len_k)


def _attend(layer_state: LayerState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None,
            enable_gqa: bool) -> torch.Tensor:
    """One backend call on (B, S, H, D) tensors through ``layer_state`` (output (B, S, H, D))."""
    if dropout_p:
        raise ValueError(f"creative_sparse is an inference backend: dropout_p must be 0, got {dropout_p}")
    if not enable_gqa and query.shape[2] != key.shape[2]:
        raise ValueError(f"query has {query.shape[2]} heads and key {key.shape[2]}: pass enable_gqa=True for "
                         "grouped-query attention")
    try:
        kpm = key_padding_mask_from(attn_mask, query.shape[0], query.shape[1], key.shape[1])
    except ValueError as err:  # a general mask: dense SDPA honours it, and the layer counts a fallback
        start = time.perf_counter()
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        mask = attn_mask
        if mask.dim() == 2 and tuple(mask.shape) == (query.shape[0], key.shape[1]):  # [B, Sk], as diffusers' native
            mask = mask[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                               scale=scale, enable_gqa=enable_gqa).transpose(1, 2)
        layer_state.record_fallback(f"attention mask: {err}", time.perf_counter() - start)
        return out
    return layer_state.attend(query, key, value, layout="NHD", is_causal=is_causal, scale=scale, key_padding_mask=kpm)


def creative_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """The ``creative_sparse`` diffusers backend: sparse attention of (B, S, H, D) q/k/v
    through the calling layer's `LayerState` (see the module docstring).

    Args:
        query: (B, Sq, Hq, D); key, value: (B, Sk, Hkv, D).
        attn_mask: None, or a key padding mask (bool True = attend, or 0/-inf float) of
            shape [B, Sk] or [B, 1, 1, Sk]; any other mask runs dense SDPA with it (the
            layer's report counts an "attention mask" fallback).
        dropout_p: must be 0 (inference backend).
        is_causal: top-left causal mask (Sq == Sk).
        scale: softmax scale (default 1/sqrt(D)).
        enable_gqa: allow Hkv < Hq (Hkv dividing Hq); without it differing head counts raise.
        return_lse: must be False.
        _parallel_config: diffusers' `ParallelConfig` under context parallelism: Ulysses
            runs through diffusers' template with this backend's forward op; ring raises.

    Returns:
        (B, Sq, Hq, D) in q's dtype.
    """
    if return_lse:
        raise ValueError("creative_sparse does not return the log-sum-exp to diffusers (return_lse=True)")
    if _parallel_config is None or getattr(_parallel_config, "context_parallel_config", None) is None:
        return _attend(_current_layer().for_heads(0, query.shape[2], query.shape[2]), query, key, value, attn_mask,
                       dropout_p, is_causal, scale, enable_gqa)
    return ulysses_attention(_current_layer(), _attend, query, key, value, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa, _parallel_config)


# -- per-layer states: the patch and the one-liner ----------------------------------------


def _dispatch_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every attention module whose processor goes through diffusers'
    dispatch (it has ``_attention_backend``)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) and name:
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                found.append((name, module))
    return found


class DiffusersBackendPatch(ModelPatch):
    """Points every dispatch-routed attention module of a diffusers model at the
    ``creative_sparse`` backend, each with its own `LayerState` (forward hooks tell the
    backend which module is calling); `remove` restores each processor's previous backend."""

    family = "diffusers_backend"
    model_classes = ("ModelMixin",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._layers: dict[str, BackendLayer] = {}
        self._previous: list[tuple[Any, Any]] = []
        self._hooks: list[Any] = []

    def install(self) -> None:
        if self.installed:
            raise RuntimeError("DiffusersBackendPatch is already installed")
        member = _backend_member(_dispatch_module())
        modules = _dispatch_attention_modules(self.model)
        if not modules:
            raise ValueError(f"{type(self.model).__name__} has no attention module that goes through diffusers' "
                             "attention dispatch (CogVideoX, say, calls SDPA directly): use enable_creative_sparse")
        for name, module in modules:
            heads = getattr(module, "heads", None)
            layer = self._layers[name] = BackendLayer(self.make_state(name), heads if isinstance(heads, int) else None)
            tokens: list[contextvars.Token] = []

            def enter(mod: torch.nn.Module, args: tuple, kwargs: dict, layer: BackendLayer = layer,
                      tokens: list = tokens) -> None:
                tokens.append(_CURRENT.set(layer))

            def leave(mod: torch.nn.Module, args: tuple, output: Any, tokens: list = tokens) -> None:
                if tokens:
                    _CURRENT.reset(tokens.pop())

            self._hooks.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            self._hooks.append(module.register_forward_hook(leave, always_call=True))
            self._previous.append((module.processor, module.processor._attention_backend))
            module.processor._attention_backend = member
        self.installed = True

    def remove(self) -> None:
        for processor, backend in self._previous:
            processor._attention_backend = backend
        for hook in self._hooks:
            hook.remove()
        self._previous.clear()
        self._hooks.clear()
        self.installed = False

    def layer_states(self) -> dict[str, LayerState]:
        """Layer name -> the state that served this process's calls (the head shard's
        under Ulysses)."""
        return {name: layer.active_state() for name, layer in self._layers.items()}


def backend_layers(pipe_or_model: Any) -> dict[str, BackendLayer]:
    """Layer name -> `BackendLayer` (its state and head shards) of the active
    `enable_diffusers_backend` handle on ``pipe_or_model``.

    Raises:
        ValueError: the backend is not enabled on ``pipe_or_model``.
    """
    from .enable import get_handle

    handle = get_handle(pipe_or_model)
    patches = [p for p in handle.patches.values() if isinstance(p, DiffusersBackendPatch)] if handle else []
    if not patches:
        raise ValueError(f"enable_diffusers_backend is not active on this {type(pipe_or_model).__name__}")
    prefixed = len(handle.patches) > 1
    return {f"{component}.{name}" if prefixed and component else name: layer
            for component, patch in handle.patches.items() for name, layer in patch._layers.items()}


def _backend_targets(pipe_or_model: Any) -> dict[str, torch.nn.Module]:
    from .enable import TRANSFORMER_COMPONENTS, _is_pipeline

    if isinstance(pipe_or_model, torch.nn.Module):
        return {"": pipe_or_model}
    if not _is_pipeline(pipe_or_model):
        raise TypeError("pipe_or_model must be a diffusers pipeline (with .components) or a torch.nn.Module, "
                        f"got {type(pipe_or_model).__name__}")
    components = pipe_or_model.components
    found = {name: components[name] for name in TRANSFORMER_COMPONENTS
             if isinstance(components.get(name), torch.nn.Module)}
    if not found:
        raise ValueError(f"{type(pipe_or_model).__name__} has no transformer component "
                         f"({' or '.join(TRANSFORMER_COMPONENTS)})")
    return found


def enable_diffusers_backend(
    pipe_or_model: Any,
    config: SparseAttentionConfig | None = None,
    *,
    schedule: Any = None,
    calibration: Any = None,
    options: PatchOptions | None = None,
) -> Any:
    """Route a diffusers pipeline's or model's attention through the ``creative_sparse``
    backend, one `LayerState` per attention module; works with ``enable_parallelism``
    (Ulysses) before or after this call.

    Args: as `enable_creative_sparse` (``config``, ``schedule``, ``calibration``,
    ``options``). Every attention module whose processor calls diffusers' dispatch is
    served (self- and cross-attention: short key sequences run dense by the policy).

    Returns:
        A `CreativeSparseHandle` (``disable_creative_sparse`` and ``sparsity_report`` take
        the pipeline or model).

    Raises:
        ImportError / RuntimeError: diffusers missing or unsupported.
        ValueError: no dispatch-routed attention module; a calibration that does not fit;
            a schedule on a bare model without ``options.num_inference_steps``.
    """
    from .enable import (CreativeSparseHandle, _check_schedule, _is_pipeline, _set_handle, _timestep_reader,
                      _wrap_method, get_handle)

    register_diffusers_backend()
    if config is None:
        config = SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    options = PatchOptions() if options is None else options
    if not isinstance(options, PatchOptions):
        raise TypeError(f"options must be a PatchOptions or None, got {type(options).__name__}")
    _check_schedule(schedule)
    if calibration is not None and not isinstance(calibration, Mapping):
        from ..calibration.result import as_calibration

        calibration = as_calibration(calibration)
    targets = _backend_targets(pipe_or_model)
    scheduler = pipe_or_model.components.get("scheduler") if _is_pipeline(pipe_or_model) else None
    driven = callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))
    if schedule is not None and not driven and options.num_inference_steps is None:
        raise ValueError("a schedule on a bare transformer needs the number of denoising steps: pass "
                         "options=PatchOptions(num_inference_steps=N), or enable on the pipeline")
    for previous in {id(h): h for h in (get_handle(pipe_or_model), *map(get_handle, targets.values()))
                     if h is not None}.values():
        previous.disable()

    clock = StepClock(options.num_inference_steps, source="scheduler" if driven else "timestep")
    handle = CreativeSparseHandle(target=pipe_or_model, patches={}, clock=clock, config=config,
                                  schedule=schedule, options=options)
    try:
        if driven:
            handle._undo.append(_wrap_method(scheduler, "set_timesteps", lambda s: clock.begin(
                len(s.timesteps) if getattr(s, "timesteps", None) is not None else None)))
            handle._undo.append(_wrap_method(scheduler, "step", lambda s: clock.advance()))
        for component, model in targets.items():
            layer_cal = calibration.for_component(component, len(targets) > 1) \
                if hasattr(calibration, "for_component") else calibration
            patch = DiffusersBackendPatch(model, config, schedule=schedule, calibration=layer_cal, options=options,
                                          clock=clock)
            read = _timestep_reader(model)
            hook = model.register_forward_pre_hook(
                lambda mod, args, kwargs, read=read: clock.on_forward(read(args, kwargs)), with_kwargs=True)
            handle._undo.append(hook.remove)
            patch.install()
            handle._undo.append(patch.remove)
            handle.patches[component] = patch
            _set_handle(model, handle)
        if calibration is not None and not isinstance(calibration, Mapping):
            # the backend's patch family is not the processor patches': names and heads only
            calibration.check_fits(handle, allow_other_model=True, allow_uncalibrated=True)
        _set_handle(pipe_or_model, handle)
    except BaseException:
        handle.disable()
        raise
    return handle


__all__ = [
    "BACKEND_NAME", "SUPPORTED_DIFFUSERS", "DiffusersBackendPatch", "backend_layers", "check_diffusers_version",
    "creative_sparse_attention", "default_state", "enable_diffusers_backend", "key_padding_mask_from",
    "register_diffusers_backend",
]
