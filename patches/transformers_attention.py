"""transformers glue: the ``creative_sparse`` attention implementation.

Every transformers model whose attention goes through ``AttentionInterface`` (GPT-2, the
Llama family, Mistral, Qwen, Mixtral, OLMoE, ...) can run its attention through
`sparse_attention`:

- ``hf_creative_sparse.enable_creative_sparse(model)`` (the `TransformersAttentionPatch`
  below): gives every attention layer a `LayerState` (statistics, the dial) and switches
  the model to ``attn_implementation="creative_sparse"``; ``disable_creative_sparse``
  restores the previous implementation exactly.
- ``from_pretrained(..., attn_implementation="creative_sparse")`` after
  ``import hf_creative_sparse``: the package registers the name the moment transformers'
  ``modeling_utils`` is imported (`hf_creative_sparse.integrations.transformers_hook`). Layers then get a
  `LayerState` with `DEFAULT_CONFIG` on their first call; `layer_states(model)` lists them.

What runs where (the attention function `creative_sparse_attention_forward`):

- Prefill (query length == key length, no cached prefix): `LayerState.attend`, i.e. the
  predicted block-sparse attention with causal masking, GQA (K/V at
  ``num_key_value_heads``) and key padding. The sparsity dial is the ``s`` that a running
  `CreativeSparseLogitsProcessor` published (k_attn(s) kept blocks), else the layer's config.
- Decoding steps with a KV cache (one query row, a plain key-padding mask):
  `DecodeState.attend`, decode-time KV-block sparsity (`ops/decode.py`, in the manner of
  Quest): each step attends to the key blocks whose per-block key min/max bound scores
  highest for the current query, plus sink and recent blocks, keeping k_attn(s) of them
  (the dial a running processor published) or a fixed budget (`set_decode_config`); the
  block statistics follow the cache incrementally. Short contexts, no dial and no fixed
  budget, or a budget that keeps nearly everything run transformers' SDPA (recorded as a
  "decode step" fallback with the reason).
- Other cached calls (several query rows over a longer cache), cross-attention, dropout
  during training, and any mask that is not plain causal + key padding (sliding windows,
  chunked or packed sequences, float/bias masks, per-head masks) run transformers' own
  SDPA function with the model's mask, recorded as a fallback with the reason.

The masks arrive because the name is also registered with ``AttentionMaskInterface``
(transformers' ``sdpa_mask``): None for plain causal attention without padding, else a
bool [B, 1, Q, K] mask (True = attend) from which the key padding mask is read and
checked (``mask == causal & padding``, else fallback).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hf_creative_sparse.ops.config import SparseAttentionConfig, SparseStats
from hf_creative_sparse.ops.decode import DecodeSparsityConfig, DecodeState
from hf_creative_sparse.integrations.registry import ModelPatch, register_patch
from hf_creative_sparse.integrations.state import LayerState

#: The name under which the attention function is registered.
ATTN_IMPLEMENTATION = "creative_sparse"
#: Thresholds of layers created lazily (``attn_implementation="creative_sparse"`` without
#: `enable_creative_sparse`). Change with `set_default_config`.
DEFAULT_CONFIG = SparseAttentionConfig()

#: Decode-time sparsity of layers without their own (`set_decode_config`).
DEFAULT_DECODE_CONFIG = DecodeSparsityConfig()

_STATE_ATTR = "_hcs_layer_state"
_DECODE_ATTR = "_hcs_decode_state"
_registered = False
_default_controller: Any = None


def register() -> None:
    """Register ``creative_sparse`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (idempotent; imports transformers).

    Example:
        >>> register()
        >>> from transformers import AttentionInterface
        >>> "creative_sparse" in AttentionInterface._global_mapping
        True
    """
    global _registered
    if _registered:
        return
    register_attention_function(ATTN_IMPLEMENTATION, creative_sparse_attention_forward)
    _registered = True


def register_attention_function(name: str, fn: Any) -> None:
    """Register ``fn`` as ``attn_implementation=name`` together with SDPA's mask function
    (without a mask function registered under the same name, padding masks arrive as None)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def set_default_config(config: SparseAttentionConfig) -> None:
    """Thresholds for layers that get their `LayerState` lazily (see the module docstring)."""
    global DEFAULT_CONFIG
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    DEFAULT_CONFIG = config


def layer_states(model: torch.nn.Module) -> dict[str, LayerState]:
    """Module name -> `LayerState` of every attention layer of ``model`` that has one."""
    return {name: getattr(m, _STATE_ATTR) for name, m in model.named_modules()
            if isinstance(getattr(m, _STATE_ATTR, None), LayerState)}


def set_decode_config(config: DecodeSparsityConfig, model: torch.nn.Module | None = None) -> None:
    """Decode-time KV-block sparsity for every attention layer of ``model`` (that has run
    or been patched), or, with ``model=None``, for layers created from now on.

    Example:
        >>> from hf_creative_sparse.ops.decode import DecodeSparsityConfig
        >>> set_decode_config(DecodeSparsityConfig(budget=0.25, min_context=1024))  # doctest: +SKIP
    """
    global DEFAULT_DECODE_CONFIG
    if not isinstance(config, DecodeSparsityConfig):
        raise TypeError(f"config must be a DecodeSparsityConfig, got {type(config).__name__}")
    if model is None:
        DEFAULT_DECODE_CONFIG = config
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    for _, module in _attention_modules(model):
        _decode_state_of(module).set_config(config)


def decode_states(model: torch.nn.Module) -> dict[str, DecodeState]:
    """Module name -> `DecodeState` of every attention layer of ``model`` that has one
    (its ``report()`` says how many decode steps ran sparse, on which backend, and why not)."""
    return {name: getattr(m, _DECODE_ATTR) for name, m in model.named_modules()
            if isinstance(getattr(m, _DECODE_ATTR, None), DecodeState)}


def _decode_state_of(module: torch.nn.Module) -> DecodeState:
    state = getattr(module, _DECODE_ATTR, None)
    if state is None:
        state = DecodeState(DEFAULT_DECODE_CONFIG, layer_index=_layer_index(module))
        setattr(module, _DECODE_ATTR, state)
    return state


def _layer_index(module: torch.nn.Module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and not isinstance(idx, bool) and idx >= 0 else None


def _decode_budget(state: LayerState) -> float | None:
    """k_attn(s) of the dial this call sees (schedule or published s), None without one."""
    global _default_controller
    s = state.current_s()
    if s is None:
        return None
    controller = state.options.controller
    if controller is None:
        if _default_controller is None:
            from hf_creative_sparse.creative.control import SparsityController

            _default_controller = SparsityController()
        controller = _default_controller
    return float(controller.attention_budget(s))


def _state_of(module: torch.nn.Module) -> LayerState:
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        idx = getattr(module, "layer_idx", None)
        name = type(module).__name__ + ("" if idx is None else f".{idx}")
        state = LayerState(name, DEFAULT_CONFIG)
        setattr(module, _STATE_ATTR, state)
    return state


def _record_dense(state: LayerState, reason: str, run: Any) -> Any:
    """Run ``run()`` (transformers' SDPA) and count it in the layer's statistics as a
    fallback with ``reason`` (wall-clock time; on GPU that is the launch time)."""
    start = time.perf_counter()
    result = run()
    state.record_fallback(reason, time.perf_counter() - start)
    return result


def plain_mask_parts(attention_mask: torch.Tensor | None, batch: int, len_q: int, len_k: int,
                     causal: bool) -> tuple[bool, torch.Tensor | None] | str:
    """Read a transformers sdpa-style mask as (is_causal, key_padding_mask).

    Args:
        attention_mask: None or bool [B or 1, 1, len_q, len_k], True = attend.
        causal: whether the layer is causal (used when the mask is None, and tried first).

    Returns:
        (is_causal, key_padding_mask bool [B, len_k] or None) when the mask is exactly
        "causal (or not) and key padding"; otherwise a string saying why not.

    Example:
        >>> m = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
        >>> plain_mask_parts(m, 1, 3, 3, True)
        (True, None)
    """
    if attention_mask is None:
        return causal, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        return f"mask is not a bool tensor ({getattr(attention_mask, 'dtype', type(attention_mask).__name__)})"
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, batch) \
            or tuple(attention_mask.shape[2:]) != (len_q, len_k):
        return f"mask shape {tuple(attention_mask.shape)} is not [B, 1, {len_q}, {len_k}]"
    mask = attention_mask[:, 0].expand(batch, len_q, len_k)
    padding = mask.any(dim=1)  # [B, len_k]: a key any query may see is not padding
    for is_causal in ((True, False) if causal else (False, True)):
        if _mask_equals(mask, padding, is_causal):
            return is_causal, (None if bool(padding.all()) else padding)
    return "mask is not causal + key padding (sliding window, chunked, packed or custom)"


#: Query rows compared at once by `_mask_equals`: memory O(B * rows * len_k), never a
#: second full [B, Q, K] mask next to the model's own.
_CHECK_ROWS = 1024


def _mask_equals(mask: torch.Tensor, padding: torch.Tensor, is_causal: bool) -> bool:
    """Whether mask [B, Q, K] == padding[:, None, :] (& the causal lower triangle)."""
    len_q, len_k = mask.shape[1], mask.shape[2]
    cols = torch.arange(len_k, device=mask.device)
    for start in range(0, len_q, _CHECK_ROWS):
        rows = torch.arange(start, min(start + _CHECK_ROWS, len_q), device=mask.device)
        expected = padding[:, None, :].expand(-1, rows.numel(), -1)
        if is_causal:
            expected = expected & (cols[None, :] <= rows[:, None])[None]
        if not torch.equal(mask[:, start:start + rows.numel()], expected):
            return False
    return True


def creative_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function (see the module docstring for what runs where).

    Args:
        query: [B, Hq, Nq, D]; key, value: [B, Hkv, Nk, D].
        attention_mask: None or the sdpa mask (bool [B, 1, Nq, Nk], True = attend).

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None): transformers' layout; no weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _state_of(module)

    def sdpa() -> tuple[torch.Tensor, None]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    len_q, len_k = query.shape[2], key.shape[2]
    if len_q == 1 < len_k and causal and dropout == 0.0 and \
            not any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux")):
        return _decode_step(module, state, query, key, value, attention_mask, scaling, sdpa)
    reason = None
    if len_q != len_k:
        reason = f"decode step: query length {len_q} != key length {len_k} (KV cache or cross-attention)"
    elif dropout > 0.0:
        reason = f"attention dropout {dropout} (training)"
    elif any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux")):
        reason = "position bias, softcap or attention sinks"
    else:
        parts = plain_mask_parts(attention_mask, query.shape[0], len_q, len_k, causal)
        if isinstance(parts, str):
            reason = parts
    if reason is not None:
        return _record_dense(state, reason, sdpa)
    mask_causal, padding = parts
    if hasattr(module, _DECODE_ATTR):
        getattr(module, _DECODE_ATTR).reset()  # a prefill starts a new cache
    out = state.attend(query, key, value, layout="HND", is_causal=mask_causal, scale=scaling,
                       key_padding_mask=padding)
    return out.transpose(1, 2).contiguous(), None


def _decode_step(module: torch.nn.Module, state: LayerState, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                 sdpa: Any) -> tuple[torch.Tensor, None]:
    """One cached decode row: decode-time KV-block sparsity (`DecodeState`) or, where it
    does not run, transformers' SDPA recorded as a "decode step" fallback with the reason."""
    parts = plain_mask_parts(attention_mask, query.shape[0], 1, key.shape[2], False)
    if isinstance(parts, str):
        return _record_dense(state, f"decode step: {parts}", sdpa)
    _, padding = parts
    decode = _decode_state_of(module)
    budget = _decode_budget(state)
    plan = decode.plan(key.shape[2], budget, key.device.type)
    if isinstance(plan, str):  # dense: transformers' own SDPA, exactly as without the plugin
        decode.record_dense(plan)
        return _record_dense(state, f"decode step: {plan}", sdpa)
    start = time.perf_counter()
    out, stats = decode.attend(query, key, value, budget=budget, scale=scaling, key_padding_mask=padding)
    # the layer's report counts the step as a sparse call on the decode backend
    state.last_s = state.current_s()
    state.last_stats = SparseStats(kept_fraction=stats.kept_fraction, backend=f"decode-{stats.backend}",
                                   num_blocks=stats.num_blocks * query.shape[0] * key.shape[1])
    state._record(state.last_stats, False)
    state._timer.add(time.perf_counter() - start)
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Attention layers: modules with ``is_causal`` and ``layer_idx`` attributes (every
    AttentionInterface-based attention class of transformers 5 has both)."""
    from transformers import PreTrainedModel

    return [(name, m) for name, m in model.named_modules()
            if not isinstance(m, PreTrainedModel) and hasattr(m, "is_causal") and hasattr(m, "layer_idx")]


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config of ``model`` and its sub-models (and their sub-configs)."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(seen.values())


@register_patch
class TransformersAttentionPatch(ModelPatch):
    """Any transformers ``PreTrainedModel`` whose attention uses ``AttentionInterface``.

    `install` registers ``creative_sparse``, gives every attention layer a `LayerState`
    and switches the model's attention implementation; `remove` restores every config's
    previous implementation and drops the states.

    Example:
        >>> import transformers, hf_creative_sparse as hcs
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16,
        ...                                                               vocab_size=50))
        >>> handle = hcs.enable_creative_sparse(model)     # doctest: +SKIP
        >>> model.config._attn_implementation              # doctest: +SKIP
        'creative_sparse'
    """

    family = "transformers"
    model_classes = ("PreTrainedModel",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._previous: list[tuple[Any, Any]] = []
        self._tagged: list[tuple[torch.nn.Module, Any]] = []

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        if not super().matches(model):
            return False
        can_set = getattr(type(model), "_can_set_attn_implementation", None)
        return bool(can_set()) if callable(can_set) else False

    def install(self) -> None:
        if self.installed:
            raise RuntimeError("TransformersAttentionPatch is already installed")
        register()
        modules = _attention_modules(self.model)
        if not modules:
            raise ValueError(f"{type(self.model).__name__} has no AttentionInterface attention layer "
                             "(no module with is_causal and layer_idx)")
        self._previous = [(cfg, cfg._attn_implementation_internal) for cfg in _configs(self.model)]
        for name, module in modules:
            self._tagged.append((module, getattr(module, _STATE_ATTR, None)))
            setattr(module, _STATE_ATTR, self.make_state(name))
            if not hasattr(module, _DECODE_ATTR):
                setattr(module, _DECODE_ATTR, DecodeState(DEFAULT_DECODE_CONFIG, layer_index=_layer_index(module)))
        try:
            self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except Exception:
            self.remove()
            raise
        self.installed = True

    def remove(self) -> None:
        for cfg, previous in self._previous:
            cfg._attn_implementation_internal = previous
        self._previous.clear()
        for module, previous in self._tagged:
            if previous is None:
                if hasattr(module, _STATE_ATTR):
                    delattr(module, _STATE_ATTR)
            else:
                setattr(module, _STATE_ATTR, previous)
            if hasattr(module, _DECODE_ATTR):
                delattr(module, _DECODE_ATTR)
        self._tagged.clear()
        self.installed = False
