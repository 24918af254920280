"""Drop-in names for SpargeAttn users (``spas_sage_attn``): same arguments, same meaning.

They run on the best available backend (CUDA kernel, FlexAttention, CPU kernel or the
reference) instead of refusing on machines without CUDA, and in full precision unless a
quantized mode is asked for elsewhere. Differences from SpargeAttn, each deliberate:

* the output keeps q's dtype (SpargeAttn returns float16 for float32 inputs;
  ``output_dtype`` is accepted and, as there, not used);
* any sequence length and head dim run (SpargeAttn asserts >= 128 tokens and D in {64, 128});
* ``attn_mask`` and ``dropout_p`` are refused with a clear error rather than ignored;
* ``return_sparsity`` reports 1 - kept / attendable blocks (exact under causal).
"""

from __future__ import annotations

import torch

from .config import SparseAttentionConfig
from .attention import block_sparse_attention, sparse_attention_inputs
from .inputs import attention_inputs
from .masks import check_block_mask, predict_from_inputs


def _refuse_unsupported(attn_mask: object, dropout_p: float, return_lse: bool) -> None:
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported (SpargeAttn ignores it); pass key padding through "
                         "hf_creative_sparse.sparse_attention(key_padding_mask=...)")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (inference only), got {dropout_p}")
    if return_lse:
        raise ValueError("return_lse is not supported by hf_creative_sparse's drop-in names")


def _meansim(q, k, v, *, is_causal, scale, smooth_k, simthreshd1, cdfthreshd, topk, pvthreshd, attention_sink,
             tensor_layout, return_sparsity, mask_id):
    inp = attention_inputs(q, k, v, layout=tensor_layout, is_causal=is_causal, scale=scale)
    cfg = SparseAttentionConfig(simthreshd1=simthreshd1, cdfthreshd=None if topk is not None else cdfthreshd, topk=topk,
                                pvthreshd=float(pvthreshd)
                                if not isinstance(pvthreshd, torch.Tensor) else pvthreshd,
                                attention_sink=attention_sink)
    if mask_id is not None:
        block_mask = check_block_mask(mask_id, inp, name="mask_id")
    else:
        with torch.no_grad():
            block_mask = predict_from_inputs(inp, simthreshd1=cfg.simthreshd1,
                                             cdfthreshd=cfg.cdfthreshd if topk is None else None, topk=topk,
                                             attention_sink=attention_sink, smooth_k=smooth_k)
    out, stats = sparse_attention_inputs(inp, cfg, block_mask=block_mask)
    out = inp.to_layout(out)
    return (out, stats.sparsity) if return_sparsity else out


def spas_sage2_attn_meansim_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, smooth_k=True,
                                 simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50, attention_sink=False,
                                 tensor_layout="HND", output_dtype=torch.float16, return_sparsity=False,
                                 return_lse=False, mask_id=None, topk=None):
    """SpargeAttn's ``spas_sage2_attn_meansim_cuda``: predicted block-sparse attention.

    ``mask_id`` (bool/int [B, H, ceil(Nq/128), ceil(Nk/64)]) replaces the prediction;
    ``topk`` switches from cdf to top-k selection. Returns the output, and with
    ``return_sparsity`` the skipped block fraction.

    Example:
        >>> import torch, hf_creative_sparse as hcs
        >>> q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
        >>> out, sparsity = hcs.spas_sage2_attn_meansim_cuda(q, k, v, return_sparsity=True)
        >>> out.shape
        torch.Size([1, 2, 256, 64])
    """
    _refuse_unsupported(attn_mask, dropout_p, return_lse)
    return _meansim(q, k, v, is_causal=is_causal, scale=scale, smooth_k=smooth_k, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd, attention_sink=attention_sink,
                    tensor_layout=tensor_layout, return_sparsity=return_sparsity, mask_id=mask_id)


def spas_sage_attn_meansim_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, smooth_k=True,
                                simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50, attention_sink=False,
                                tensor_layout="HND", output_dtype=torch.float16, return_sparsity=False,
                                return_lse=False, mask_id=None, topk=None):
    """SpargeAttn's ``spas_sage_attn_meansim_cuda`` (the SageAttention-1 variant there);
    here the same computation as `spas_sage2_attn_meansim_cuda`."""
    _refuse_unsupported(attn_mask, dropout_p, return_lse)
    return _meansim(q, k, v, is_causal=is_causal, scale=scale, smooth_k=smooth_k, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd, attention_sink=attention_sink,
                    tensor_layout=tensor_layout, return_sparsity=return_sparsity, mask_id=mask_id)


def block_sparse_sage2_attn_cuda(q, k, v, mask_id=None, dropout_p=0.0, scale=None, smooth_k=True, pvthreshd=50,
                                 attention_sink=False, tensor_layout="HND", output_dtype=torch.float16,
                                 return_sparsity=False, return_lse=False, is_causal=False):
    """SpargeAttn's ``block_sparse_sage2_attn_cuda``: attention over the user block map
    ``mask_id`` (bool/int [B, H, ceil(Nq/128), ceil(Nk/64)], non-zero = keep).

    ``attention_sink`` additionally keeps key block 0. ``smooth_k`` subtracts the mean key
    (over the sequence) before attention, as SpargeAttn does for its INT8 QK^T; softmax is
    invariant to it, so the output changes only by rounding.
    """
    _refuse_unsupported(None, dropout_p, return_lse)
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
    if mask_id is None:
        raise ValueError("mask_id is required: a bool/int block map [B, H, ceil(Nq/128), ceil(Nk/64)]")
    inp = attention_inputs(q, k, v, layout=tensor_layout, is_causal=is_causal, scale=scale)
    mask_id = check_block_mask(mask_id, inp, name="mask_id")
    if attention_sink:
        mask_id = mask_id.clone()
        mask_id[..., 0] = True
    if smooth_k:
        seq_dim = 2 if tensor_layout == "HND" else 1
        k = k - k.float().mean(dim=seq_dim, keepdim=True).to(k.dtype)
    result = block_sparse_attention(q, k, v, mask_id, layout=tensor_layout, is_causal=is_causal, scale=scale,
                                    pvthreshd=float(pvthreshd) if not isinstance(pvthreshd, torch.Tensor) else pvthreshd,
                                    return_stats=return_sparsity)
    if return_sparsity:
        out, stats = result
        return out, stats.sparsity
    return result
