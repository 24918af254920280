"""Dense attention through torch SDPA with the same conventions as the sparse ops.

Used as the fallback where sparsity cannot pay, and by tests as the dense baseline.
Rows with no attendable key return zeros (SDPA alone would return NaN for them).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .inputs import AttentionInputs


def _row_has_key(inp: AttentionInputs) -> torch.Tensor | None:
    """bool [B, 1, Nq, 1], or None when every row has a key."""
    kpm = inp.key_padding_mask
    if kpm is None:
        return None
    if inp.is_causal:
        # row r has a key iff some unpadded key index <= r
        first_key = torch.where(kpm.any(-1), kpm.float().argmax(-1), torch.full_like(kpm[:, 0], inp.len_k, dtype=torch.long))
        rows = torch.arange(inp.len_q, device=inp.device)
        has = rows[None, :] >= first_key[:, None]
    else:
        has = kpm.any(-1, keepdim=True).expand(inp.batch, inp.len_q)
    return has[:, None, :, None]


#: None until tried; then whether SDPA's cuDNN kernel can be called directly here.
_CUDNN_DIRECT_OK: bool | None = None
#: The cuDNN attention op per CUDA device index, or None off Hopper; looked up once.
_CUDNN_OPS: dict[int, Callable[..., Any] | None] = {}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_UNSET = object()


def _cudnn_op(index: int) -> Callable[..., Any] | None:
    """The op on device ``index``: torch's generated binding where it exists (on an H200
    ~2.5 us a call faster than ``torch.ops.aten``'s overload, which converts its arguments
    through the schema), else that overload; None off compute capability 9.0."""
    op = _CUDNN_OPS.get(index, _UNSET)
    if op is _UNSET:
        op = getattr(torch, "_scaled_dot_product_cudnn_attention", None)
        if op is None:
            packet = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
            op = packet.default if packet is not None else None
        if op is not None and torch.cuda.get_device_capability(index) != (9, 0):
            op = None
        _CUDNN_OPS[index] = op
    return op


def cudnn_direct_op(q: torch.Tensor, k: torch.Tensor) -> Callable[..., Any] | None:
    """SDPA's cuDNN attention op when a direct call suits q and k (HND), else None.

    On Hopper cuDNN is the fastest dense kernel (1.4x torch's flash at GPT-2 sizes), but
    `F.scaled_dot_product_attention` may pick another backend, and forcing cuDNN through
    the `sdpa_kernel` context manager costs ~60 us a call, as much as a short attention.
    Only for fp16/bf16 CUDA tensors of equal head counts, head dim <= 128 (a multiple of
    8), on compute capability 9.0. Reads only dtype, shapes and device, so the policy
    memoizes it with its decision; `run_cudnn_direct` checks the per-call conditions.
    """
    if not q.is_cuda or q.dtype not in _HALF_DTYPES or q.shape[1] != k.shape[1]:
        return None
    d = q.shape[-1]
    return None if d > 128 or d % 8 else _cudnn_op(q.get_device())


def run_cudnn_direct(op: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                     scale: float) -> torch.Tensor | None:
    """``op`` (from `cudnn_direct_op`) on unmasked q/k/v, or None when autograd records
    q or the direct call is off here (any failure turns it off: SDPA serves instead)."""
    global _CUDNN_DIRECT_OK
    if _CUDNN_DIRECT_OK is False or q.requires_grad and torch.is_grad_enabled():
        return None
    try:
        out = op(q, k, v, None, False, 0.0, is_causal, False, scale=scale)[0]
    except Exception:  # an older signature or a cuDNN without this graph
        _CUDNN_DIRECT_OK = False
        return None
    _CUDNN_DIRECT_OK = True
    return out


def dense_attention_with(op: Callable[..., Any] | None, inp: AttentionInputs) -> torch.Tensor:
    """`dense_attention` given ``op = cudnn_direct_op(inp.q, inp.k)`` (memoized by the
    caller): contiguous unmasked inputs go straight to it, anything else to `dense_attention`."""
    q, k, v = inp.q, inp.k, inp.v
    if (op is not None and inp.key_padding_mask is None and q.is_contiguous() and k.is_contiguous()
            and v.is_contiguous()):
        out = run_cudnn_direct(op, q, k, v, inp.is_causal, inp.scale)
        if out is not None:
            return out
    return dense_attention(inp)


def dense_attention(inp: AttentionInputs) -> torch.Tensor:
    """Dense SDPA of validated inputs; returns HND [B, Hq, Nq, D]."""
    q, k, v = inp.q, inp.k, inp.v
    cuda = q.is_cuda
    if cuda and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        # strided views (NHD layouts, recorded slices) can push SDPA onto its math kernel,
        # which materialises the N x N matrix; a copy is far cheaper
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_q != heads_kv:
        group = heads_q // heads_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    kpm = inp.key_padding_mask
    if kpm is None:
        op = cudnn_direct_op(q, k)
        out = run_cudnn_direct(op, q, k, v, inp.is_causal, inp.scale) if op is not None else None
        if out is not None:
            return out
        return F.scaled_dot_product_attention(q, k, v, is_causal=inp.is_causal, scale=inp.scale)
    mask = kpm[:, None, None, :]
    if inp.is_causal:
        causal = torch.ones(inp.len_q, inp.len_k, dtype=torch.bool, device=inp.device).tril()
        mask = mask & causal[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=inp.scale)
    has = _row_has_key(inp)
    return out if has is None else torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device))
