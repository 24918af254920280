"""transformers glue: ``attn_implementation="creative_sparse_entmax"``, alpha-entmax attention.

For models trained or fine-tuned with entmax attention (softmax replaced by alpha-entmax:
exact zeros, adaptive sparsity; `hf_creative_sparse.ops.entmax`). Every model whose
attention goes through ``AttentionInterface`` can use it:

    >>> from hf_creative_sparse.patches import transformers_entmax     # doctest: +SKIP
    >>> transformers_entmax.register()                                 # doctest: +SKIP
    >>> model.set_attn_implementation("creative_sparse_entmax")        # doctest: +SKIP
    >>> model.config.entmax_alpha = 1.5      # or per q head: [1.5, 1.3, ...]   # doctest: +SKIP
    >>> model(input_ids, entmax_alpha=1.3)   # a per-call alpha wins over the config  # doctest: +SKIP

alpha comes from the call (``entmax_alpha=`` keyword, which transformers passes down to
the attention function), else the attention module's config (``entmax_alpha``), else
`DEFAULT_ALPHA`. Unlike ``creative_sparse`` this is a different attention function, not an
approximation of softmax: nothing falls back to SDPA. Masks must be "causal (or not) and
key padding"; with a KV cache (query shorter than the keys) the queries are the last rows
of a causal square, which is how the call runs (queries placed at the end of a zero-padded
query block; their rows are exact). Attention dropout and other masks raise ValueError.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_creative_sparse.ops.entmax import entmax_attention

#: The name under which the attention function is registered.
ATTN_IMPLEMENTATION = "creative_sparse_entmax"
#: alpha when neither the call nor the config gives one (AdaSplash's and most papers' choice).
DEFAULT_ALPHA = 1.5

_registered = False


def register() -> None:
    """Register ``creative_sparse_entmax`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (idempotent; imports transformers).

    Example:
        >>> register()
        >>> from transformers import AttentionInterface
        >>> "creative_sparse_entmax" in AttentionInterface._global_mapping
        True
    """
    global _registered
    if _registered:
        return
    from .transformers_attention import register_attention_function

    register_attention_function(ATTN_IMPLEMENTATION, entmax_attention_forward)
    _registered = True


def resolve_alpha(module: torch.nn.Module, call_alpha: Any) -> float | torch.Tensor:
    """alpha of this call: the call's ``entmax_alpha``, else ``module.config.entmax_alpha``,
    else `DEFAULT_ALPHA`. Lists become per-head tensors (validated by the op)."""
    alpha = call_alpha
    if alpha is None:
        alpha = getattr(getattr(module, "config", None), "entmax_alpha", None)
    if alpha is None:
        return DEFAULT_ALPHA
    if isinstance(alpha, (list, tuple)):
        return torch.tensor([float(a) for a in alpha], dtype=torch.float32)
    return alpha


def mask_parts(attention_mask: torch.Tensor | None, batch: int, len_q: int, len_k: int,
               causal: bool) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, key_padding_mask bool [B, len_k] or None) of an sdpa-style mask; the
    causal pattern is bottom-right aligned (query row i is key position len_k - len_q + i).

    Raises:
        ValueError: a mask that is not "causal (or not) + key padding".

    Example:
        >>> mask_parts(torch.ones(1, 1, 2, 4, dtype=torch.bool).tril(2), 1, 2, 4, True)
        (True, None)
    """
    if attention_mask is None:
        return causal, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        raise ValueError(f"creative_sparse_entmax needs a bool attention mask, got "
                         f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, batch) \
            or tuple(attention_mask.shape[2:]) != (len_q, len_k):
        raise ValueError(f"creative_sparse_entmax: mask shape {tuple(attention_mask.shape)} is not "
                         f"[B, 1, {len_q}, {len_k}]")
    mask = attention_mask[:, 0].expand(batch, len_q, len_k)
    padding = mask.any(dim=1)  # [B, len_k]
    rows = torch.arange(len_q, device=mask.device) + (len_k - len_q)
    cols = torch.arange(len_k, device=mask.device)
    lower = (cols[None, :] <= rows[:, None])[None]
    for is_causal in ((True, False) if causal else (False, True)):
        expected = padding[:, None, :] & lower if is_causal else padding[:, None, :].expand(-1, len_q, -1)
        if torch.equal(mask, expected):
            return is_causal, (None if bool(padding.all()) else padding)
    raise ValueError("creative_sparse_entmax supports causal (or full) attention with key padding only; "
                     "this mask is a sliding window, chunked, packed or custom mask")


def entmax_attention_forward(
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
    """The ``AttentionInterface`` function: alpha-entmax attention (module docstring).

    Args:
        query: [B, Hq, Nq, D]; key, value: [B, Hkv, Nk, D].
        attention_mask: None or the sdpa mask (bool [B, 1, Nq, Nk], True = attend).

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None).
    """
    if dropout > 0.0:
        raise ValueError(f"creative_sparse_entmax has no attention dropout (got {dropout}); set the model's "
                         "attention dropout to 0 or call model.eval()")
    for name in ("position_bias", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"creative_sparse_entmax does not support {name}")
    alpha = resolve_alpha(module, kwargs.get("entmax_alpha"))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    batch, len_q, len_k = query.shape[0], query.shape[2], key.shape[2]
    mask_causal, padding = mask_parts(attention_mask, batch, len_q, len_k, causal)
    if len_q > len_k:
        raise ValueError(f"creative_sparse_entmax: query length {len_q} exceeds key length {len_k}")
    if mask_causal and len_q == 1:  # one decode step sees every key: nothing to mask
        mask_causal = False
    if mask_causal and len_q != len_k:
        # Rows of a bottom-right causal pattern = the last rows of a top-left causal square.
        q_full = query.new_zeros(batch, query.shape[1], len_k, query.shape[3])
        q_full[:, :, len_k - len_q:] = query
        out = entmax_attention(q_full, key, value, alpha, is_causal=True, scale=scaling,
                               key_padding_mask=padding)[:, :, len_k - len_q:]
    else:
        out = entmax_attention(query, key, value, alpha, is_causal=mask_causal, scale=scaling,
                               key_padding_mask=padding)
    return out.transpose(1, 2).contiguous(), None
