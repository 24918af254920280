"""The flex backend: PyTorch FlexAttention (compiled Triton) fed the block mask as a
`BlockMask` built from the kept-block lists (`BlockMask.from_kv_blocks`, 128x64 blocks).

It gives GPU users real block-sparse speed with no compiled extension and is the bar the
`cuda` backend must clear. Blocks are split into "full" ones (every element usable: no
mask_mod evaluated) and "partial" ones (the causal diagonal, blocks holding padded keys),
where a ``mask_mod`` applies the causal and key-padding rules element-wise. Sequence ends
that are not multiples of the block size are masked by FlexAttention itself.

FlexAttention cannot do the stage-2 pv skip, so this backend refuses heads whose
``pvthreshd`` is finite and small enough to change the result beyond 16-bit rounding
(`PV_EXACT_THRESHOLD`), and otherwise computes exact attention over the kept blocks and
reports no skipped pairs.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable

import torch

from ..config import BLOCK_M, BLOCK_N
from .dispatch import BackendResult
from .inputs import AttentionInputs
from .predict_cuda import mask_to_lut

#: A skipped block's weights are below exp(-pvthreshd) of the row's largest; from about 20
#: on (exp(-20) ~ 2e-9) the skip is far under bf16/fp16 rounding, so exact attention is a
#: faithful answer and the flex backend may run it.
PV_EXACT_THRESHOLD = 20.0

#: Triton tile sizes (BLOCK_M, BLOCK_N, num_warps, num_stages) per (16-bit?, head-dim bound).
#: FlexAttention needs the sparse block sizes (128, 64) to be multiples of the tiles; the
#: H100 defaults for D64 use BLOCK_N=128, which does not divide 64, hence our own table.
_TILES_16BIT = ((64, (128, 64, 4, 3)), (128, (128, 64, 8, 3)), (256, (64, 32, 4, 3)))
_TILES_FP32 = ((64, (128, 32, 4, 3)), (128, (64, 32, 4, 3)), (256, (32, 32, 4, 3)))
#: Head dims FlexAttention's Triton kernel takes as they are (powers of two from 16).
_NATIVE_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = 256

_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}
_COMPILE_LOCK = threading.Lock()


def _flex_module():
    from torch.nn.attention import flex_attention as fa

    return fa


def flex_available_reason() -> str | None:
    """None when this torch has FlexAttention with `BlockMask.from_kv_blocks`, else why not."""
    try:
        fa = _flex_module()
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention ({exc}); needs torch >= 2.5"
    if not hasattr(fa.BlockMask, "from_kv_blocks"):
        return f"torch {torch.__version__} has no BlockMask.from_kv_blocks; needs torch >= 2.5"
    return None


def kernel_options(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Triton tile sizes for FlexAttention that divide the 128x64 sparse blocks."""
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    for bound, (bm, bn, warps, stages) in table:
        if head_dim <= bound:
            return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM} for the flex backend, got {head_dim}")


def padded_head_dim(head_dim: int) -> int:
    """The smallest head dim FlexAttention takes natively that is >= ``head_dim``."""
    for d in _NATIVE_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM} for the flex backend, got {head_dim}")


def _partial_blocks(inp: AttentionInputs) -> torch.Tensor:
    """bool [B, 1, Mq, Mk]: blocks where some element needs the mask_mod (causal diagonal,
    padded keys). Other kept blocks are 'full' and skip the mask_mod entirely."""
    mq, mk, dev = inp.num_q_blocks, inp.num_k_blocks, inp.device
    partial = torch.zeros(inp.batch, 1, mq, mk, dtype=torch.bool, device=dev)
    if inp.is_causal:
        row_lo = torch.arange(mq, device=dev) * BLOCK_M
        col_hi = torch.arange(mk, device=dev) * BLOCK_N + BLOCK_N - 1
        partial = partial | (col_hi[None, :] > row_lo[:, None])[None, None]
    kpm = inp.key_padding_mask
    if kpm is not None:
        pad = mk * BLOCK_N - inp.len_k
        padded = torch.nn.functional.pad(~kpm, (0, pad), value=False).view(inp.batch, mk, BLOCK_N).any(-1)
        partial = partial | padded[:, None, None, :]
    return partial


