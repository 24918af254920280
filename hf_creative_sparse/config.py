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

Threshold = "float | torch.Tensor"


def _check_threshold(name: str, value: Any, low: float, high: float, *, allow_inf: bool = False) -> None:
    """Validate a scalar or per-head 1-D tensor threshold lies in [low, high]."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 1-D per-head tensor, got bool")
    if isinstance(value, (int, float)):
        values = [float(value)]
    elif isinstance(value, torch.Tensor):
        if value.dim() > 1:
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


@dataclass
class SparseAttentionConfig:
    """Thresholds of the SpargeAttn-style predictor and the dense-fallback policy.

    Attributes:
        simthreshd1: a block whose mean pairwise cosine similarity is at most this is not
            "self-similar": its pooled mean does not represent it, so it is always kept.
            1.0 (or more) keeps every block. Range [-1, 2]; per-head 1-D tensors allowed.
        cdfthreshd: per query block, keep the fewest key blocks whose compressed-softmax
            mass reaches this. 1.0 keeps every block. Range [0, 1]. The default 0.995 is
            stricter than SpargeAttn's 0.98 (which its drop-in names keep): on smooth,
            peaked inputs (hf_creative_sparse.bench.structured_inputs, N=4096) 0.98 kept
            4.0% of blocks at relative L1 0.18 against dense, 0.995 kept 4.6% at 0.05.
            `calibrate` sets per-head values to an error budget.
        topk: alternative to ``cdfthreshd``: keep this fraction of the valid key blocks
            (at least one). Range (0, 1]. When set, ``cdfthreshd`` is ignored.
        pvthreshd: stage-2 skip: inside the online softmax, a kept block whose row max is
            more than this below the running max contributes nothing (its weights are
            below exp(-pvthreshd)). ``math.inf`` disables it. Range [0, inf].
        attention_sink: always keep key block 0.
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

    simthreshd1: Any = 0.6
    cdfthreshd: Any = 0.995
    topk: Any = None
    pvthreshd: Any = 50.0
    attention_sink: bool = False
    dense_prefix: int = 0
    dense_suffix: int = 0
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    max_kept_fraction: float = DEFAULT_MAX_KEPT_FRACTION
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_threshold("simthreshd1", self.simthreshd1, -1.0, 2.0)
        if self.cdfthreshd is None and self.topk is None:
            raise ValueError("one of cdfthreshd or topk must be set")
        if self.cdfthreshd is not None:
            _check_threshold("cdfthreshd", self.cdfthreshd, 0.0, 1.0)
        if self.topk is not None:
            _check_threshold("topk", self.topk, 0.0, 1.0)
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
        if not isinstance(self.attention_sink, bool):
            raise TypeError(f"attention_sink must be a bool, got {type(self.attention_sink).__name__}")
        from .ops.dispatch import BACKEND_NAMES  # local: ops imports this module

        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")

    def replace(self, **changes: Any) -> "SparseAttentionConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def dense(cls, **changes: Any) -> "SparseAttentionConfig":
        """A config that keeps every block (same result as dense attention)."""
        base = dict(simthreshd1=1.0, cdfthreshd=1.0, topk=None, pvthreshd=math.inf)
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
    """

    kept_fraction: float
    backend: str
    pv_skipped_fraction: float = 0.0
    predicted_kept_fraction: float | None = None
    fallback_reason: str | None = None
    num_blocks: int = 0
    block_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        """1 - kept_fraction, as SpargeAttn's ``return_sparsity`` reports it."""
        return 1.0 - self.kept_fraction
