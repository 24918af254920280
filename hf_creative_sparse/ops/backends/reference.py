"""The reference backend: plain PyTorch, any device, dtype and head dim (the definition)."""

from __future__ import annotations

import torch

from ..dispatch import BackendResult
from ..inputs import AttentionInputs
from ..reference import reference_attention


class ReferenceBackend:
    """Blockwise PyTorch forward; supports every valid input, so `auto` never fails."""

    name = "reference"
    returns_lse = True  # docs/DESIGN.md "Partial softmax"

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        return None

    def run(self, inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: torch.Tensor) -> BackendResult:
        out, skipped, visited, lse = reference_attention(inp, block_mask, pvthreshd, return_lse=True)
        return BackendResult(out=out, pv_skipped=skipped, pv_visited=visited, lse=lse)


BACKEND = ReferenceBackend()
