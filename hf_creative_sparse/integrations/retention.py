"""Context KV retention for diffusion language models: the config, the saliency score and
the compaction.

A block-diffusion LM (DiffusionGemma) re-runs attention over the whole cached context at
every denoising step of every canvas, although the context does not change within a
canvas. Retention (dLLM-Serve's ``SparseConfig``, Sparse-dLLM's delayed sparse caching)
runs the first ``delay_step`` steps of a canvas densely, then scores every cached context
token by the attention the canvas gives it, keeps the ``retention_ratio`` most salient ones in a
compact copy (physically smaller tensors) and lets the remaining steps of the canvas attend
to that copy plus the canvas itself.

Names and meaning follow dLLM-Serve (``dllmserve/sparse/state.py`` and
``dllmserve/layers/attention.py``). Where its docs and its code differ, this module follows
the code (its saliency rule, the mean canvas query dotted with each key, is
``saliency="mean_query"``; the default, the canvas's attention mass, measured better): its
guide speaks of "head-level sparsity ... using only a subset of attention
heads", but the code keeps a top-k of *tokens*: one set shared by all heads (scores summed
over the query heads) or, with ``head_select=True``, one set per KV head (scores maxed over
the query heads of each GQA group). No head is ever dropped. One deliberate difference:
dLLM-Serve's selection step itself still runs densely (it has ``delay_step + 1`` dense
steps); here the step at which the selection is made already attends to the retained
tokens, so a canvas has exactly ``delay_step`` dense steps.

The model glue lives in ``patches/diffusion_gemma.py``; `enable_retention` is what
``enable_creative_sparse(model_or_pipe, retention=...)`` calls.

Example:
    >>> import torch
    >>> cfg = RetentionConfig(retention_ratio=0.5, delay_step=1, pool_kernel=1)
    >>> q = torch.tensor([[[[1.0, 0.0]]]])                    # (batch 1, heads 1, canvas 1, dim 2)
    >>> k = torch.tensor([[[[0.1, 0], [2.0, 0], [0.5, 0], [3.0, 0]]]])   # 4 cached keys
    >>> idx = select_retained(saliency_scores(q, k, head_select=False, pool_kernel=1), cfg.retained_count(4))
    >>> idx.tolist()                                          # (batch, 1 shared set, kept), ascending
    [[[1, 3]]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RetentionConfig", "as_retention_configs", "saliency_scores", "select_retained", "compact_kv",
           "enable_retention"]


@dataclass(frozen=True)
class RetentionConfig:
    """How much cached context KV the denoising steps of a canvas keep.

    Attributes:
        retention_ratio: share of the cached context tokens kept, in (0, 1]; the count is
            ``max(1, floor(ratio * attendable tokens))`` (dLLM-Serve's rule). 1 keeps all
            and is bit-identical to the unpatched model.
        delay_step: dense denoising steps at the start of each canvas (and of each
            ``default_block_len`` cycle); the selection is made at step ``delay_step``
            (0-based) from that step's canvas queries and reused until the canvas is
            accepted. 0 selects at the first step.
        default_block_len: denoising steps after which the selection cycle restarts within
            a canvas (dense steps again, then a new selection). dLLM-Serve counts its
            blocks in steps (LLaDA denoises one token per step, so a block of 32 tokens is
            32 steps). None: once per canvas, since DiffusionGemma marks each canvas (the
            encoder runs between canvases). Must exceed ``delay_step``.
        head_select: False: one token set shared by all heads (scores summed over the query
            heads); True: one set per KV head (scores maxed over its GQA group).
        pool_kernel: width of the max-pooling over neighbouring token positions applied to
            the saliency score before the top-k (dLLM-Serve's ``pool_kernel``; keeps the
            neighbours of a salient token); 1 turns it off.
        enabled: False leaves the row (or model) exactly dense.
        offload_to: device on which the full context KV of a layer waits while the canvas
            runs on its compact copy (e.g. "cpu" on a GPU: device memory falls by the
            dropped share; the full KV comes back before the encoder appends the accepted
            canvas). None keeps it in place: the decoder then reads and materialises only
            the retained share, but the full cache stays resident for the encoder.
        follow_dial: with a dial published (``DiffusionDialProcessor`` in the sampler), the
            ratio used at a selection is ``retention_ratio * k_attn(s)`` (the attention
            budget of the default `SparsityController`): the diverge stage keeps less,
            refine more.
        saliency: "attention_mass" (default): the attention probability each cached token
            receives from the canvas queries at the selection step; "mean_query":
            dLLM-Serve's rule, the mean canvas query dotted with the key (cheaper: no
            softmax over the context). Measured on real attention (SmolLM2-135M, a 960-token
            context, 64 canvas queries, mean over 30 layers; BENCHMARKS.md), attention mass
            gives a lower relative L1 of the attention output: with pool_kernel 3 (the
            default) 0.028 vs 0.038 at ratio 0.5 and 0.055 vs 0.073 at 0.3; without
            pooling 0.023 vs 0.035 and 0.046 vs 0.067 (pooling lowers the worst layer's
            error, 0.11 vs 0.15 at 0.5, and raises the mean).
    """

    retention_ratio: float = 0.5
    delay_step: int = 1
    default_block_len: int | None = None
    head_select: bool = False
    pool_kernel: int = 3
    enabled: bool = True
    offload_to: str | None = None
    follow_dial: bool = True
    saliency: str = "attention_mass"

    def __post_init__(self) -> None:
        ratio = self.retention_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"retention_ratio must be a number in (0, 1], got {ratio!r}")
        object.__setattr__(self, "retention_ratio", float(ratio))
        if isinstance(self.delay_step, bool) or not isinstance(self.delay_step, int) or self.delay_step < 0:
            raise ValueError(f"delay_step must be an int >= 0 (dense steps per canvas), got {self.delay_step!r}")
        if self.default_block_len is not None:
            if isinstance(self.default_block_len, bool) or not isinstance(self.default_block_len, int) \
                    or self.default_block_len <= self.delay_step:
                raise ValueError(f"default_block_len must be None or an int > delay_step ({self.delay_step}), "
                                 f"got {self.default_block_len!r}")
        if isinstance(self.pool_kernel, bool) or not isinstance(self.pool_kernel, int) or self.pool_kernel < 1:
            raise ValueError(f"pool_kernel must be an int >= 1, got {self.pool_kernel!r}")
        for name in ("head_select", "enabled", "follow_dial"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.saliency not in SALIENCY_RULES:
            raise ValueError(f"saliency must be one of {SALIENCY_RULES}, got {self.saliency!r}")
        if self.offload_to is not None:
            if not isinstance(self.offload_to, str):
                raise TypeError(f"offload_to must be a device string or None, got {type(self.offload_to).__name__}")
            try:
                torch.device(self.offload_to)
            except RuntimeError as err:
                raise ValueError(f"offload_to must name a torch device, got {self.offload_to!r}") from err

    @property
    def active(self) -> bool:
        """Whether this config ever attends to a retained subset."""
        return self.enabled and self.retention_ratio < 1.0

    def retained_count(self, n: int, ratio: float | None = None) -> int:
        """Tokens kept out of ``n`` attendable ones: max(1, floor(ratio * n)), at most n."""
        r = self.retention_ratio if ratio is None else ratio
        if n <= 0:
            return 0
        return min(n, max(1, int(math.floor(n * r + 1e-9))))

    def phase(self, step: int) -> str:
        """"dense", "select" or "sparse" for denoising step ``step`` (0-based) of a canvas."""
        if not self.active:
            return "dense"
        cycle = step if self.default_block_len is None else step % self.default_block_len
        if cycle < self.delay_step:
            return "dense"
        return "select" if cycle == self.delay_step else "sparse"

    def replace(self, **changes: Any) -> "RetentionConfig":
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)


def as_retention_configs(retention: Any) -> RetentionConfig | list[RetentionConfig]:
    """Normalise ``retention=``: a `RetentionConfig`, a ratio (float in (0, 1]), a dict of
    `RetentionConfig` fields, or a list/tuple of those with one entry per batch row.

    Raises:
        TypeError / ValueError naming ``retention`` and what was expected.
    """
    def one(item: Any, where: str) -> RetentionConfig:
        if isinstance(item, RetentionConfig):
            return item
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return RetentionConfig(retention_ratio=float(item))
        if isinstance(item, dict):
            known = {f.name for f in fields(RetentionConfig)}
            unknown = sorted(set(item) - known)
            if unknown:
                raise ValueError(f"retention{where} has unknown fields {unknown}; RetentionConfig fields: "
                                 f"{sorted(known)}")
            return RetentionConfig(**item)
        raise TypeError(f"retention{where} must be a RetentionConfig, a ratio in (0, 1] or a dict of "
                        f"RetentionConfig fields, got {type(item).__name__}")

    if isinstance(retention, (list, tuple)):
        if not retention:
            raise ValueError("retention must not be an empty list: give one config per batch row")
        return [one(item, f"[{i}]") for i, item in enumerate(retention)]
    return one(retention, "")


# ------------------------------------------------------------------------------ saliency


#: Saliency rules: "attention_mass" (the attention probability each cached token gets from
#: the canvas queries) and "mean_query" (dLLM-Serve's: the mean canvas query dotted with it).
SALIENCY_RULES: tuple[str, ...] = ("attention_mass", "mean_query")


def saliency_scores(query: torch.Tensor, keys: torch.Tensor, *, head_select: bool, pool_kernel: int,
                    attendable: torch.Tensor | None = None, rule: str = "mean_query",
                    canvas_keys: torch.Tensor | None = None, scaling: float | None = None) -> torch.Tensor:
    """Saliency of each cached key for the current canvas.

    ``rule="mean_query"`` (dLLM-Serve's): the mean canvas query of each query head dotted
    with every cached key of its KV head; one batched matmul, O(H N D).
    ``rule="attention_mass"``: the attention probability each cached key receives, summed
    over the canvas queries, from the softmax (``scaling``) over the context and the
    canvas's own keys (``canvas_keys``): exactly the share of the step's attention that
    dropping the key removes. O(H Nc N D), one QK^T of an attention call, done a KV head at
    a time (float32 (B, G, Nc, N) at most).

    Shared selection sums the per-query-head scores over the heads; per-head selection
    takes their max over the query heads of each GQA group. A max-pool of width
    ``pool_kernel`` (stride 1) over token positions then spreads each score to its
    neighbours. Keys that may not be attended (``attendable`` False, e.g. left padding)
    get no probability and score -inf, so they are never kept while attendable ones
    remain. No per-token loop: the work is a matmul, a softmax, a reduction and one
    pooling pass, paid once per canvas and layer.

    Args:
        query: (B, Hq, Nc, D) canvas queries (after norm and RoPE).
        keys: (B, Hkv, N, D) cached context keys; Hq must be a multiple of Hkv.
        head_select: per-KV-head scores (True) or one shared score (False).
        pool_kernel: max-pool width (>= 1; 1 = none).
        attendable: optional bool (B, N).
        rule: one of `SALIENCY_RULES`.
        canvas_keys: (B, Hkv, Nc, D), for "attention_mass" (None: the context alone).
        scaling: softmax scale of "attention_mass" (None: 1 / sqrt(D)).

    Returns:
        float32 (B, Hkv, N) with ``head_select`` else (B, 1, N).
    """
    if query.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"query and keys must be (B, H, N, D), got {tuple(query.shape)} and {tuple(keys.shape)}")
    if rule not in SALIENCY_RULES:
        raise ValueError(f"rule must be one of {SALIENCY_RULES}, got {rule!r}")
    b, hq, nc, d = query.shape
    bk, hkv, n, dk = keys.shape
    if b != bk or d != dk or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} do not fit: same batch and "
                         "head dim, query heads a multiple of key heads")
    if attendable is not None and attendable.shape != (b, n):
        raise ValueError(f"attendable must be (B, N) = {(b, n)}, got {tuple(attendable.shape)}")
    if canvas_keys is not None and canvas_keys.shape != (b, hkv, nc, d):
        raise ValueError(f"canvas_keys must be (B, Hkv, Nc, D) = {(b, hkv, nc, d)}, got {tuple(canvas_keys.shape)}")
    group = hq // hkv
    if rule == "mean_query":
        q_mean = query.float().mean(dim=2).view(b, hkv, group, d)             # (B, Hkv, G, D)
        per_head = torch.einsum("bhgd,bhnd->bhgn", q_mean, keys.float())      # (B, Hkv, G, N)
    else:
        scale = d ** -0.5 if scaling is None else float(scaling)
        per_head = query.new_empty((b, hkv, group, n), dtype=torch.float32)
        blocked = None if attendable is None else ~attendable.to(torch.bool)[:, None, None, :]
        for h in range(hkv):  # a KV head at a time bounds the (B, G, Nc, N) probabilities
            q = query[:, h * group:(h + 1) * group].float()
            logits = torch.einsum("bgid,bnd->bgin", q, keys[:, h].float()) * scale
            if blocked is not None:
                logits = logits.masked_fill(blocked, -math.inf)
            lse = logits.logsumexp(dim=-1)
            if canvas_keys is not None:
                own = torch.einsum("bgid,bjd->bgij", q, canvas_keys[:, h].float()) * scale
                lse = torch.logaddexp(lse, own.logsumexp(dim=-1))
            per_head[:, h] = (logits - lse.unsqueeze(-1)).exp().sum(dim=2)
    scores = per_head.amax(dim=2) if head_select else per_head.sum(dim=(1, 2)).unsqueeze(1)
    if pool_kernel > 1 and n > 0:
        h = scores.shape[1]
        pooled = F.max_pool1d(scores.reshape(b * h, 1, n), kernel_size=pool_kernel, stride=1,
                              padding=pool_kernel // 2)
        scores = pooled[..., :n].reshape(b, h, n)
    if attendable is not None:
        scores = scores.masked_fill(~attendable.to(torch.bool).unsqueeze(1), -math.inf)
    return scores


def select_retained(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, S, count) of the ``count`` highest scores per row and set, ascending.

    Ties (max-pooling makes plateaus) go to the earlier position: a stable descending sort,
    so the choice is deterministic on every device (``topk`` leaves ties unspecified).
    """
    if not 1 <= count <= scores.shape[-1]:
        raise ValueError(f"count must be in [1, {scores.shape[-1]}], got {count}")
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :count].sort(dim=-1).values


def compact_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the retained entries into new, smaller contiguous tensors.

    Args:
        keys, values: (B, Hkv, N, D).
        index: (B, 1, R) shared or (B, Hkv, R) per-head token indices.

    Returns:
        keys, values of shape (B, Hkv, R, D) (fresh storage: the full tensors can be freed).
    """
    b, h, _, d = keys.shape
    idx = index.expand(b, h, index.shape[-1]).unsqueeze(-1).expand(b, h, index.shape[-1], d)
    return keys.gather(2, idx), values.gather(2, idx)


def enable_retention(model_or_pipe: Any, retention: Any) -> Any:
    """Install context KV retention on a DiffusionGemma model or pipeline (what
    ``enable_creative_sparse(model_or_pipe, retention=...)`` calls). See
    ``hf_creative_sparse.patches.diffusion_gemma.enable_retention``."""
    import importlib

    module = importlib.import_module("hf_creative_sparse.patches.diffusion_gemma")
    return module.enable_retention(model_or_pipe, retention)


