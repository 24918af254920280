"""Ulysses context parallelism for the ``creative_sparse`` diffusers backend.

One concern: what changes when a layer's heads or keys are split over ranks.
`integrations.diffusers_backend` registers the backend and routes every call to a
`LayerState`; under a diffusers ``ContextParallelConfig`` it hands the call to
`ulysses_attention`, which runs diffusers' Ulysses template with this module's forward op.

* Ulysses (``ulysses_degree > 1``, also ``ulysses_anything``): diffusers' template
  exchanges q/k/v so that each rank holds ``Hq / world`` heads over the whole sequence; the
  forward op runs the sparse kernel on those heads. Per-head thresholds (calibrated
  ``topk`` / ``cdfthreshd`` / ..., any 1-D per-head tensor of the config) follow the rank's
  head range (`ulysses_head_range`, `shard_config`, `BackendLayer.for_heads`), and every
  estimate made during the call is made on those heads. Keys that every rank holds in full
  (Wan's unsplit text in the cross-attention) are attended once (`drop_replicated_keys`).
* Ring (``ring_degree > 1``, alone or with Ulysses) is refused with a ValueError that says
  to use Ulysses: composing it would need per-ring-step block masks and merged partial
  softmax including the coarse compensation terms, which are not built.

Example:
    >>> ulysses_head_range(12, 1, 2)
    (6, 12)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from ..ops.config import SparseAttentionConfig
from .state import LayerState

#: ``attend(layer_state, query, key, value, attn_mask, dropout_p, is_causal, scale,
#: enable_gqa) -> out``: one backend call on (B, S, H, D) tensors through a layer state.
AttendFn = Callable[..., torch.Tensor]

_RING_REFUSAL = (
    "creative_sparse does not compose with ring attention (ring_degree={ring}): ring attention would need "
    "per-ring-step block masks and merged partial softmax (with the coarse compensation terms), which are not "
    "built. Use Ulysses instead: ContextParallelConfig(ulysses_degree={world}) (each rank then runs the sparse "
    "kernel on its heads over the whole sequence)."
)


def ulysses_head_range(num_heads: int, rank: int, world: int) -> tuple[int, int]:
    """The q heads ``[start, stop)`` that Ulysses rank ``rank`` of ``world`` holds.

    diffusers' Ulysses template sends head group ``r`` (heads ``r*H/world`` to
    ``(r+1)*H/world``) to rank ``r``; "Ulysses anything" pads the heads to a multiple of
    ``world`` and the last rank drops the padding, so its range is shorter.

    Example:
        >>> ulysses_head_range(12, 1, 2), ulysses_head_range(30, 7, 8)
        ((6, 12), (28, 30))
    """
    for name, value in (("num_heads", num_heads), ("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_heads < 1 or world < 1:
        raise ValueError(f"num_heads and world must be >= 1, got num_heads={num_heads}, world={world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
    per_rank = -(-num_heads // world)
    start = min(rank * per_rank, num_heads)
    return start, min(start + per_rank, num_heads)


def shard_config(config: SparseAttentionConfig, start: int, stop: int, num_heads: int) -> SparseAttentionConfig:
    """``config`` for the q heads ``[start, stop)`` of ``num_heads``: every per-head 1-D
    tensor field (calibrated ``topk``, ``cdfthreshd``, ``simthreshd1``, ``pvthreshd``, and
    any other) is sliced to the range; scalars and one-element tensors apply to all heads.

    Raises:
        ValueError: a bad range, or a per-head tensor whose length is not ``num_heads``.

    Example:
        >>> cfg = SparseAttentionConfig(topk=torch.tensor([0.1, 0.2, 0.3, 0.4]))
        >>> shard_config(cfg, 2, 4, 4).topk
        tensor([0.3000, 0.4000])
    """
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    if not 0 <= start < stop <= num_heads:
        raise ValueError(f"head range must satisfy 0 <= start < stop <= num_heads, "
                         f"got [{start}, {stop}) of {num_heads}")
    if (start, stop) == (0, num_heads):
        return config
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 1:
            continue
        if value.numel() != num_heads:
            raise ValueError(f"{f.name} has {value.numel()} per-head values but the layer has {num_heads} q heads")
        changes[f.name] = value[start:stop].clone()
    return config.replace(**changes) if changes else config


class BackendLayer:
    """One attention module's `LayerState`, and the states of its head shards.

    Under Ulysses a rank attends over a head range of the layer; `for_heads` gives the
    state whose config is sliced to that range (same name, schedule, clock and options).
    ``heads`` is the module's q head count when known (needed under "Ulysses anything",
    where a rank's share does not tell the total).
    """

    def __init__(self, state: LayerState, heads: int | None = None) -> None:
        self.state = state
        self.heads = heads
        self.shards: dict[tuple[int, int], LayerState] = {}

    def total_heads(self) -> int | None:
        """The layer's q heads: the length of its config's per-head tensors, else ``heads``."""
        for f in dataclasses.fields(self.state.config):
            value = getattr(self.state.config, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
                return int(value.numel())
        return self.heads

    def for_heads(self, start: int, stop: int, num_heads: int) -> LayerState:
        """The state for q heads ``[start, stop)`` of ``num_heads``: the layer's own when its
        config has nothing per head (or the range is all heads), else the shard's."""
        shard = self.shards.get((start, stop))
        if shard is None:
            base = self.state
            config = shard_config(base.config, start, stop, num_heads)
            if config is base.config:
                return base
            shard = LayerState(base.name, config, schedule=base.schedule, clock=base.clock, options=base.options,
                               calibrated=base.calibrated)
            self.shards[(start, stop)] = shard
        return shard

    def active_state(self) -> LayerState:
        """The state that served this process's calls: its shard under Ulysses."""
        for shard in self.shards.values():
            return shard
        return self.state