def _mask_mod(inp: AttentionInputs) -> Callable | None:
    kpm = inp.key_padding_mask
    if inp.is_causal and kpm is not None:
        def causal_padded(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & kpm[b, kv_idx]
        return causal_padded
    if inp.is_causal:
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
        return causal
    if kpm is not None:
        def padded(b, h, q_idx, kv_idx):
            return kpm[b, kv_idx]
        return padded
    return None


def build_block_mask(inp: AttentionInputs, block_mask: torch.Tensor) -> Any:
    """A FlexAttention `BlockMask` (128x64 blocks) equivalent to ``block_mask``
    (bool [B, Hq, Mq, Mk], restricted to attendable blocks) under ``inp``'s causal and
    key-padding rules. Without gradients only the forward's kv lists are built."""
    fa = _flex_module()
    partial = block_mask & _partial_blocks(inp)
    full = block_mask & ~partial
    kv_num, kv_idx = mask_to_lut(partial)
    full_num, full_idx = mask_to_lut(full)
    kwargs: dict[str, Any] = dict(BLOCK_SIZE=(BLOCK_M, BLOCK_N), mask_mod=_mask_mod(inp),
                                  seq_lengths=(inp.len_q, inp.len_k))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, inp.k, inp.v))
    if not needs_grad and "compute_q_blocks" in inspect.signature(fa.BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # the backward's transposed lists are not needed
    return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


#: Each (shape, dtype, mask kind) compiles its own kernel; a model or a benchmark meets
#: more of them than dynamo's default recompile limit (8), past which it would silently
#: run the eager path (materialising scores). Raised, never lowered, while flex runs.
_RECOMPILE_LIMIT = 128


@contextlib.contextmanager
def _recompile_room():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    current = getattr(cfg, name, _RECOMPILE_LIMIT)
    if current >= _RECOMPILE_LIMIT or torch.compiler.is_compiling():
        yield
        return
    with cfg.patch(**{name: _RECOMPILE_LIMIT}):
        yield


def _flex_fn(compiled: bool) -> Callable[..., torch.Tensor]:
    fa = _flex_module()
    if not compiled:
        return fa.flex_attention
    with _COMPILE_LOCK:
        if "fwd" not in _COMPILED:
            _COMPILED["fwd"] = torch.compile(fa.flex_attention, dynamic=False)
        return _COMPILED["fwd"]


def flex_block_sparse(inp: AttentionInputs, block_mask: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
    """Exact attention over the kept blocks through FlexAttention; out HND [B, Hq, Nq, D].

    Head dims that are not powers of two are zero-padded (scores and the kept columns of
    the output are unchanged; the scale is the caller's). ``compiled=False`` runs the eager
    (math) path, used on CPU by the tests.
    """
    q, k, v = inp.q, inp.k, inp.v
    d = inp.head_dim
    dp = padded_head_dim(d)
    if dp != d:
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    bm = build_block_mask(inp, block_mask)
    opts = kernel_options(dp, inp.dtype) if q.is_cuda else None
    with _recompile_room():
        out = _flex_fn(compiled)(q, k, v, block_mask=bm, scale=inp.scale,
                                 enable_gqa=inp.heads_q != inp.heads_kv, kernel_options=opts)
    return out[..., :d] if dp != d else out


class FlexBackend:
    """FlexAttention with a BlockMask: CUDA tensors, any float dtype, head dim <= 256."""

    name = "flex"

    def unavailable_reason(self) -> str | None:
        reason = flex_available_reason()
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "FlexAttention's compiled kernels need a CUDA GPU (CPU inputs use the cpu backend)"
        return None

    def unsupported_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        if not inp.q.is_cuda:
            return "the flex backend runs CUDA tensors only (CPU inputs use the cpu backend)"
        if inp.head_dim > MAX_HEAD_DIM:
            return f"head_dim {inp.head_dim} > {MAX_HEAD_DIM} is not supported by FlexAttention's kernels"
        if pvthreshd is not None and bool((pvthreshd < PV_EXACT_THRESHOLD).any()):  # inf never is
            low = float(pvthreshd.min())
            return (f"FlexAttention cannot do the pv-threshold skip, and pvthreshd={low:g} < "
                    f"{PV_EXACT_THRESHOLD:g} changes results beyond 16-bit rounding")
        return None

    def run(self, inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: torch.Tensor) -> BackendResult:
        return BackendResult(out=flex_block_sparse(inp, block_mask), pv_skipped=0, pv_visited=0)


BACKEND = FlexBackend()

__all__ = ["BACKEND", "FlexBackend", "PV_EXACT_THRESHOLD", "build_block_mask", "flex_block_sparse",
           "kernel_options", "padded_head_dim"]
