"""Triton, when installed, and the checks every Triton kernel of the package shares.

CPU-only installs have no triton: the kernels' modules import it from here and fall back to
PyTorch when `kernel_unavailable_reason` says why a call cannot run.
"""

from __future__ import annotations

import torch

from .inputs import SUPPORTED_DTYPES

try:  # optional: CPU-only installs have no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: Largest head dim the kernels hold in one tile.
MAX_HEAD_DIM = 256


def kernel_unavailable_reason(kernel: str, q: torch.Tensor) -> str | None:
    """None when the Triton ``kernel`` (a name for messages) can take q [.., D], else why not."""
    if triton is None:
        return "triton is not installed"
    if not q.is_cuda:
        return f"the {kernel} kernel needs CUDA tensors, got {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the {kernel} kernel takes float16/bfloat16/float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the {kernel} kernel takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None
