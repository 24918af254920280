"""Public attention ops: `sparse_attention` (predicted mask) and `block_sparse_attention`
(user mask), with the dense-fallback policy and `SparseStats`."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, NamedTuple

import torch

from .config import SparseAttentionConfig, SparseStats, _check_threshold
from .dense import cudnn_direct_op, dense_attention, dense_attention_with
from .dispatch import backend_names, choose_backend
from .cpu_policy import explicit_budget_reason_cpu, max_useful_kept_fraction_cpu, skip_prediction_reason_cpu
from .gpu_policy import explicit_budget_reason, max_useful_kept_fraction, path_seconds, skip_prediction_reason
from .inputs import AttentionInputs, attention_inputs, per_head
from .compensation import compensate_output
from .estimate import estimate_budgets
from .masks import (BlockScores, block_scores, check_block_mask, kept_fraction, kept_fraction_on_device,
                    predict_from_inputs, select_blocks)


#: `sparse_attention`'s config when no threshold is given; never handed out (the ops read a
#: config and keep nothing of it), so sharing it is safe.
_DEFAULT_CONFIG = SparseAttentionConfig()


def resolve_config(config: SparseAttentionConfig | None, **overrides: Any) -> SparseAttentionConfig:
    """``config`` (default: `SparseAttentionConfig()`) with the non-None ``overrides`` applied
    and validated. Setting one selection rule (``topk``, ``cdfthreshd``, ``target_l1``)
    replaces the config's; giving two at once is an error."""
    if config is not None and not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    base = config if config is not None else SparseAttentionConfig()
    changes = {k: v for k, v in overrides.items() if v is not None}
    rules = [r for r in ("topk", "cdfthreshd", "target_l1") if r in changes]
    if len(rules) > 1:
        raise ValueError(f"give one selection rule, got {' and '.join(rules)} (target_l1 picks the kept fraction "
                         "itself; topk and cdfthreshd are expert overrides)")
    return base.replace(**changes) if changes else base


def _compensation_plan(cfg: SparseAttentionConfig, backend: Any) -> tuple[bool, str | None]:
    """(compensate?, why not) for a call on ``backend``: compensation merges through the
    backend's log-sum-exp, so a backend that returns none cannot compensate; an explicit
    ``compensate=True`` then fails instead of being dropped."""
    if not cfg.effective_compensate:
        return False, None
    if getattr(backend, "returns_lse", False):
        return True, None
    reason = f"backend {backend.name!r} returns no log-sum-exp, so skipped blocks cannot be compensated"
    if cfg.compensate:
        raise RuntimeError(f"compensate=True cannot be honoured: {reason}; pass compensate=False or another backend")
    return False, reason


def _run_sparse(inp: AttentionInputs, block_mask: torch.Tensor, pv: torch.Tensor, chosen: Any,
                predicted: float | torch.Tensor, total: int, compensate: bool = False,
                scores: BlockScores | None = None) -> tuple[torch.Tensor, SparseStats]:
    result = chosen.run(inp, block_mask, pv)
    out = result.out
    if compensate:
        if result.lse is None:
            raise RuntimeError(f"backend {chosen.name!r} declares returns_lse but returned none")
        out = compensate_output(inp, out, result.lse, block_mask,
                                None if scores is None else scores.pooled_k, None if scores is None else scores.count_k)
    stats = SparseStats(
        kept_fraction=predicted, predicted_kept_fraction=predicted, backend=chosen.name,
        pv_skipped_fraction=result.pv_skipped_fraction(),
        num_blocks=total, block_mask=block_mask, compensated=compensate,
    )
    return out, stats


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
    selection = cfg.selection
    budget = _mean_topk(cfg) if selection == "topk" else None
    key = (cfg.backend, cfg.min_seq_len, q.shape, inp.k.shape, q.dtype, q.device, inp.is_causal, mask_uses,
           predicting, selection, budget, cfg.ranking_for(inp.is_causal), cfg.effective_compensate)
    hit = _EARLY_FALLBACK.get(key, _MISSING)
    if hit is _MISSING:
        reason = _early_fallback_reason(inp, cfg, mask_uses, predicting, budget)
        hit = None if reason is None else EarlyFallback(reason, cudnn_direct_op(q, inp.k))
        if len(_EARLY_FALLBACK) >= EARLY_FALLBACK_CACHE_SIZE:
            _EARLY_FALLBACK.clear()
        _EARLY_FALLBACK[key] = hit
    return hit  # type: ignore[return-value]


