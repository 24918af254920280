"""Decode-time KV-block sparsity (query-aware block selection in the manner of Quest).

One file because it is one algorithm: the config, the per-layer state and the kernels of decode
sparsity change together.

At a decode step one new query row attends to the whole KV cache, and the cost is reading
the cache: attention is memory-bound. Quest (Tang et al., 2024) keeps, per key block
(``block_size`` consecutive keys), the per-channel minimum and maximum of its keys; for a
query q the bound ``sum_d max(q_d * min_d, q_d * max_d)`` is an upper bound on q . k for
every key of the block, and the blocks with the highest bounds hold the keys that the
softmax weighs most. Each step then reads only the kept blocks of K and V.

Here:

- `KeyBlockStats` holds the per-block min/max for one layer's cache and follows it as it
  grows: a decode step recomputes only the block its new keys fall into (O(block) work, no
  pass over the cache); a cache that changed in any other way (new prompt, cropped,
  reordered) is detected (length and the last cached key row) and rebuilt.
- Two block scores (``DecodeSparsityConfig.score``). "mass" (the default): each query
  head's attention mass on each block, estimated from the block's key count and
  per-channel key mean and variance (`block_mass_scores`: the logits of the block's keys
  as Gaussian draws, their log-sum-exp by the random energy model's law), turned into
  shares by a softmax over the blocks and summed over the kv head's query heads. "bound":
  Quest's bound summed over the group, ``(sum_g relu(q_g)) . max + (sum_g min(q_g, 0)) .
  min`` (`block_scores`), fused with the statistics into one Triton launch on CUDA. On
  SmolLM2 the bound ranks blocks by the largest logit any point of their min/max box could
  reach, which favours blocks of diverse keys, and its sum over the group lets the query
  heads with the largest norms decide; the mass estimate fixes both. SmolLM2-135M at
  k_attn 25%, contexts 2048-4096, teacher-forced decode: bound / blocks of 32 +7.5%
  perplexity (tuning texts), mass / blocks of 16 +2.5% (tuning), +2.7% (held-out texts);
  docs/DESIGN.md, decode-time KV-block selection.
- `select_key_blocks`: GQA shares one selection per kv head, so each kept block is read once
  for all of its query heads. The first ``sink_blocks`` and last ``recent_blocks`` blocks are
  always kept (attention sinks, local context); they count toward the budget.
- `decode_block_attention`: attention of the query over the kept blocks (softmax over
  their keys only), by the compiled CPU kernel (``csrc/cpu/decode_attn.cpp``), a Triton
  kernel on CUDA (``ops/decode_triton.py``) or the gather-based reference below.
- `DecodeState`: one layer's policy: the budget (a fixed fraction, or k_attn(s) of the
  sparsity dial), dense fallback where the context is short or the budget keeps nearly
  everything, and statistics saying what ran.

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.decode import DecodeSparsityConfig, DecodeState
    >>> state = DecodeState(DecodeSparsityConfig(budget=0.25, min_context=0, block_size=16))
    >>> q = torch.randn(1, 4, 1, 32)                   # one decode row, 4 query heads
    >>> k, v = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)   # 2 kv heads
    >>> out, stats = state.attend(q, k, v)
    >>> out.shape, stats.kept_blocks, stats.num_blocks
    (torch.Size([1, 4, 1, 32]), 5, 19)
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

DECODE_BACKENDS = ("auto", "cpu", "triton", "torch")
#: Block scores: "mass" (Gaussian estimate of the attention mass, `block_mass_scores`),
#: "bound" (Quest's min/max bound, `block_scores`), or "auto" (`DecodeSparsityConfig.layout`).
DECODE_SCORES = ("auto", "mass", "bound")
#: Block size of each score when ``block_size`` is None: where each was measured best.
DEFAULT_BLOCK_SIZE = {"mass": 16, "bound": 32}


@dataclass(frozen=True)
class DecodeSparsityConfig:
    """Policy of decode-time KV-block sparsity (validated).

    Attributes:
        enabled: False runs every decode step dense (the behaviour before this feature).
        budget: fixed kept fraction of key blocks in (0, 1]; None takes k_attn(s) of the
            sparsity dial when one is published (a running `CreativeSparseLogitsProcessor`
            or a schedule), and runs dense without one. An explicit budget overrides the dial.
        block_size: keys per block (the granularity of the statistics and of selection), or
            None (default): `DEFAULT_BLOCK_SIZE` of the score, 16 for "mass", 32 for "bound".
            Smaller blocks select more precisely; the statistics cost 2 / block_size of the
            key cache in memory and in reads per step. With score "mass" on SmolLM2 at
            k_attn 25% (tuning texts, context 2048-4096) blocks of 16 instead of 32 took the
            loss from +4.4% to +3.2% (before the REM law).
        score: "auto" (default), "mass" or "bound" (module docstring): how a block is ranked
            for the current query. "auto" is "mass" except on CUDA with the Triton backend,
            where it is "bound", the faster of the two there (H100, 25%, step as a CUDA graph:
            bound/32 2.7-2.8x SDPA, mass/16 2.0x; BENCHMARKS.md). "mass" (session 8): each
            query head's softmax mass on the block estimated from the block's key count and
            per-channel key mean and variance, summed over the kv head's query heads; on CUDA
            its statistics (16-bit for 16-bit caches) and logits are one Triton launch, the
            shares a second, then the Triton selection and attention. "bound": Quest's
            min/max bound summed over the group (fused into one Triton launch with the
            statistics on CUDA, then the Triton selection and attention). SmolLM2-135M at
            k_attn 25%, teacher-forced decode: "mass" / blocks of 16 +2.5% perplexity (tuning
            texts), +2.7% (held-out); "mass" / blocks of 32 +4.1% (held-out); "bound" /
            blocks of 32 +7.2% (held-out). For quality on a GPU, pass score="mass".
        sink_blocks: leading blocks always kept (attention sinks).
        recent_blocks: trailing blocks always kept (the newest keys, including the
            partly filled last block).
        min_context: decode steps with fewer cached keys run dense (selection and the
            statistics cost more than they save on short caches).
        max_kept_fraction: a step whose kept fraction exceeds this runs dense.
        backend: "auto" (cpu kernel for float32 CPU tensors, triton on CUDA, else torch),
            or one of "cpu", "triton", "torch" (the gather-based reference).
        dense_layers: layers with index below this decode dense (Quest keeps its first two
            layers dense: their attention is the least concentrated). Needs the layer's index
            (`DecodeState(layer_index=...)`; the transformers glue passes ``layer_idx``).
        verify_cache: check on every step that the cached keys the statistics describe are
            unchanged (compares the last cached key row; one device sync per layer and step
            on GPU). Turn off only when the cache can only grow (no beam search reordering).

    Example:
        >>> DecodeSparsityConfig(budget=0.25).layout("cpu")
        ('mass', 16)
        >>> DecodeSparsityConfig(budget=0.25).layout("cuda")
        ('bound', 32)
    """

    enabled: bool = True
    budget: float | None = None
    block_size: int | None = None
    score: str = "auto"
    sink_blocks: int = 1
    recent_blocks: int = 2
    min_context: int = 2048
    max_kept_fraction: float = 0.9
    backend: str = "auto"
    dense_layers: int = 0
    verify_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "verify_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise TypeError(f"budget must be a float in (0, 1] or None, got {type(self.budget).__name__}")
            if not 0.0 < float(self.budget) <= 1.0:
                raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        for name, low in (("block_size", 1), ("sink_blocks", 0), ("recent_blocks", 1), ("min_context", 0),
                          ("dense_layers", 0)):
            value = getattr(self, name)
            if name == "block_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.max_kept_fraction, bool) or not isinstance(self.max_kept_fraction, (int, float)) \
                or not 0.0 < float(self.max_kept_fraction) <= 1.0:
            raise ValueError(f"max_kept_fraction must be a float in (0, 1], got {self.max_kept_fraction!r}")
        if self.backend not in DECODE_BACKENDS:
            raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {self.backend!r}")
        if self.score not in DECODE_SCORES:
            raise ValueError(f"score must be one of {DECODE_SCORES}, got {self.score!r}")

    def replace(self, **changes: Any) -> "DecodeSparsityConfig":
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    def layout(self, device_type: str) -> tuple[str, int]:
        """(score, block size) a step on ``device_type`` ("cpu", "cuda", ...) uses: "auto"
        resolved ("bound" on CUDA unless ``backend`` names "cpu" or "torch", else "mass") and
        a None block size by `DEFAULT_BLOCK_SIZE`."""
        score = self.score
        if score == "auto":
            score = "bound" if device_type == "cuda" and self.backend in ("auto", "triton") else "mass"
        return score, self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE[score]


# -- per-block key statistics --------------------------------------------------------------


def _blocked_keys(keys: torch.Tensor, valid: torch.Tensor | None, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys`` [B, H, n, D] as float32 blocks [B, H, nb, block_size, D] (the last padded)
    and which of their keys are attendable, bool [B, nb, block_size]."""
    b, h, n, d = keys.shape
    nb = -(-n // block_size)
    pad = nb * block_size - n
    x = keys.float()
    ok = valid if valid is not None else torch.ones(b, n, dtype=torch.bool, device=keys.device)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        ok = F.pad(ok, (0, pad), value=False)
    x = x.view(b, h, nb, block_size, d)
    return x, ok.view(b, nb, block_size)


def _block_minmax(keys: torch.Tensor, valid: torch.Tensor | None, block_size: int) -> tuple[torch.Tensor, ...]:
    """Per-block min, max (float32 [B, H, nb, D]) and attendable-key counts (int32 [B, nb])
    of ``keys`` [B, H, n, D] (n need not be a multiple of block_size); blocks without an
    attendable key get min = max = 0 (their count says they are empty)."""
    x, okb = _blocked_keys(keys, valid, block_size)
    m = okb[:, None, :, :, None]
    kmin = torch.where(m, x, math.inf).amin(dim=3)
    kmax = torch.where(m, x, -math.inf).amax(dim=3)
    count = okb.sum(-1, dtype=torch.int32)
    empty = (count == 0)[:, None, :, None]
    return kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0), count


