"""Public attention ops: `sparse_attention` (predicted mask) and `block_sparse_attention`
(user mask), with the dense-fallback policy and `SparseStats`."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ..config import SparseAttentionConfig, SparseStats, _check_threshold
from .dense import cudnn_direct_op, dense_attention, dense_attention_with
from .dispatch import BACKEND_NAMES, choose_backend
from .gpu_policy import max_useful_kept_fraction, skip_prediction_reason
from .inputs import AttentionInputs, attention_inputs, per_head
from .masks import check_block_mask, kept_fraction, predict_from_inputs


#: `sparse_attention`'s config when no threshold is given; never handed out (the ops read a
#: config and keep nothing of it), so sharing it is safe.
_DEFAULT_CONFIG = SparseAttentionConfig()


def resolve_config(config: SparseAttentionConfig | None, **overrides: Any) -> SparseAttentionConfig:
    """``config`` (default: `SparseAttentionConfig()`) with the non-None ``overrides`` applied
    and validated. Setting ``topk`` switches from cdf to top-k selection."""
    if config is not None and not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    base = config if config is not None else SparseAttentionConfig()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**changes) if changes else base


def _run_sparse(inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: Any, backend: str,
                predicted: float, total: int) -> tuple[torch.Tensor, SparseStats]:
    pv = per_head("pvthreshd", pvthreshd, inp.heads_q, inp.device)
    chosen = choose_backend(backend, inp, pv)
    result = chosen.run(inp, block_mask, pv)
    stats = SparseStats(
        kept_fraction=predicted, predicted_kept_fraction=predicted, backend=chosen.name,
        pv_skipped_fraction=(result.pv_skipped / result.pv_visited) if result.pv_visited else 0.0,
        num_blocks=total, block_mask=block_mask,
    )
    return result.out, stats


def _dense(inp: AttentionInputs, reason: str, predicted: float | None, total: int,
           block_mask: torch.Tensor | None) -> tuple[torch.Tensor, SparseStats]:
    stats = SparseStats(kept_fraction=1.0, backend="sdpa", predicted_kept_fraction=predicted,
                        fallback_reason=reason, num_blocks=total, block_mask=block_mask)
    return dense_attention(inp), stats


class EarlyFallback(NamedTuple):
    """A dense run decided before any mask prediction: why, and the direct cuDNN op for
    these inputs (`dense.cudnn_direct_op`; None where it does not apply)."""

    reason: str
    cudnn_op: Callable[..., Any] | None


#: Upper bound on `early_fallback`'s memo (cleared when full): one entry per (policy,
#: shape, dtype, device, causal, mask uses), a handful in a real model.
EARLY_FALLBACK_CACHE_SIZE = 1024
_EARLY_FALLBACK: dict[tuple, EarlyFallback | None] = {}
_MISSING = object()


def early_fallback(inp: AttentionInputs, cfg: SparseAttentionConfig, mask_uses: int = 1,
                   predicting: bool = True) -> EarlyFallback | None:
    """Whether the call runs dense before any mask prediction (``backend="sdpa"``, a short
    sequence, or on CUDA the cost model's "prediction cannot pay"), or None.

    Memoized: a dense fallback on the GPU serves attentions of tens of microseconds, where
    recomputing the policy from `AttentionInputs` properties cost a sizeable share. The key
    holds everything the decision reads: the config's ``backend`` and ``min_seq_len`` (by
    value, so a mutated config is not served a stale entry), the q/k shapes, dtype,
    device, causality, ``mask_uses`` and ``predicting`` (False when a block mask is given).
    """
    q = inp.q
    key = (cfg.backend, cfg.min_seq_len, q.shape, inp.k.shape, q.dtype, q.device, inp.is_causal, mask_uses,
           predicting)
    hit = _EARLY_FALLBACK.get(key, _MISSING)
    if hit is _MISSING:
        reason = _early_fallback_reason(inp, cfg, mask_uses, predicting)
        hit = None if reason is None else EarlyFallback(reason, cudnn_direct_op(q, inp.k))
        if len(_EARLY_FALLBACK) >= EARLY_FALLBACK_CACHE_SIZE:
            _EARLY_FALLBACK.clear()
        _EARLY_FALLBACK[key] = hit
    return hit  # type: ignore[return-value]


def _early_fallback_reason(inp: AttentionInputs, cfg: SparseAttentionConfig, mask_uses: int,
                           predicting: bool) -> str | None:
    """`early_fallback`'s reason, computed afresh."""
    if cfg.backend == "sdpa":
        return "backend='sdpa' requested"
    if cfg.backend != "auto":
        return None
    if inp.len_k < cfg.min_seq_len:
        return f"short sequence: len_k={inp.len_k} < min_seq_len={cfg.min_seq_len}"
    if predicting and inp.q.is_cuda:  # cost model: ops/gpu_policy.py
        return skip_prediction_reason(inp, mask_uses)
    return None