def path_seconds_for(inp: AttentionInputs, cfg: SparseAttentionConfig) -> float:
    """`gpu_policy.path_seconds` for this call's ranking and compensation (the one place
    that maps a config to the path's stages; patched layers use it too)."""
    ranking = cfg.ranking_for(inp.is_causal)
    # the fused GPU prediction takes non-causal "mean" rankings; "sample" has its own kernels
    return path_seconds(inp, ranking == "sample", cfg.effective_compensate,
                        torch_ranking=inp.is_causal or ranking == "bound")


def _mean_topk(cfg: SparseAttentionConfig) -> float:
    topk = cfg.topk
    return float(topk.float().mean()) if isinstance(topk, torch.Tensor) else float(topk)


def _early_fallback_reason(inp: AttentionInputs, cfg: SparseAttentionConfig, mask_uses: int,
                           predicting: bool, budget: float | None) -> str | None:
    """`early_fallback`'s reason, computed afresh. ``budget``: the mean top-k fraction of an
    explicit budget, which is never refused for the prediction's cost when it pays."""
    if cfg.backend == "sdpa":
        return "backend='sdpa' requested"
    if cfg.backend != "auto":
        return None
    if inp.len_k < cfg.min_seq_len:
        return f"short sequence: len_k={inp.len_k} < min_seq_len={cfg.min_seq_len}"
    if predicting and inp.q.is_cuda:  # cost model: ops/gpu_policy.py
        extra = path_seconds_for(inp, cfg)
        if budget is not None:
            return explicit_budget_reason(inp, budget, mask_uses, extra)
        if cfg.selection == "target":  # measured once per call site (`sparse_attention`'s cache)
            return explicit_budget_reason(inp, 0.0, mask_uses, extra)
        return skip_prediction_reason(inp, mask_uses)
    if predicting and inp.device.type == "cpu":  # rates measured on this machine: ops/cpu_policy.py
        if budget is not None:
            return explicit_budget_reason_cpu(inp, budget, mask_uses)
        if cfg.selection == "target":
            return explicit_budget_reason_cpu(inp, 0.0, mask_uses)
        return skip_prediction_reason_cpu(inp, mask_uses)
    return None


