"""K(s) for mixture-of-experts models: how many experts each token is routed to.

transformers 5 MoE routers (Mixtral, Qwen2-MoE, OLMoE, ...) read ``self.top_k`` on every
forward (``torch.topk(router_probs, self.top_k)``) and the experts accept any number of
indices per token, so setting ``top_k`` between forward passes changes the experts per
token for the next step without touching weights. `ExpertRouting` finds those modules,
sets K and restores the original value exactly.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    ...     vocab_size=50)
    >>> routing = ExpertRouting.for_model(transformers.MixtralForCausalLM(cfg))
    >>> routing.num_experts, routing.default_k
    (4, 2)
    >>> with routing.use(3):
    ...     routing.current_k()
    3
    >>> routing.current_k()
    2
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def moe_layout(model: Any) -> tuple[int, int] | None:
    """(E, K0): number of experts and default experts per token from a model's config (or
    its ``text_config``), or None for a dense model."""
    cfg = getattr(model, "config", model)
    for candidate in (cfg, getattr(cfg, "text_config", None)):
        if candidate is None:
            continue
        per_tok = getattr(candidate, "num_experts_per_tok", None)
        total = getattr(candidate, "num_local_experts", None) or getattr(candidate, "num_experts", None)
        if isinstance(per_tok, int) and isinstance(total, int) and per_tok >= 1 and total >= per_tok:
            return total, per_tok
    return None


def _is_router(module: torch.nn.Module, num_experts: int) -> bool:
    """A module that routes to ``top_k`` of ``num_experts`` experts (a router, or an MoE
    block that keeps its own copy of top_k next to a ``gate`` router)."""
    if isinstance(getattr(module, "top_k", None), bool) or not isinstance(getattr(module, "top_k", None), int):
        return False
    own = getattr(module, "num_experts", None) or getattr(module, "num_local_experts", None)
    gate = getattr(module, "gate", None)
    gate_total = getattr(gate, "num_experts", None) if gate is not None else None
    return own == num_experts or gate_total == num_experts


class ExpertRouting:
    """The router modules of one MoE model and their original ``top_k``.

    Args:
        model: the MoE model.
        num_experts: E; default_k: K0 (the config's ``num_experts_per_tok``).
    """

    def __init__(self, model: torch.nn.Module, num_experts: int, default_k: int) -> None:
        self.model = model
        self.num_experts = num_experts
        self.default_k = default_k
        self.routers = [m for m in model.modules() if _is_router(m, num_experts)]
        if not self.routers:
            raise ValueError(f"{type(model).__name__} declares {num_experts} experts but has no router module "
                             "with a top_k attribute")
        self._original = [m.top_k for m in self.routers]

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "ExpertRouting | None":
        """The routing of ``model``, or None for a dense model."""
        layout = moe_layout(model)
        if layout is None:
            return None
        return cls(model, *layout)

    def current_k(self) -> int:
        """The experts per token the routers use now (the first router's)."""
        return int(self.routers[0].top_k)

    def set(self, k: int) -> None:
        """Route every token to ``k`` experts (an int in [1, E]) from the next forward on."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an int in [1, {self.num_experts}], got {k!r}")
        for m in self.routers:
            m.top_k = k

    def restore(self) -> None:
        """Put back the ``top_k`` each router had when this object was made."""
        for m, k in zip(self.routers, self._original):
            m.top_k = k

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator[None]:
        """``with routing.use(k):`` route to ``k`` experts inside the block, then restore
        the values from before the block."""
        before = [m.top_k for m in self.routers]
        self.set(k)
        try:
            yield
        finally:
            for m, value in zip(self.routers, before):
                m.top_k = value
