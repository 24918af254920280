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
reports no skipped pairs. It returns each row's log-sum-exp (docs/DESIGN.md "Partial
softmax"), and `flex_pooled_attention` is the GPU path of coarse compensation: attention
over one pooled token per key block with a per-(query block, key block) bias.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
from typing import Any, Callable

import torch

from ..config import BLOCK_M, BLOCK_N
from ..dispatch import BackendResult
from ..inputs import AttentionInputs
from ..predict_cuda import mask_to_lut

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


def _pad_head_dim(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad the last dim to `padded_head_dim` (no score changes; the scale is the caller's)."""
    d = tensors[0].shape[-1]
    dp = padded_head_dim(d)
    return tensors if dp == d else tuple(torch.nn.functional.pad(t, (0, dp - d)) for t in tensors)


def _run_flex(fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, want_lse: bool,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse or None) of one FlexAttention call; the log-sum-exp (natural log, -inf for
    rows without a key) through ``return_aux`` where this torch has it, else ``return_lse``."""
    if not want_lse:
        return fn(q, k, v, **kwargs), None
    if _has_return_aux():
        out, aux = fn(q, k, v, return_aux=_flex_module().AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    return out, lse


@functools.lru_cache(maxsize=None)
def _has_return_aux() -> bool:
    """Whether this torch's flex_attention takes ``return_aux`` (``return_lse`` is deprecated
    there); looked up once: signature inspection costs tens of microseconds a call."""
    fa = _flex_module()
    return hasattr(fa, "AuxRequest") and "return_aux" in inspect.signature(fa.flex_attention).parameters


def _flex_block_sparse(inp: AttentionInputs, block_mask: torch.Tensor, compiled: bool,
                       want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v = _pad_head_dim(inp.q, inp.k, inp.v)
    bm = build_block_mask(inp, block_mask)
    opts = kernel_options(q.shape[-1], inp.dtype) if q.is_cuda else None
    with _recompile_room():
        out, lse = _run_flex(_flex_fn(compiled), q, k, v, want_lse, block_mask=bm, scale=inp.scale,
                             enable_gqa=inp.heads_q != inp.heads_kv, kernel_options=opts)
    d = inp.head_dim
    return (out[..., :d] if out.shape[-1] != d else out), lse


def flex_block_sparse(inp: AttentionInputs, block_mask: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
    """Exact attention over the kept blocks through FlexAttention; out HND [B, Hq, Nq, D].

    Head dims that are not powers of two are zero-padded (scores and the kept columns of
    the output are unchanged; the scale is the caller's). ``compiled=False`` runs the eager
    (math) path, used on CPU by the tests.
    """
    return _flex_block_sparse(inp, block_mask, compiled, want_lse=False)[0]


def flex_block_sparse_lse(inp: AttentionInputs, block_mask: torch.Tensor, *,
                          compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`flex_block_sparse` and each row's log-sum-exp: (out HND [B, Hq, Nq, D], lse float32
    [B, Hq, Nq], natural log over the row's usable keys, -inf for a row without any).
    torch's CPU compilation of FlexAttention cannot return the lse: use a CUDA device."""
    out, lse = _flex_block_sparse(inp, block_mask, compiled, want_lse=True)
    assert lse is not None
    return out, lse


def _check_pooled_args(q: object, pooled_k: object, pooled_v: object, bias: object, scale: object) -> float:
    for name, t in (("q", q), ("pooled_k", pooled_k), ("pooled_v", pooled_v), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, hq, nq, d = q.shape
    if pooled_k.shape != pooled_v.shape:
        raise ValueError(f"pooled_k and pooled_v must have the same shape [B, Hkv, Mk, D], got "
                         f"{tuple(pooled_k.shape)} and {tuple(pooled_v.shape)}")
    _, hkv, mk, dk = pooled_k.shape
    if pooled_k.shape[0] != b or dk != d or hkv < 1 or hq % hkv or mk < 1:
        raise ValueError(f"pooled_k must be [B, Hkv, Mk, D] = [{b}, a divisor of {hq}, >= 1, {d}], "
                         f"got {tuple(pooled_k.shape)}")
    mq = -(-nq // BLOCK_M)
    if (bias.dtype != torch.float32 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, hq)
            or tuple(bias.shape[2:]) != (mq, mk)):
        raise ValueError(f"bias must be float32 [B, Hq, ceil(Nq/{BLOCK_M}), Mk] = [{b}, {hq}, {mq}, {mk}] (B and Hq "
                         f"may be 1), got {bias.dtype} {tuple(bias.shape)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM} for FlexAttention, got {d}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    return float(scale)


def flex_pooled_attention(q: torch.Tensor, pooled_k: torch.Tensor, pooled_v: torch.Tensor, bias: torch.Tensor,
                          scale: float, *, compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over Mk pooled tokens with a per-query-block additive bias:
    the GPU path of coarse compensation (docs/DESIGN.md "Coarse compensation",
    `ops.compensation.pooled_attention`).

    Row r of query head h attends pooled token j with logit
    ``scale * q[b, h, r] . pooled_k[b, h // (Hq / Hkv), j] + bias[b, h, r // 128, j]``;
    ``bias`` -inf masks the token (kept blocks, empty blocks). One FlexAttention kernel with
    the bias as a ``score_mod`` (no [Nq, Mk] score tensor): its cost is about 1/64 of the
    dense Q K^T plus the pooled P V.

    Args:
        q: [B, Hq, Nq, D], any float dtype (the pooled operands are cast to it).
        pooled_k, pooled_v: [B, Hkv, Mk, D], Hq a multiple of Hkv (GQA).
        bias: float32 [B, Hq, ceil(Nq / 128), Mk] (B and Hq may be 1: shared), in logits
            (natural-log units).
        scale: softmax scale of q.k (not applied to the bias).
        compiled: FlexAttention compiled (default on CUDA) or eager (default on CPU:
            torch's CPU compilation cannot return the log-sum-exp).

    Returns:
        (out float32 [B, Hq, Nq, D], normalised over the row's unmasked pooled tokens, zeros
        for a row with none; lse float32 [B, Hq, Nq], natural log, -inf for such a row).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 200, 64)
        >>> pk, pv = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64)
        >>> bias = torch.zeros(1, 2, 2, 4)
        >>> out, lse = flex_pooled_attention(q, pk, pv, bias, 0.125)
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 200, 64]), torch.Size([1, 2, 200]))
    """
    scale = _check_pooled_args(q, pooled_k, pooled_v, bias, scale)
    if compiled is None:
        compiled = q.is_cuda
    d = q.shape[-1]
    qp, kp, vp = _pad_head_dim(q, pooled_k.to(q.dtype), pooled_v.to(q.dtype))
    bias = bias.expand(q.shape[0], q.shape[1], -1, -1).contiguous()  # indexed per (b, h) below

    def add_block_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx // BLOCK_M, kv_idx]

    with _recompile_room():
        out, lse = _run_flex(_flex_fn(compiled), qp, kp, vp, True, score_mod=add_block_bias, scale=scale,
                             enable_gqa=q.shape[1] != pooled_k.shape[1])
    assert lse is not None
    return out[..., :d].float(), lse.float()


class FlexBackend:
    """FlexAttention with a BlockMask: CUDA tensors, any float dtype, head dim <= 256."""

    name = "flex"
    returns_lse = True  # docs/DESIGN.md "Partial softmax"

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
        out, lse = flex_block_sparse_lse(inp, block_mask)
        return BackendResult(out=out, pv_skipped=0, pv_visited=0, lse=lse)


BACKEND = FlexBackend()

__all__ = ["BACKEND", "FlexBackend", "PV_EXACT_THRESHOLD", "build_block_mask", "flex_block_sparse",
           "flex_block_sparse_lse", "flex_pooled_attention", "kernel_options", "padded_head_dim"]