def _block_moments(keys: torch.Tensor, valid: torch.Tensor | None, block_size: int) -> tuple[torch.Tensor, ...]:
    """Per-block, per-channel mean and (population) variance (float32 [B, H, nb, D]) and
    attendable-key counts (int32 [B, nb]) of ``keys`` [B, H, n, D] over the attendable keys
    (two passes: the variance is the mean squared deviation from the block's mean); blocks
    without an attendable key get mean = var = 0 (their count says they are empty)."""
    x, okb = _blocked_keys(keys, valid, block_size)
    w = okb[:, None, :, :, None].float()
    count = okb.sum(-1, dtype=torch.int32)
    denom = count.clamp_min(1).float()[:, None, :, None]
    mean = (x * w).sum(3) / denom
    var = (((x - mean[:, :, :, None]) ** 2) * w).sum(3) / denom
    return mean, var, count


class KeyBlockStats:
    """Per-block, per-channel statistics of one layer's cached keys, kept in step with the
    cache as it grows: min and max (score "bound") or mean and variance (score "mass").

    Args:
        block_size: keys per block.
        score: "bound" (min/max, the default here: what Quest's bound reads) or "mass"
            (mean/variance, what `block_mass_scores` reads); `DecodeState` passes its
            config's score.

    Attributes:
        length: keys described (the cache length at the last `update`).
        updates, rebuilds: how many `update` calls were incremental / full recomputations.

    Example:
        >>> stats = KeyBlockStats(block_size=4)
        >>> keys = torch.randn(1, 2, 10, 8)
        >>> stats.update(keys), stats.update(torch.cat([keys, torch.randn(1, 2, 1, 8)], 2))
        ('rebuilt', 'incremental')
        >>> stats.kmin.shape                              # [B, H, ceil(11 / 4), D]
        torch.Size([1, 2, 3, 8])
    """

    def __init__(self, block_size: int, score: str = "bound") -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if score not in DECODE_SCORES:
            raise ValueError(f"score must be one of {DECODE_SCORES}, got {score!r}")
        self.block_size = block_size
        self.score = score
        self.length = 0
        self.updates = 0
        self.rebuilds = 0
        # [B, H, capacity, D] float32: min/max for "bound" (fused CUDA path: the keys' 16-bit
        # dtype), mean/var for "mass" (the others None)
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._var: torch.Tensor | None = None
        self._count: torch.Tensor | None = None  # [B, capacity] int32
        self._last_row: torch.Tensor | None = None  # [B, H, D]: the last key described
        self._padded = False

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.block_size)

    def _view(self, name: str) -> torch.Tensor:
        t = getattr(self, "_" + name)
        if t is None:
            raise RuntimeError(f"KeyBlockStats has no {name} statistics (score={self.score!r}, or update "
                               "has not been called)")
        return t[:, :, :self.num_blocks]

    @property
    def kmin(self) -> torch.Tensor:
        """float32 [B, H, num_blocks, D] (a view, or a float32 copy of 16-bit statistics; score "bound")."""
        return self._view("min").float()

    @property
    def kmax(self) -> torch.Tensor:
        return self._view("max").float()

    @property
    def kmean(self) -> torch.Tensor:
        """[B, H, num_blocks, D]: mean of each block's attendable keys (score "mass"); float32,
        or the keys' 16-bit dtype on the Triton path."""
        return self._view("mean")

    @property
    def kvar(self) -> torch.Tensor:
        """[B, H, num_blocks, D]: their population variance (score "mass"), as `kmean`."""
        return self._view("var")

    def _buffers(self) -> list[torch.Tensor | None]:
        return [self._min, self._max] if self.score == "bound" else [self._mean, self._var]

    @property
    def counts(self) -> torch.Tensor:
        """int32 [B, num_blocks]: attendable keys per block."""
        if self._count is None:
            raise RuntimeError("KeyBlockStats.update has not been called")
        return self._count[:, :self.num_blocks]

    def reset(self) -> None:
        """Forget the statistics (the next `update` rebuilds)."""
        self.length = 0
        self._min = self._max = self._mean = self._var = self._count = self._last_row = None

    def _matches(self, keys: torch.Tensor, padded: bool, verify: bool, dtype: torch.dtype) -> bool:
        b, h, n, d = keys.shape
        ref = self._buffers()[0]
        if ref is None or n <= self.length or padded != self._padded or ref.dtype != dtype:
            return False
        if tuple(ref.shape[:2]) != (b, h) or ref.shape[3] != d or ref.device != keys.device:
            return False
        if not verify:
            return True
        return self._last_row is not None and torch.equal(keys[:, :, self.length - 1], self._last_row)

    def update(self, keys: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
               verify: bool = True) -> str:
        """Describe ``keys`` [B, H, N, D] (the whole cache after this step's append).

        Incremental when the cache only grew since the last call (same batch, heads and
        padding kind; with ``verify``, the last key described is unchanged): only the
        blocks from the first new key's block on are recomputed. Otherwise a full rebuild.
        Min/max of float32 CPU keys go through the compiled kernel when it is built; the
        rest (and mean/variance) are torch ops.

        Args:
            key_padding_mask: bool [B, N], True = attend; padded keys count in no bound.

        Returns:
            "incremental" or "rebuilt".
        """
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise ValueError(f"keys must be a tensor [B, H, N, D], got {getattr(keys, 'shape', type(keys).__name__)}")
        b, h, n, d = keys.shape
        padded = key_padding_mask is not None
        if padded and (key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, n)):
            raise ValueError(f"key_padding_mask must be bool [B, N] = [{b}, {n}], got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        first, kind = self._prepare(keys, padded, verify, torch.float32)
        op = _cpu_ops("decode_block_stats") if keys.device.type == "cpu" and keys.dtype == torch.float32 \
            and keys.stride(3) == 1 and self.score == "bound" else None
        bs, blocks = self.block_size, -(-n // self.block_size)
        if self.score == "mass":
            start = first * bs
            valid = key_padding_mask[:, start:] if padded else None
            mean, var, count = _block_moments(keys[:, :, start:], valid, bs)
            self._mean[:, :, first:blocks] = mean
            self._var[:, :, first:blocks] = var
            self._count[:, first:blocks] = count
        elif op is not None:
            op(keys, key_padding_mask, bs, first, self._min, self._max, self._count)
        else:
            start = first * bs
            valid = key_padding_mask[:, start:] if padded else None
            kmin, kmax, count = _block_minmax(keys[:, :, start:], valid, bs)
            self._min[:, :, first:blocks] = kmin
            self._max[:, :, first:blocks] = kmax
            self._count[:, first:blocks] = count
        self._finish(keys, verify)
        return kind

    def update_and_score(self, keys: torch.Tensor, key_padding_mask: torch.Tensor | None, q: torch.Tensor, *,
                         verify: bool, sink_blocks: int, recent_blocks: int, fused: bool,
                         scale: float | None = None) -> tuple[str, torch.Tensor]:
        """`update`, then the score of every block for decode rows q [B, Hq, D] with the sink
        and recent blocks at +inf (float32 [B, Hkv, num_blocks]). ``fused``: by the Triton
        kernels (CUDA): one launch for "bound", two for "mass" (statistics and per-head
        logits, then the shares), which a decode step's host time needs on a GPU.
        ``scale``: the attention's softmax scale (score "mass"; default D ** -0.5)."""
        if not fused:
            kind = self.update(keys, key_padding_mask, verify=verify)
            return kind, force_blocks(self.scores(q, key_padding_mask is not None, scale), sink_blocks,
                                      recent_blocks)
        if self.score == "mass":
            from .decode_triton import mass_stats_and_scores_triton

            # 16-bit keys: mean and variance in their dtype (an estimate's inputs; half the reads)
            dtype = keys.dtype if keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
            first, kind = self._prepare(keys, key_padding_mask is not None, verify, dtype)
            scores = mass_stats_and_scores_triton(q, keys, key_padding_mask, self._mean, self._var, self._count,
                                                  self.block_size, first, sink_blocks, recent_blocks,
                                                  scale if scale is not None else q.shape[-1] ** -0.5)
            self._finish(keys, verify)
            return kind, scores
        from .decode_triton import stats_and_scores_triton

        # 16-bit keys: min and max are keys themselves, exact in their dtype, and the scores
        # kernel then reads half the bytes (the statistics are 1/16 of K at block size 32)
        dtype = keys.dtype if keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
        first, kind = self._prepare(keys, key_padding_mask is not None, verify, dtype)
        scores = stats_and_scores_triton(q, keys, key_padding_mask, self._min, self._max, self._count,
                                         self.block_size, first, sink_blocks, recent_blocks,
                                         key_padding_mask is not None)
        self._finish(keys, verify)
        return kind, scores

    def _prepare(self, keys: torch.Tensor, padded: bool, verify: bool, dtype: torch.dtype) -> tuple[int, str]:
        """(first block to recompute, "incremental" | "rebuilt"), buffers of ``dtype`` sized for the cache."""
        b, h, n, d = keys.shape
        blocks = -(-n // self.block_size)
        if self._matches(keys, padded, verify, dtype):
            self._ensure_capacity(blocks)
            self.updates += 1
            return self.length // self.block_size, "incremental"  # the partly filled block whole
        capacity = blocks + _SPARE_BLOCKS
        first = torch.empty(b, h, capacity, d, dtype=dtype, device=keys.device)
        if self.score == "bound":
            self._min, self._max = first, torch.empty_like(first)
        else:
            self._mean, self._var = first, torch.empty_like(first)
        self._count = torch.zeros(b, capacity, dtype=torch.int32, device=keys.device)
        self._padded = padded
        self.rebuilds += 1
        return 0, "rebuilt"

    def _finish(self, keys: torch.Tensor, verify: bool) -> None:
        self.length = keys.shape[2]
        self._last_row = keys[:, :, -1].clone() if verify else None

    def scores(self, q: torch.Tensor, use_counts: bool, scale: float | None = None) -> torch.Tensor:
        """The block scores of decode rows q [B, Hq, D] against these statistics (float32
        [B, Hkv, num_blocks]): `block_scores` ("bound"; empty blocks score -inf when
        ``use_counts``) or `block_mass_scores` ("mass", with the softmax ``scale``, default
        D ** -0.5; it always weighs blocks by their key counts)."""
        if self.score == "mass":
            return block_mass_scores(q, self.kmean, self.kvar, self.counts,
                                     scale if scale is not None else q.shape[-1] ** -0.5)
        op = _cpu_ops("decode_block_scores") if q.device.type == "cpu" else None
        if op is not None:
            return op(q, self._min, self._max, self._count if use_counts else None, self.num_blocks)
        return block_scores(q, self.kmin, self.kmax, self.counts if use_counts else None)

    def _ensure_capacity(self, blocks: int) -> None:
        capacity = self._count.shape[1]
        if blocks <= capacity:
            return
        new = max(blocks, 2 * capacity)

        def grow(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new
            out = t.new_zeros(shape)
            out.narrow(dim, 0, capacity).copy_(t)
            return out

        if self.score == "bound":
            self._min, self._max = grow(self._min, 2), grow(self._max, 2)
        else:
            self._mean, self._var = grow(self._mean, 2), grow(self._var, 2)
        self._count = grow(self._count, 1)


#: Blocks allocated beyond the cache at a rebuild (the cache grows by one key a step).
_SPARE_BLOCKS = 64


# -- selection ------------------------------------------------------------------------------


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """Quest's bound per (batch, kv head, block), summed over the kv head's query heads.

    Args:
        q: [B, Hq, D] the decode query rows.
        kmin, kmax: float32 [B, Hkv, nb, D].
        counts: int [B, nb] attendable keys per block; empty blocks score -inf.

    Returns:
        float32 [B, Hkv, nb]: sum_g sum_d max(q_gd min_d, q_gd max_d), an upper bound on
        sum_g q_g . k for every key k of the block.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)
    pos = qg.clamp_min(0).sum(2)  # [B, Hkv, D]
    neg = qg.clamp_max(0).sum(2)
    score = (kmax @ pos.unsqueeze(-1)).squeeze(-1) + (kmin @ neg.unsqueeze(-1)).squeeze(-1)
    if counts is not None:
        score = score.masked_fill((counts == 0)[:, None, :], -math.inf)
    return score


def block_mass_scores(q: torch.Tensor, kmean: torch.Tensor, kvar: torch.Tensor, counts: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Estimated attention mass per (batch, kv head, block), summed over the kv head's query heads.

    For query head g and block j with n_j attendable keys of per-channel mean mu_j and
    variance var_j, the logits scale q_g . k of the block's keys are taken as n_j Gaussian
    draws of mean m = scale q_g . mu_j and variance v = scale^2 (q_g * q_g) . var_j (a
    diagonal covariance), and log sum_k exp(scale q_g . k) is estimated by the law of the
    random energy model: log n_j + m + v / 2 while v <= 2 ln n_j (the Gaussian's
    log-mean-exp), beyond it m + sqrt(2 v ln n_j) (the largest of n_j draws dominates; the
    two meet with equal slopes). Exact for a block of identical keys. Without the second
    branch the estimate grows as v / 2 past what n_j keys can reach, and blocks of diverse
    keys outrank the block holding the mass (on SmolLM2 at k_attn 25%, blocks of 16: +3.2%
    -> +2.4% perplexity on the tuning texts). A softmax over the blocks turns these into
    head g's share of its attention per block; the shares are summed over the group, so
    every query head counts equally however large its query (the bound's sum does not).

    Args:
        q: [B, Hq, D] the decode query rows.
        kmean, kvar: float32 [B, Hkv, nb, D].
        counts: int [B, nb] attendable keys per block; empty blocks score -inf.
        scale: the attention's softmax scale.

    Returns:
        float32 [B, Hkv, nb]: in [0, Hq / Hkv], summing to Hq / Hkv over the blocks.
    """
    b, hq, d = q.shape
    hkv = kmean.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)
    log_n = counts.float().log()[:, None, None, :]  # log 0 = -inf: empty blocks get no mass
    lim = 2.0 * log_n.clamp_min(0.0)  # 2 ln n
    v = (qg * qg) @ kvar.transpose(-1, -2) * (scale * scale)  # [B, Hkv, G, nb]: variance of the logits
    spread = torch.where(v <= lim, 0.5 * v, (v * lim).sqrt() - 0.5 * lim)
    logits = (qg @ kmean.transpose(-1, -2)) * scale + spread + log_n
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2).masked_fill((counts == 0)[:, None, :], -math.inf)


def kept_block_count(num_blocks: int, budget: float, sink_blocks: int, recent_blocks: int) -> int:
    """ceil(budget * num_blocks), at least the forced sink and recent blocks, at most all."""
    forced = min(num_blocks, sink_blocks + recent_blocks)
    return min(num_blocks, max(forced, math.ceil(budget * num_blocks - 1e-9)))


def force_blocks(scores: torch.Tensor, sink_blocks: int, recent_blocks: int) -> torch.Tensor:
    """A copy of ``scores`` [..., nb] with the first ``sink_blocks`` and last
    ``recent_blocks`` blocks at +inf (a top-k then always keeps them)."""
    nb = scores.shape[-1]
    forced = scores.clone()
    forced[..., :min(sink_blocks, nb)] = math.inf
    forced[..., max(0, nb - recent_blocks):] = math.inf
    return forced


def select_key_blocks(scores: torch.Tensor, keep: int, sink_blocks: int = 0, recent_blocks: int = 0, *,
                      sort: bool = True) -> torch.Tensor:
    """The ``keep`` blocks per (batch, kv head): the sink and recent blocks (pass 0 when
    ``scores`` came from `force_blocks` already), then the highest scores. Returns int64
    [B, Hkv, keep], ascending with ``sort`` (the CPU kernel then reads the cache in order;
    the GPU kernels take any order)."""
    if sink_blocks or recent_blocks:
        scores = force_blocks(scores, sink_blocks, recent_blocks)
    idx = scores.topk(keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values if sort else idx


# -- attention over the kept blocks ------------------------------------------------------------


def decode_block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                     block_size: int, key_valid: torch.Tensor | None, scale: float
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query row over the keys of its kv head's kept blocks.

    Gathers the kept keys (memory O(kept keys)); any device and dtype, float32 math.

    Args:
        q: [B, Hq, D]; k, v: [B, Hkv, N, D]; block_idx: int64 [B, Hkv, K] (distinct blocks);
        key_valid: bool [B, N] (True = attend) or None.

    Returns:
        (out [B, Hq, D] in q's dtype, lse float32 [B, Hq]: natural log of the softmax
        denominator over the used keys; -inf and a zero row where no key was attendable).
    """
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    tok = (block_idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(2)  # [B,Hkv,T]
    inside = tok < n
    tok = tok.clamp_max(n - 1)
    ok = inside if key_valid is None else inside & torch.gather(key_valid[:, None, :].expand(b, hkv, n), 2, tok)
    index = tok[..., None].expand(-1, -1, -1, d)
    ks, vs = torch.gather(k, 2, index).float(), torch.gather(v, 2, index).float()
    logits = (q.float().view(b, hkv, g, d) @ ks.transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    logits = logits.masked_fill(~ok[:, :, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None].clamp_min(-1e30)).nan_to_num(0.0)
    out = weights @ vs
    return out.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq)


def _cpu_op(name: str = "decode_block_attention") -> Any:
    """torch.ops.hcs_decode.<name> once the CPU extension is loaded, or the reason it is
    not available (a str)."""
    from ._ext import load_extension

    status = load_extension("cpu")
    if status.module is None:
        return status.error or "the cpu extension did not load"
    try:
        return getattr(torch.ops.hcs_decode, name)
    except (AttributeError, RuntimeError) as exc:
        return f"the cpu extension lacks the decode op {name} ({exc})"


def _cpu_ops(name: str) -> Any:
    """The compiled op ``name``, or None when it is unavailable (torch ops serve instead)."""
    op = _cpu_op(name)
    return None if isinstance(op, str) else op


def decode_backend_reason(backend: str, q: torch.Tensor) -> str | None:
    """None when ``backend`` can run on q's device and dtype, else why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if q.device.type != "cpu" or q.dtype != torch.float32:
            return f"the cpu decode kernel takes float32 CPU tensors, got {q.dtype} on {q.device}"
        op = _cpu_op()
        return op if isinstance(op, str) else None
    if backend == "triton":
        from .decode_triton import unavailable_reason

        return unavailable_reason(q)
    raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")


def resolve_decode_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that runs: "auto" takes cpu, then triton, then torch (the first that
    can); a named backend that cannot run raises ValueError with its reason."""
    if backend == "auto":
        for name in ("cpu", "triton"):
            if decode_backend_reason(name, q) is None:
                return name
        return "torch"
    reason = decode_backend_reason(backend, q)
    if reason is not None:
        raise ValueError(f"decode backend {backend!r} cannot run: {reason}")
    return backend


def decode_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           block_size: int, key_valid: torch.Tensor | None = None, scale: float | None = None,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Attention of decode rows over given kept key blocks (see the reference for shapes).

    Returns:
        (out [B, Hq, D] in q's dtype, lse float32 [B, Hq], the backend that ran).

    Example:
        >>> q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
        >>> idx = torch.tensor([[[0, 3], [1, 3]]])      # blocks of 32 keys per kv head
        >>> out, lse, ran = decode_block_attention(q, k, v, idx, 32)
        >>> out.shape
        torch.Size([1, 4, 16])
    """
    _check_decode_operands(q, k, v, block_idx, block_size, key_valid)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    name = resolve_decode_backend(backend, q)
    if name == "cpu":
        out, lse = _cpu_op()(q, k, v, block_idx, block_size, key_valid, scale)
    elif name == "triton":
        from .decode_triton import decode_block_attention_triton

        out, lse = decode_block_attention_triton(q, k, v, block_idx, block_size, key_valid, scale)
    else:
        out, lse = decode_block_attention_reference(q, k, v, block_idx, block_size, key_valid, scale)
    return out, lse, name


def _check_decode_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           block_size: int, key_valid: torch.Tensor | None) -> None:
    for name, t, dim in (("q", q, 3), ("k", k, 4), ("v", v, 4), ("block_idx", block_idx, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"k and v must be [B, Hkv, N, D] matching q [B, Hq, D], got q={tuple(q.shape)}, "
                         f"k={tuple(k.shape)}, v={tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_idx.dtype != torch.int64 or tuple(block_idx.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"block_idx must be int64 [B, Hkv, K] = [{k.shape[0]}, {k.shape[1]}, K], "
                         f"got {block_idx.dtype} {tuple(block_idx.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_valid must be bool [B, N] = [{k.shape[0]}, {k.shape[2]}], "
                         f"got {key_valid.dtype} {tuple(key_valid.shape)}")


def _check_step_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    """A decode step's q [B, Hq, D] against its cache k, v [B, Hkv, N, D] (the cheap part of
    `_check_decode_operands`: the block indices are made by the step itself)."""
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2] \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"k and v must be [B, Hkv, N, D] matching q [B, Hq, 1, D] with Hkv dividing Hq, got "
                         f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.device != k.device or v.device != k.device:
        raise TypeError(f"q, k, v must share a dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool [B, N] = [{k.shape[0]}, {k.shape[2]}], "
                         f"got {key_valid.dtype} {tuple(key_valid.shape)}")


# -- one layer's policy ---------------------------------------------------------------------


@dataclass
class DecodeStats:
    """What one decode step did.

    Attributes:
        kept_fraction: kept blocks / blocks (1.0 when dense).
        backend: "cpu", "triton", "torch" (sparse) or "sdpa" (dense).
        fallback_reason: why the step ran dense, or None.
        num_blocks: key blocks in the cache; kept_blocks: kept per (batch, kv head).
        stats_update: "incremental", "rebuilt" or None (dense steps touch no statistics).
        block_idx: int64 [B, Hkv, kept_blocks], the kept blocks (sparse steps).
        score, block_size: the block score and block size the step used (sparse steps;
            `DecodeSparsityConfig.layout`).
    """

    kept_fraction: float
    backend: str
    fallback_reason: str | None = None
    num_blocks: int = 0
    kept_blocks: int = 0
    stats_update: str | None = None
    block_idx: torch.Tensor | None = field(default=None, repr=False)
    score: str | None = None
    block_size: int | None = None


class DecodeState:
    """One attention layer's decode-time sparsity: its `KeyBlockStats`, the policy of
    `DecodeSparsityConfig` and counters of what ran (`report`).

    Args:
        config: the policy (default `DecodeSparsityConfig()`).
        layer_index: the layer's index in its model (for ``config.dense_layers``), or None.
    """

    def __init__(self, config: DecodeSparsityConfig | None = None, *, layer_index: int | None = None) -> None:
        if config is not None and not isinstance(config, DecodeSparsityConfig):
            raise TypeError(f"config must be a DecodeSparsityConfig, got {type(config).__name__}")
        if layer_index is not None and (isinstance(layer_index, bool) or not isinstance(layer_index, int)
                                        or layer_index < 0):
            raise ValueError(f"layer_index must be an int >= 0 or None, got {layer_index!r}")
        self.layer_index = layer_index
        self.config = config if config is not None else DecodeSparsityConfig()
        score, block = self.config.layout("cpu")  # `_stats_for` changes it on another device
        self.stats = KeyBlockStats(block, score)
        self.last: DecodeStats | None = None
        self._counts: collections.Counter = collections.Counter()
        self._kept_sum = 0.0
        self._fallbacks: collections.Counter = collections.Counter()

    def set_config(self, config: DecodeSparsityConfig) -> None:
        """Change the policy (statistics are rebuilt when the block size or score changes)."""
        if not isinstance(config, DecodeSparsityConfig):
            raise TypeError(f"config must be a DecodeSparsityConfig, got {type(config).__name__}")
        self.config = config  # the statistics follow at the next step (`_stats_for`)

    def reset(self) -> None:
        """A new sequence starts (prefill): forget the statistics."""
        self.stats.reset()

    def _stats_for(self, device_type: str) -> tuple[str, int]:
        """The step's (score, block size) on ``device_type``; the statistics are rebuilt when
        they describe another score or block size."""
        score, block = self.config.layout(device_type)
        if self.stats.score != score or self.stats.block_size != block:
            self.stats = KeyBlockStats(block, score)
        return score, block

    def plan(self, num_keys: int, budget: float | None, device_type: str = "cpu") -> tuple[int, int] | str:
        """(kept blocks, blocks) for a sparse step on ``device_type`` (its block size:
        `DecodeSparsityConfig.layout`), or the reason to run dense."""
        c = self.config
        if not c.enabled:
            return "decode sparsity disabled"
        if self.layer_index is not None and self.layer_index < c.dense_layers:
            return f"dense layer: layer {self.layer_index} < dense_layers={c.dense_layers}"
        if c.budget is not None:
            budget = float(c.budget)
        if budget is None:
            return "no decode budget (no dial published and no fixed budget)"
        if num_keys < c.min_context:
            return f"short context: {num_keys} keys < min_context={c.min_context}"
        nb = -(-num_keys // c.layout(device_type)[1])
        keep = kept_block_count(nb, budget, c.sink_blocks, c.recent_blocks)
        if keep / nb > c.max_kept_fraction:
            return f"kept fraction {keep / nb:.2f} > max_kept_fraction={c.max_kept_fraction}"
        return keep, nb

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, budget: float | None = None,
               scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
               dense: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, DecodeStats]:
        """One decode step.

        Args:
            q: [B, Hq, 1, D]; k, v: [B, Hkv, N, D] (the whole cache, this step's key included).
            budget: kept fraction from the dial (k_attn(s)); the config's budget overrides it.
            key_padding_mask: bool [B, N], True = attend.
            dense: computes the dense output [B, Hq, 1, D] when the step runs dense
                (default: SDPA over every attendable key).

        Returns:
            (out [B, Hq, 1, D] in q's dtype, `DecodeStats`).
        """
        if q.dim() != 4 or q.shape[2] != 1:
            raise ValueError(f"q must be one decode row [B, Hq, 1, D], got {tuple(q.shape)}")
        plan = self.plan(k.shape[2], budget, q.device.type)
        if isinstance(plan, str):
            out = dense() if dense is not None else _dense_decode(q, k, v, scale, key_padding_mask)
            stats = DecodeStats(kept_fraction=1.0, backend="sdpa", fallback_reason=plan)
        else:
            keep, nb = plan
            c = self.config
            q3 = q[:, :, 0]
            _check_step_operands(q3, k, v, key_padding_mask)  # before any kernel reads them
            backend = resolve_decode_backend(c.backend, q3)
            # Triton (blocks a power of two >= 16): statistics and scores fused per score, then
            # the selection and attention kernels
            score, bs = self._stats_for(q.device.type)
            triton_ok = backend == "triton" and _pow2(bs) and bs >= 16
            fused = triton_ok and (score == "bound" or nb <= _triton_select_max())
            kind, scores = self.stats.update_and_score(k, key_padding_mask, q3, verify=c.verify_cache,
                                                       sink_blocks=c.sink_blocks, recent_blocks=c.recent_blocks,
                                                       fused=fused, scale=scale)
            if triton_ok and nb <= _triton_select_max():
                from .decode_triton import select_blocks_triton

                idx = select_blocks_triton(scores, keep)  # one launch; torch.topk takes several
            else:
                idx = select_key_blocks(scores, keep, sort=not triton_ok)
            if triton_ok:  # operands checked above; the public entry point's checks cost host time per step
                from .decode_triton import decode_block_attention_triton

                out3, _ = decode_block_attention_triton(q3, k, v, idx, bs, key_padding_mask,
                                                        float(scale) if scale is not None else q.shape[-1] ** -0.5)
                ran = "triton"
            else:
                out3, _, ran = decode_block_attention(q3, k, v, idx, bs, key_padding_mask, scale,
                                                      "torch" if backend == "triton" else backend)
            out = out3[:, :, None]
            stats = DecodeStats(kept_fraction=keep / nb, backend=ran, num_blocks=nb, kept_blocks=keep,
                                stats_update=kind, block_idx=idx, score=score, block_size=bs)
        self._record(stats)
        return out, stats

    def reset_stats(self) -> None:
        """Forget the counters of `report` (not the block statistics)."""
        self._counts.clear()
        self._fallbacks.clear()
        self._kept_sum = 0.0
        self.stats.updates = self.stats.rebuilds = 0

    def record_dense(self, reason: str) -> None:
        """Count a step that the caller ran dense itself because `plan` said ``reason``."""
        self._record(DecodeStats(kept_fraction=1.0, backend="sdpa", fallback_reason=reason))

    def _record(self, stats: DecodeStats) -> None:
        self.last = stats
        self._counts["calls"] += 1
        self._kept_sum += stats.kept_fraction
        if stats.fallback_reason is None:
            self._counts["sparse_calls"] += 1
            self._counts[f"backend:{stats.backend}"] += 1
        else:
            self._fallbacks[stats.fallback_reason.split(":", 1)[0]] += 1

    def report(self) -> dict[str, Any]:
        """calls, sparse_calls, mean_kept_fraction (dense steps count 1.0), backends (dict),
        fallback_reasons (dict), stats_updates / stats_rebuilds (incremental vs full)."""
        calls = self._counts["calls"]
        return {
            "calls": calls,
            "sparse_calls": self._counts["sparse_calls"],
            "mean_kept_fraction": self._kept_sum / calls if calls else math.nan,
            "backends": {k.split(":", 1)[1]: n for k, n in self._counts.items() if k.startswith("backend:")},
            "fallback_reasons": dict(self._fallbacks),
            "stats_updates": self.stats.updates,
            "stats_rebuilds": self.stats.rebuilds,
        }


def _triton_select_max() -> int:
    from .decode_triton import SELECT_MAX_BLOCKS

    return SELECT_MAX_BLOCKS


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                  key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of decode rows over every attendable key (GQA by repeating nothing: enable_gqa)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask.any(-1)[:, None, None, None], 0.0)
    return out
