"""Kernel thresholds and dispatch policy (`SparseAttentionConfig`) and per-call statistics
(`SparseStats`).

The config validates itself on construction, in the manner of PEFT's configs, so a bad
threshold fails where it is written rather than deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

#: Query block size (tokens) of every block mask, as SpargeAttn's ``mask_id``.
BLOCK_M = 128
#: Key block size (tokens) of every block mask.
BLOCK_N = 64

#: Below this many key tokens `sparse_attention` runs dense SDPA by default. Measured on the
#: 2-core CPU (float32, B1 H8 D64, top-k masks, prediction included, vs SDPA): N=512
#: 0.90x (kept 25%) to 1.12x (50%), N=768 1.14-1.19x, N=1024 1.01-1.90x, N=2048
#: 1.71-2.23x. Below ~1k tokens a row has at most 16 key blocks, gains are within the
#: noise and can turn into losses; from 1k on sparsity pays. The GPU policy adds a cost
#: model on top (ops/gpu_policy.py).
DEFAULT_MIN_SEQ_LEN = 1024
#: Above this predicted kept fraction `sparse_attention` runs dense SDPA: a block-sparse
#: kernel that visits 90% of the blocks saves less than its overhead over cuDNN/flash.
DEFAULT_MAX_KEPT_FRACTION = 0.9
#: The relative L1 error (sum |o - o_dense| / sum |o_dense|) a call aims for when no
#: threshold is given. Budgets are picked per head so that each head's measured error stays
#: under it, so the whole output lands between about 0.5x and 1x of it; 0.02 keeps the
#: output within the 0.03 that DESIGN.md's headline speed is judged at, with room for the
#: sampling error of the estimate (ops/estimate.py).
DEFAULT_TARGET_L1 = 0.02
#: SpargeAttn's self-similarity threshold, used by the threshold rules when none is given.
DEFAULT_SIMTHRESHD1 = 0.6

Threshold = "float | torch.Tensor"


def _check_threshold(name: str, value: Any, low: float, high: float, *, allow_inf: bool = False,
                     allow_rows: bool = False) -> None:
    """Validate a scalar or per-head 1-D tensor threshold lies in [low, high] (with
    ``allow_rows`` also a [B, Hq, Mq] tensor of per-query-block values)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 1-D per-head tensor, got bool")
    if isinstance(value, (int, float)):
        values = [float(value)]
    elif isinstance(value, torch.Tensor):
        if value.dim() > 1 and not (allow_rows and value.dim() == 3):
            raise ValueError(f"{name} must be a scalar or a 1-D per-head tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
        values = [float(x) for x in value.detach().flatten().cpu().tolist()]
    else:
        raise TypeError(f"{name} must be a float or a 1-D per-head tensor, got {type(value).__name__}")
    for x in values:
        if math.isnan(x):
            raise ValueError(f"{name} must not be NaN")
        if math.isinf(x) and allow_inf and x > 0:
            continue
        if not (low <= x <= high):
            raise ValueError(f"{name} must lie in [{low}, {high}], got {x}")


#: Block rankings (`ops.masks.block_scores`): pooled means, Quest's bound, sampled rows.
BLOCK_RANKINGS = ("mean", "bound", "sample")
#: How an error target shares its error among heads (`ops.estimate`): "call" bounds the
#: relative L1 of the whole call, "head" bounds every head's own.
BUDGET_ALLOCATIONS = ("call", "head")


@dataclass
class SparseAttentionConfig:
    """Thresholds of the SpargeAttn-style predictor and the dense-fallback policy.

    Attributes:
        simthreshd1: a block whose mean pairwise cosine similarity is at most this is not
            "self-similar": its pooled mean does not represent it, so it is always kept.
            1.0 (or more) keeps every block. Range [-1, 2]; per-head 1-D tensors allowed.
            None: 0.6 with ``topk``/``cdfthreshd``, -1 with an error target
            (`effective_simthreshd1`).
        target_l1: the relative L1 error against dense attention this layer may make (the
            interface; see ``selection``). The per-head kept fractions are the fewest blocks
            whose error, measured exactly on sampled query rows, stays under it
            (ops/estimate.py; see ``budget_allocation``). None with no threshold given means
            `DEFAULT_TARGET_L1`. Range (0, 1).
        budget_allocation: with an error target, "call": the fewest kept blocks over all
            heads such that the relative L1 of the whole call, sum |o - o_dense| / sum
            |o_dense| over every head, stays under ``target_l1`` (easy heads give their
            slack to hard ones: on video-like inputs 1.4-2.2x fewer blocks than "head" at
            the same call error); "head": every head's own relative L1 stays under it.
            None: "call", and "head" for causal calls (`allocation_for`).
        cdfthreshd: expert override: per query block, keep the fewest key blocks whose
            compressed-softmax mass reaches this. 1.0 keeps every block. Range [0, 1]. Mass
            is not output error: 0.98 gave relative L1 0.18 on peaked inputs, and on
            video-like inputs 0.95 kept almost every block.
        topk: expert override: keep this fraction of the valid key blocks (at least one).
            Range (0, 1]. Exclusive with ``cdfthreshd`` and ``target_l1``.
        block_ranking: how key blocks are ranked: "mean" (pooled_q . pooled_k, SpargeAttn),
            "bound" (Quest's per-channel upper bound over the block's keys; finds heavy
            keys a mean dilutes) or "sample" (the exact softmax mass of 8 rows per query
            block, ops/sampled_scores.py: 1/16 of the dense QK^T, within 1.15x of the
            oracle's error on video-like inputs). None: with an error target "sample"
            (causal: "bound"), else "mean" (`ranking_for`).
        compensate: coarse compensation: every skipped key block enters the softmax as one
            pooled token (mean key, mean value, logit + log of its key count;
            docs/DESIGN.md). Cuts the error of a mask several-fold for ~1/64 of the dense
            QK^T. None (default): on with an error target, off with ``topk`` /
            ``cdfthreshd`` (`effective_compensate`).
        pvthreshd: stage-2 skip: inside the online softmax, a kept block whose row max is
            more than this below the running max contributes nothing (its weights are
            below exp(-pvthreshd)). ``math.inf`` disables it. Range [0, inf].
        attention_sink: always keep key block 0. None: on for causal calls with an error
            target (the attention sink of language models is a heavy hitter that pooled
            block means underrate: on LM-like inputs it halved the error at the same
            budget), off otherwise (`sink_for`).
        dense_prefix, dense_suffix: that many leading / trailing tokens (text) attend and
            are attended densely.
        min_seq_len: below this many key tokens run dense SDPA (see ``DEFAULT_MIN_SEQ_LEN``).
        max_kept_fraction: run dense SDPA when the predicted kept fraction exceeds this.
        backend: "auto", "reference", "cpu", "cuda", "flex" or "sdpa".

    Example:
        >>> cfg = SparseAttentionConfig(topk=0.25, min_seq_len=0)
        >>> cfg.topk
        0.25
    """

    simthreshd1: Any = None
    cdfthreshd: Any = None
    topk: Any = None
    target_l1: Any = None
    compensate: bool | None = None
    block_ranking: str | None = None
    budget_allocation: str | None = None
    pvthreshd: Any = 50.0
    attention_sink: bool | None = None
    dense_prefix: int = 0
    dense_suffix: int = 0
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    max_kept_fraction: float = DEFAULT_MAX_KEPT_FRACTION
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.simthreshd1 is not None:
            _check_threshold("simthreshd1", self.simthreshd1, -1.0, 2.0)
        if self.topk is not None and self.cdfthreshd is not None:
            raise ValueError("give one of topk or cdfthreshd, not both (topk keeps a fraction of the blocks, cdfthreshd "
                             "a share of the predicted mass)")
        if self.target_l1 is not None:
            if self.topk is not None or self.cdfthreshd is not None:
                raise ValueError("target_l1 picks the kept fraction itself: give target_l1 or a threshold "
                                 "(topk / cdfthreshd), not both")
            if isinstance(self.target_l1, bool) or not isinstance(self.target_l1, (int, float)):
                raise TypeError(f"target_l1 must be a float, got {type(self.target_l1).__name__}")
            if math.isnan(self.target_l1) or not (0.0 < self.target_l1 < 1.0):
                raise ValueError(f"target_l1 must lie in (0, 1) (a relative L1 error such as 0.02), got {self.target_l1}")
        if self.block_ranking is not None and self.block_ranking not in BLOCK_RANKINGS:
            raise ValueError(f"block_ranking must be one of {BLOCK_RANKINGS} or None, got {self.block_ranking!r}")
        if self.budget_allocation is not None and self.budget_allocation not in BUDGET_ALLOCATIONS:
            raise ValueError(f"budget_allocation must be one of {BUDGET_ALLOCATIONS} or None, "
                             f"got {self.budget_allocation!r}")
        if self.compensate is not None and not isinstance(self.compensate, bool):
            raise TypeError(f"compensate must be a bool or None, got {type(self.compensate).__name__}")
        if self.cdfthreshd is not None:
            _check_threshold("cdfthreshd", self.cdfthreshd, 0.0, 1.0)
        if self.topk is not None:
            _check_threshold("topk", self.topk, 0.0, 1.0, allow_rows=True)
            vals = self.topk.flatten().tolist() if isinstance(self.topk, torch.Tensor) else [self.topk]
            if any(float(x) <= 0.0 for x in vals):
                raise ValueError(f"topk must lie in (0, 1], got {self.topk}")
        _check_threshold("pvthreshd", self.pvthreshd, 0.0, math.inf, allow_inf=True)
        for name in ("dense_prefix", "dense_suffix", "min_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if isinstance(self.max_kept_fraction, bool) or not isinstance(self.max_kept_fraction, (int, float)):
            raise TypeError(f"max_kept_fraction must be a float, got {type(self.max_kept_fraction).__name__}")
        if math.isnan(self.max_kept_fraction) or not (0.0 <= self.max_kept_fraction <= 1.0):
            raise ValueError(f"max_kept_fraction must lie in [0, 1], got {self.max_kept_fraction}")
        if self.attention_sink is not None and not isinstance(self.attention_sink, bool):
            raise TypeError(f"attention_sink must be a bool or None, got {type(self.attention_sink).__name__}")
        from .dispatch import BACKEND_NAMES, backend_names  # local: ops imports this module

        if self.backend not in BACKEND_NAMES and self.backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {self.backend!r}")

    @property
    def selection(self) -> str:
        """How blocks are chosen: "topk", "cdf" (expert thresholds) or "target" (the
        default: per-head budgets from ``target_l1``)."""
        if self.topk is not None:
            return "topk"
        if self.cdfthreshd is not None:
            return "cdf"
        return "target"

    @property
    def effective_simthreshd1(self) -> Any:
        """``simthreshd1``, or when unset 0.6 for threshold rules (SpargeAttn's value) and
        -1 (no block forced) for an error target, whose estimate measures how well pooled
        means rank the blocks instead of guarding against it."""
        if self.simthreshd1 is not None:
            return self.simthreshd1
        return -1.0 if self.selection == "target" else DEFAULT_SIMTHRESHD1

    def sink_for(self, is_causal: bool) -> bool:
        """``attention_sink`` for a call; see the attribute."""
        if self.attention_sink is not None:
            return self.attention_sink
        return is_causal and self.selection == "target"

    def ranking_for(self, is_causal: bool) -> str:
        """``block_ranking`` for a call; when unset "mean" for the expert thresholds (SpargeAttn's
        meaning) and, with an error target, "sample" (non-causal) or "bound" (causal: there
        block i is ranked from block i - 1's rows, which see the previous topic, not the
        next; on LM-like inputs the sampled rows then erred up to 1.8x more per topic head than
        the bound, while on video-like inputs they need 1.5x fewer blocks at L1 0.03)."""
        if self.block_ranking is not None:
            return self.block_ranking
        if self.selection != "target":
            return "mean"
        return "bound" if is_causal else "sample"

    def allocation_for(self, is_causal: bool) -> str:
        """``budget_allocation`` for a call; when unset "call", and "head" for causal calls:
        their budgets come from the rows before each block, and sharing the error among
        heads there measured 1.1-1.3x over the target on LM-like inputs at target 0.01
        (per-head bounds: at most 1.08x)."""
        if self.budget_allocation is not None:
            return self.budget_allocation
        return "head" if is_causal else "call"

    @property
    def effective_target_l1(self) -> float:
        """``target_l1``, or `DEFAULT_TARGET_L1` when unset."""
        return DEFAULT_TARGET_L1 if self.target_l1 is None else float(self.target_l1)

    @property
    def effective_compensate(self) -> bool:
        """``compensate``; when unset, on with an error target (its budgets are measured
        with compensation, which needs 1.3-2.5x fewer blocks at the same error) and off for
        the expert thresholds, which keep SpargeAttn's meaning."""
        if self.compensate is not None:
            return self.compensate
        return self.selection == "target"

    def with_budgets(self, budgets: Any, is_causal: bool) -> "SparseAttentionConfig":
        """This error target's config for a call that reuses measured ``budgets`` (per-head or
        per-block top-k fractions): the same ranking, compensation, similarity threshold and
        sink the measurement assumed, pinned, since a top-k config would otherwise take the
        threshold rules' defaults (simthreshd1=0.6 forced non-self-similar blocks: on local
        inputs a budget of 0.36 then kept 0.52 of the blocks and fell back to dense after
        paying for the ranking)."""
        return self.replace(topk=budgets, compensate=self.effective_compensate,
                            block_ranking=self.ranking_for(is_causal), simthreshd1=self.effective_simthreshd1,
                            attention_sink=self.sink_for(is_causal))

    def replace(self, **changes: Any) -> "SparseAttentionConfig":
        """A validated copy with ``changes`` applied. Setting one selection rule (``topk``,
        ``cdfthreshd`` or ``target_l1``) clears the others."""
        rules = ("topk", "cdfthreshd", "target_l1")
        if any(changes.get(r) is not None for r in rules):
            for r in rules:
                changes.setdefault(r, None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def dense(cls, **changes: Any) -> "SparseAttentionConfig":
        """A config that keeps every block (same result as dense attention)."""
        base = dict(simthreshd1=1.0, cdfthreshd=1.0, topk=None, pvthreshd=math.inf, compensate=False)
        base.update(changes)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (per-head tensors become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if isinstance(value, float) and math.isinf(value):
                value = "inf"
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseAttentionConfig":
        """Inverse of `to_dict`."""
        kwargs = dict(data)
        for key, value in list(kwargs.items()):
            if value == "inf":
                kwargs[key] = math.inf
            elif isinstance(value, list):
                kwargs[key] = torch.tensor(value, dtype=torch.float32)
        return cls(**kwargs)


#: `SparseStats` fields that may hold a 0-d device tensor until read.
_DEVICE_FIELDS = frozenset({"kept_fraction", "predicted_kept_fraction", "pv_skipped_fraction"})


@dataclass
class SparseStats:
    """What one attention call did.

    Attributes:
        kept_fraction: kept blocks over attendable blocks (causal blocks above the
            diagonal do not count); 1.0 when the call ran dense.
        predicted_kept_fraction: the predictor's kept fraction even when the policy then
            ran dense (None when no prediction was made, e.g. for short sequences).
        pv_skipped_fraction: (query row, kept block) pairs whose P@V the stage-2 threshold
            skipped, over all such pairs; 0.0 for dense runs.
        backend: the backend that computed the output ("sdpa" for dense fallback).
        fallback_reason: why the call ran dense, or None.
        num_blocks: attendable (query block, key block) pairs summed over batch and heads.
        block_mask: the block mask that was used, when one was (bool [B, H, Mq, Mk]).
        target_l1: the error target the budgets were measured for (None: thresholds).
        head_budgets: float32 [B, H] kept-fraction budget per (batch, head) that the
            target gave (None without a target).
        estimated_l1: relative L1 error against dense over the sampled rows at those
            budgets (None without a target).
        budgets: float32 [B, H, Mq] kept-fraction budget per query block that the target
            gave (what a call site's cache reuses; None without a target).
        compensated: skipped blocks entered the softmax as pooled tokens.
        compensation_note: why compensation was not applied although asked for by default.

    ``kept_fraction``, ``predicted_kept_fraction`` and ``pv_skipped_fraction`` may be filled
    with 0-d device tensors: reading one gives a float (and waits for the GPU then, not
    during the call); `raw` gives the stored value, for sums that stay on the device.
    """

    kept_fraction: float
    backend: str
    pv_skipped_fraction: float = 0.0
    predicted_kept_fraction: float | None = None
    fallback_reason: str | None = None
    num_blocks: int = 0
    block_mask: torch.Tensor | None = field(default=None, repr=False)
    target_l1: float | None = None
    head_budgets: torch.Tensor | None = field(default=None, repr=False)
    estimated_l1: float | None = None
    budgets: torch.Tensor | None = field(default=None, repr=False)
    compensated: bool = False
    compensation_note: str | None = None

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in _DEVICE_FIELDS and isinstance(value, torch.Tensor):
            value = float(value)
            object.__setattr__(self, name, value)
        return value

    def raw(self, name: str) -> Any:
        """The stored value of field ``name``, a device tensor left as it is."""
        return object.__getattribute__(self, name)

    @property
    def sparsity(self) -> float:
        """1 - kept_fraction, as SpargeAttn's ``return_sparsity`` reports it."""
        return 1.0 - self.kept_fraction