def sparse_attention_inputs(inp: AttentionInputs, cfg: SparseAttentionConfig,
                            block_mask: torch.Tensor | None = None,
                            mask_uses: int = 1, budgets_judged: bool = False) -> tuple[torch.Tensor, SparseStats]:
    """The policy and dispatch of `sparse_attention` on validated inputs (HND output).

    ``block_mask`` (already validated) replaces the prediction, e.g. a cached mask reused
    across denoising steps; ``mask_uses`` says how many calls a predicted mask will serve
    (the GPU cost model shares the prediction's cost among them). With
    ``cfg.selection == "target"`` the per-head budgets are measured inline
    (ops/estimate.py) and reported in the stats. ``budgets_judged``: ``cfg``'s top-k
    budgets were measured at this call site and the policy already judged them there, so
    the mask's kept fraction is not read back before the launch (that read waits for the
    GPU, which then idles while the host prepares the kernel); the stats read it later.
    """
    early = early_fallback(inp, cfg, mask_uses, block_mask is None)
    if early is not None:  # the hot dense path: as little Python as possible before the launch
        reason, op = early
        return dense_attention_with(op, inp), SparseStats(kept_fraction=1.0, backend="sdpa", fallback_reason=reason)
    policy = cfg.backend == "auto"
    gpu_policy = policy and inp.q.is_cuda
    pv = per_head("pvthreshd", cfg.pvthreshd, inp.heads_q, inp.device)
    chosen = choose_backend(cfg.backend, inp, pv)
    compensate, comp_note = _compensation_plan(cfg, chosen)
    scores = estimate = None
    with torch.no_grad():
        if block_mask is None:
            if cfg.selection == "target" or compensate or cfg.ranking_for(inp.is_causal) != "mean":
                scores = block_scores(inp, simthreshd1=cfg.effective_simthreshd1, attention_sink=cfg.sink_for(inp.is_causal),
                                      dense_prefix=cfg.dense_prefix, dense_suffix=cfg.dense_suffix,
                                      ranking=cfg.ranking_for(inp.is_causal))
            if cfg.selection == "target":
                estimate = estimate_budgets(inp, scores, target_l1=cfg.effective_target_l1, compensate=compensate,
                                            allocation=cfg.allocation_for(inp.is_causal))
                block_mask = select_blocks(scores, inp, topk=estimate.topk)
            elif scores is not None:
                block_mask = select_blocks(scores, inp, cdfthreshd=cfg.cdfthreshd, topk=cfg.topk)
            else:
                block_mask = predict_from_inputs(
                    inp, simthreshd1=cfg.effective_simthreshd1, cdfthreshd=cfg.cdfthreshd, topk=cfg.topk,
                    attention_sink=cfg.sink_for(inp.is_causal), dense_prefix=cfg.dense_prefix, dense_suffix=cfg.dense_suffix)
        if policy and not budgets_judged:
            predicted, total = kept_fraction(block_mask, inp)
        else:  # no decision needs it now: the stats read it when asked
            predicted, total = kept_fraction_on_device(block_mask, inp)
            policy = gpu_policy = False
    if policy and predicted > cfg.max_kept_fraction:
        out, stats = _dense(inp, f"low predicted sparsity: kept {predicted:.3f} > max_kept_fraction="
                            f"{cfg.max_kept_fraction}", predicted, total, block_mask)
    elif gpu_policy and predicted > (limit := max_useful_kept_fraction(inp, path_seconds_for(inp, cfg))):
        out, stats = _dense(inp, f"sparsity cannot pay on the GPU: kept {predicted:.3f} > {limit:.3f}, the break-even "
                            "fraction for this size", predicted, total, block_mask)
    elif policy and inp.device.type == "cpu" and predicted > (limit := max_useful_kept_fraction_cpu(inp)):
        out, stats = _dense(inp, f"sparsity cannot pay on the CPU: kept {predicted:.3f} > {limit:.3f}, the break-even "
                            "fraction measured on this machine", predicted, total, block_mask)
    else:
        out, stats = _run_sparse(inp, block_mask, pv, chosen, predicted, total, compensate, scores)
        stats.compensation_note = comp_note
    if estimate is not None:
        stats.target_l1 = cfg.effective_target_l1
        stats.head_budgets = estimate.head_budget
        stats.budgets = estimate.topk
        stats.estimated_l1 = 0.0 if stats.fallback_reason else float(estimate.call_l1.float().mean())
    return out, stats


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
    target_l1: float | None = None,
    compensate: bool | None = None,
    budget_allocation: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SparseStats]:
    """Block-sparse attention at a stated error: predict which blocks matter, keep per head
    the fewest that hold the error under ``target_l1``, compensate the skipped ones, and
    attend only over the kept blocks with the pv-threshold skip.

    The error is the knob: ``target_l1`` (default `config.DEFAULT_TARGET_L1` = 0.02) is a
    relative L1 error against dense attention, sum |o - o_dense| / sum |o_dense|, over the
    whole call (``budget_allocation="call"``, default) or per head ("head"); the per-head
    budgets are measured exactly on sampled query rows (ops/estimate.py) and reported in
    the stats (``head_budgets``, ``estimated_l1``). ``topk`` / ``cdfthreshd`` are expert
    overrides that replace the target. ``compensate`` (default on) puts each skipped key
    block back as one pooled token (docs/DESIGN.md).

    Arguments left as None come from ``config`` (default `SparseAttentionConfig()`). With
    ``backend="auto"`` the policy runs dense SDPA for sequences shorter than
    ``min_seq_len`` or when the kept fraction exceeds ``max_kept_fraction`` (or, on a GPU,
    the measured break-even fraction), and says so in the stats; a named backend always
    runs sparse.

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
    overrides = dict(simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd,
                     attention_sink=attention_sink, dense_prefix=dense_prefix, dense_suffix=dense_suffix,
                     min_seq_len=min_seq_len, max_kept_fraction=max_kept_fraction, backend=backend,
                     target_l1=target_l1, compensate=compensate, budget_allocation=budget_allocation)
    given = {name: value for name, value in overrides.items() if value is not None}
    if config is None and not given:
        cfg = _DEFAULT_CONFIG  # validating a fresh default costs as much as a short attention's launch
    elif config is None and all(type(value) in _SCALAR_TYPES for value in given.values()):
        # the same keywords each call: validated once (typed key: True and 1 are different arguments)
        cfg = _scalar_overrides_config(tuple((name, type(value), value) for name, value in given.items()))
    else:
        cfg = resolve_config(config, **given)
    inp = attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    if cfg is not _DEFAULT_CONFIG:
        _check_head_counts(cfg, inp)
    if cfg.selection == "target" and cfg.backend != "sdpa":
        frame = sys._getframe(1)
        from .call_sites import target_at_call_site  # local: call_sites builds on this module

        out, stats = target_at_call_site(inp, cfg, (frame.f_code.co_filename, frame.f_lineno))
    else:
        out, stats = sparse_attention_inputs(inp, cfg)
    out = inp.to_layout(out)
    return (out, stats) if return_stats else out


_SCALAR_TYPES = (bool, int, float, str)


@functools.lru_cache(maxsize=256)
def _scalar_overrides_config(typed: tuple[tuple[str, type, Any], ...]) -> SparseAttentionConfig:
    """`sparse_attention`'s config for scalar keyword overrides ((name, type, value) each),
    validated once per distinct set: at the Flux shape (0.5 ms calls) building and
    validating a config per call cost ~7% of the call. Shared like `_DEFAULT_CONFIG` (the ops
    never modify a config)."""
    return resolve_config(None, **{name: value for name, _, value in typed})


def _check_head_counts(cfg: SparseAttentionConfig, inp: AttentionInputs) -> None:
    """Per-head thresholds must have one value per q head, whatever path the call takes
    (a short sequence's dense fallback included): a wrong length is a wrong setup."""
    for name in ("simthreshd1", "cdfthreshd", "topk", "pvthreshd"):
        value = getattr(cfg, name)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() not in (1, inp.heads_q):
            raise ValueError(f"{name} must be a scalar or have one value per q head ({inp.heads_q}), "
                             f"got shape {tuple(value.shape)}")


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
    compensate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SparseStats]:
    """Attention over the kept blocks of a user-given block mask.

    Args:
        block_mask: bool (or integer 0/1) [B, Hq, ceil(Nq/128), ceil(Nk/64)]; B and Hq may
            be 1 to broadcast. Causal and padding validity are applied on top.
        pvthreshd: stage-2 skip threshold (``inf`` = off, the default).
        backend: "auto", "reference", "cpu", "cuda", "flex" or "sdpa" (dense, ignores the mask).
        compensate: add each skipped attendable key block as one pooled token (coarse
            compensation, docs/DESIGN.md); off by default here: the mask is the user's.

    Example:
        >>> import torch, hf_creative_sparse as hcs
        >>> q, k, v = (torch.randn(1, 1, 256, 32) for _ in range(3))
        >>> mask = torch.ones(1, 1, 2, 4, dtype=torch.bool)
        >>> hcs.block_sparse_attention(q, k, v, mask).shape
        torch.Size([1, 1, 256, 32])
    """
    if backend not in (names := backend_names()):
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    inp = attention_inputs(q, k, v, layout=layout, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    mask = check_block_mask(block_mask, inp)
    kept, total = kept_fraction(mask, inp)
    if backend == "sdpa":
        out, stats = _dense(inp, "backend='sdpa' requested", kept, total, mask)
    else:
        _check_threshold("pvthreshd", pvthreshd, 0.0, math.inf, allow_inf=True)
        if not isinstance(compensate, bool):
            raise TypeError(f"compensate must be a bool, got {type(compensate).__name__}")
        pv = per_head("pvthreshd", pvthreshd, inp.heads_q, inp.device)
        chosen = choose_backend(backend, inp, pv)
        do_comp, _ = _compensation_plan(SparseAttentionConfig.dense(compensate=compensate), chosen)
        out, stats = _run_sparse(inp, mask, pv, chosen, kept, total, do_comp)
    out = inp.to_layout(out)
    return (out, stats) if return_stats else out