def sparse_attention_inputs(inp: AttentionInputs, cfg: SparseAttentionConfig,
                            block_mask: torch.Tensor | None = None,
                            mask_uses: int = 1) -> tuple[torch.Tensor, SparseStats]:
    """The policy and dispatch of `sparse_attention` on validated inputs (HND output).

    ``block_mask`` (already validated) replaces the prediction, e.g. a cached mask reused
    across denoising steps; ``mask_uses`` says how many calls a predicted mask will serve
    (the GPU cost model shares the prediction's cost among them).
    """
    early = early_fallback(inp, cfg, mask_uses, block_mask is None)
    if early is not None:  # the hot dense path: as little Python as possible before the launch
        reason, op = early
        return dense_attention_with(op, inp), SparseStats(kept_fraction=1.0, backend="sdpa", fallback_reason=reason)
    policy = cfg.backend == "auto"
    gpu_policy = policy and inp.q.is_cuda
    with torch.no_grad():
        if block_mask is None:
            block_mask = predict_from_inputs(
                inp, simthreshd1=cfg.simthreshd1, cdfthreshd=None if cfg.topk is not None else cfg.cdfthreshd,
                topk=cfg.topk, attention_sink=cfg.attention_sink, dense_prefix=cfg.dense_prefix,
                dense_suffix=cfg.dense_suffix)
        predicted, total = kept_fraction(block_mask, inp)
    if policy and predicted > cfg.max_kept_fraction:
        return _dense(inp, f"low predicted sparsity: kept {predicted:.3f} > max_kept_fraction={cfg.max_kept_fraction}",
                      predicted, total, block_mask)
    if gpu_policy and predicted > (limit := max_useful_kept_fraction(inp)):
        return _dense(inp, f"sparsity cannot pay on the GPU: kept {predicted:.3f} > {limit:.3f}, the break-even "
                      "fraction for this size", predicted, total, block_mask)
    return _run_sparse(inp, block_mask, cfg.pvthreshd, cfg.backend, predicted, total)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "HND",
    is_causal: bool = False,
    scale: float | None = None,
    simthreshd1: float | torch.Tensor | None = None,
    cdfthreshd: float | torch.Tensor | None = None,
    topk: float | torch.Tensor | None = None,
    pvthreshd: float | torch.Tensor | None = None,
    attention_sink: bool | None = None,
    dense_prefix: int | None = None,
    dense_suffix: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
    return_stats: bool = False,
    config: SparseAttentionConfig | None = None,
    min_seq_len: int | None = None,
    max_kept_fraction: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SparseStats]:
    """Training-free block-sparse attention (SpargeAttn): predict the block mask, then attend
    only over kept blocks with the pv-threshold skip.

    Threshold arguments left as None come from ``config`` (default
    `SparseAttentionConfig()`). With ``backend="auto"`` the policy runs dense SDPA for
    sequences shorter than ``min_seq_len`` or when the predicted kept fraction exceeds
    ``max_kept_fraction``, and says so in the stats; a named backend always runs sparse.

    Args:
        q: [B, Hq, Nq, D] ("HND") or [B, Nq, Hq, D] ("NHD"); float32/float16/bfloat16.
        k, v: [B, Hkv, Nk, D] (or NHD); Hq must be a multiple of Hkv.
        is_causal: top-left aligned causal mask (needs Nq == Nk).
        key_padding_mask: bool [B, Nk], True = attend.
        return_stats: also return a `SparseStats`.

    Returns:
        The output in q's layout and dtype, and the stats when asked.

    NaN in q/k/v propagates to the affected rows as in SDPA; rows with no attendable key
    return zeros.

    Example:
        >>> import torch, hf_creative_sparse as hcs
        >>> q, k, v = (torch.randn(1, 2, 512, 64) for _ in range(3))
        >>> out, stats = hcs.sparse_attention(q, k, v, topk=0.5, min_seq_len=0, return_stats=True)
        >>> out.shape, stats.kept_fraction <= 1.0
        (torch.Size([1, 2, 512, 64]), True)
    """
    overrides = (simthreshd1, cdfthreshd, topk, pvthreshd, attention_sink, dense_prefix, dense_suffix, min_seq_len,
                 max_kept_fraction, backend)
    if config is None and all(x is None for x in overrides):
        cfg = _DEFAULT_CONFIG  # validating a fresh default costs as much as a short attention's launch
    else:
        cfg = resolve_config(config, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd,
                             attention_sink=attention_sink, dense_prefix=dense_prefix, dense_suffix=dense_suffix,
                             min_seq_len=min_seq_len, max_kept_fraction=max_kept_fraction, backend=backend)
    inp = attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    out, stats = sparse_attention_inputs(inp, cfg)
    out = inp.to_layout(out)
    return (out, stats) if return_stats else out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    layout: str = "HND",
    is_causal: bool = False,
    scale: float | None = None,
    pvthreshd: float | torch.Tensor = math.inf,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SparseStats]:
    """Attention over the kept blocks of a user-given block mask.

    Args:
        block_mask: bool (or integer 0/1) [B, Hq, ceil(Nq/128), ceil(Nk/64)]; B and Hq may
            be 1 to broadcast. Causal and padding validity are applied on top.
        pvthreshd: stage-2 skip threshold (``inf`` = off, the default).
        backend: "auto", "reference", "cpu", "cuda", "flex" or "sdpa" (dense, ignores the mask).

    Example:
        >>> import torch, hf_creative_sparse as hcs
        >>> q, k, v = (torch.randn(1, 1, 256, 32) for _ in range(3))
        >>> mask = torch.ones(1, 1, 2, 4, dtype=torch.bool)
        >>> hcs.block_sparse_attention(q, k, v, mask).shape
        torch.Size([1, 1, 256, 32])
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    inp = attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    mask = check_block_mask(block_mask, inp)
    kept, total = kept_fraction(mask, inp)
    if backend == "sdpa":
        out, stats = _dense(inp, "backend='sdpa' requested", kept, total, mask)
    else:
        _check_threshold("pvthreshd", pvthreshd, 0.0, math.inf, allow_inf=True)
        out, stats = _run_sparse(inp, mask, pvthreshd, backend, kept, total)
    out = inp.to_layout(out)
    return (out, stats) if return_stats else out