def drop_replicated_keys(key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, world: int,
                         len_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values that every Ulysses rank held in full, as one copy.

    A model's context-parallel plan may leave the text unsplit (Wan: the cross-attention's
    keys are the same 512 text tokens on every rank); the Ulysses all-to-all then gathers
    ``world`` identical copies of them. Attending over identical copies gives the same
    softmax as over one, but a block-sparse budget would count, and might drop, whole
    copies, and a short text would no longer look short to the dense-fallback policy. So
    when the gathered (B, Sk, H, D) key and value are ``world`` identical chunks (checked
    exactly), the first chunk is kept (and the mask's matching part). Self-attention
    (Sk == Sq) is left alone.
    """
    len_k = key.shape[1]
    if world < 2 or len_k == len_q or len_k % world:
        return key, value, attn_mask
    chunk = len_k // world
    for x in (key, value):
        first = x[:, :chunk]
        if not all(torch.equal(first, x[:, i * chunk:(i + 1) * chunk]) for i in range(1, world)):
            return key, value, attn_mask
    if attn_mask is not None:
        first = attn_mask[..., :chunk]
        if not all(torch.equal(first, attn_mask[..., i * chunk:(i + 1) * chunk]) for i in range(1, world)):
            return key, value, attn_mask
        attn_mask = first
    return key[:, :chunk], value[:, :chunk], attn_mask


def _ulysses_forward_op(layer: BackendLayer, attend: AttendFn, ctx: Any, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
                        scale: float | None, enable_gqa: bool, return_lse: bool, _save_ctx: bool = True,
                        _parallel_config: Any = None) -> torch.Tensor:
    """The forward op diffusers' Ulysses template calls after its all-to-all (``layer`` and
    ``attend`` bound by `ulysses_attention`): q/k/v are (B, S, H_local, D), the whole
    sequence and this rank's heads."""
    if return_lse:
        raise ValueError("creative_sparse does not return the log-sum-exp to diffusers (return_lse=True)")
    cp = _parallel_config.context_parallel_config
    world, rank = int(cp.ulysses_degree), int(cp._ulysses_local_rank)
    key, value, attn_mask = drop_replicated_keys(key, value, attn_mask, world, query.shape[1])
    num_heads = layer.total_heads()
    if num_heads is None:
        if getattr(cp, "ulysses_anything", False):  # uneven shares; nothing per-head to slice either
            return attend(layer.state, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        num_heads = query.shape[2] * world
    start, stop = ulysses_head_range(num_heads, rank, world)
    if stop - start != query.shape[2]:
        raise ValueError(f"Ulysses rank {rank} of {world} holds {query.shape[2]} heads, expected heads "
                         f"[{start}, {stop}) of {num_heads}")
    return attend(layer.for_heads(start, stop, num_heads), query, key, value, attn_mask, dropout_p, is_causal,
                   scale, enable_gqa)


def _backward_op(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("creative_sparse is an inference backend: no backward pass (train with 'native')")


def ulysses_attention(layer: BackendLayer, attend: AttendFn, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
                      scale: float | None, enable_gqa: bool, parallel_config: Any) -> torch.Tensor:
    """One backend call under diffusers' context parallelism: Ulysses through diffusers'
    template with this module's forward op (``layer``'s head shard per rank); ring raises
    ValueError (see the module docstring)."""
    cp = parallel_config.context_parallel_config
    if int(cp.ring_degree) > 1:
        raise ValueError(_RING_REFUSAL.format(ring=cp.ring_degree, world=int(cp.ring_degree) * int(cp.ulysses_degree)))
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
        forward_op=functools.partial(_ulysses_forward_op, layer, attend), backward_op=_backward_op,
        _parallel_config=parallel_config)


__all__ = ["BackendLayer", "drop_replicated_keys", "shard_config", "ulysses_attention", "ulysses_head_range"]
