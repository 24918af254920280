"""Error targets at a call site: a single `sparse_attention(..., target_l1=...)` call
measures its budgets once and later calls from the same line reuse them.

Measuring costs a share of dense attention (ops/estimate.py), so the caller's file and line,
with the shapes and the config, key a cache of measurements, one per distinct input (the
key fingerprint), re-measured every `TARGET_REMEASURE_CALLS` calls. Every host wait counts
here: a reused call reads one small fingerprint (none when the very key tensor comes back),
keeps its budgets on the host and leaves its statistics on the device.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attention import (EARLY_FALLBACK_CACHE_SIZE, _dense, _early_fallback_reason, _mean_topk, early_fallback,
                        sparse_attention_inputs)
from .config import SparseAttentionConfig, SparseStats
from .inputs import AttentionInputs

#: A call site re-measures its budgets every this many calls (`target_at_call_site`); a
#: site whose measurement keeps saying dense doubles that, up to the max. A measurement
#: costs 0.7-2.9 dense calls on an H200 (Wan / CogVideoX shapes), so 64 keeps it at 1-5% of
#: the time; inputs that change (the key fingerprint) re-measure at once anyway.
TARGET_REMEASURE_CALLS = 64
TARGET_REMEASURE_MAX_CALLS = 256
#: Distinct inputs (by key fingerprint) a call site keeps measurements for: one line that
#: serves every layer of a model finds each layer's own (oldest dropped first).
SITE_INPUTS = 64
_SITE_BUDGETS: collections.OrderedDict[tuple, list["_SiteBudgets"]] = collections.OrderedDict()


def target_at_call_site(inp: AttentionInputs, cfg: SparseAttentionConfig,
                         site: tuple[str, int]) -> tuple[torch.Tensor, SparseStats]:
    """An error-target call through the budgets its call site measured last for inputs like
    these.

    Measuring costs a share of dense attention (ops/estimate.py), so a call site (the
    caller's file and line, with the shapes and the config) measures on its first call and
    every `TARGET_REMEASURE_CALLS` calls, and the calls between reuse those per-block
    budgets as explicit top-k fractions (so the policy judges them by what they cost). Budgets
    apply only to inputs that look the same (the block-pooled keys, `SAME_INPUTS_COSINE`):
    a site keeps up to `SITE_INPUTS` measurements, one per distinct input (the layers of a
    model calling from one line each find their own), and measures inputs it has not seen.
    Patched models keep budgets per layer instead (`state.LayerState`).
    """
    if early_fallback(inp, cfg, 1, True) is not None:
        return sparse_attention_inputs(inp, cfg)  # no budget can pay at this size: no site, no fingerprint
    key = (site, inp.q.shape, inp.k.shape, inp.dtype, inp.device, inp.is_causal, inp.key_padding_mask is None,
           repr(sorted(cfg.to_dict().items())))
    entries = _SITE_BUDGETS.get(key)
    match = fingerprint = None
    if entries:
        match = _same_key_tensor(entries, inp.k)
        if match is None:
            with torch.no_grad():
                fingerprint = _key_fingerprint(inp)
            match = _matching_entry(entries, fingerprint)
    entry = entries[match] if match is not None else None
    if entry is not None and entry.calls < entry.interval:
        entry.calls += 1
        if entry.budgets is None:  # the last measurement said dense: no budget pays here
            out, stats = _dense(inp, entry.reason, None, 0, None)
        else:
            out, stats = sparse_attention_inputs(inp, cfg.with_budgets(entry.budgets, inp.is_causal),
                                                 budgets_judged=True)
        stats.target_l1, stats.estimated_l1 = entry.target, entry.estimated
        return out, stats
    out, stats = sparse_attention_inputs(inp, cfg)
    if stats.budgets is not None:
        # non-causal budgets are per head (the fused GPU prediction takes those); causal ones
        # per query block (early blocks measured from fewer rows run denser)
        # kept on the host: configs validate their thresholds there, so a reuse call never waits for the GPU
        budgets = (stats.budgets if inp.is_causal else stats.head_budgets.float().amax(0)).cpu()
        dense = stats.fallback_reason is not None
        reason = stats.fallback_reason
        if not dense and cfg.backend == "auto":
            # the reuse calls are judged as explicit budgets (ranking and compensation included):
            # when that says dense, say so now, so they run dense at once instead of revalidating
            reuse = cfg.with_budgets(budgets, inp.is_causal)
            reason = _early_fallback_reason(inp, reuse, 1, True, _mean_topk(reuse))
            dense = reason is not None
        interval = TARGET_REMEASURE_CALLS
        if dense and entry is not None and entry.budgets is None:
            interval = min(entry.interval * 2, TARGET_REMEASURE_MAX_CALLS)  # dense again: measure less often
        if fingerprint is None:  # measured now: the first input here, or the same key tensor as an entry's
            if entry is not None:
                fingerprint = entry.fingerprint
            else:
                with torch.no_grad():
                    fingerprint = _key_fingerprint(inp)
        measured = _SiteBudgets(None if dense else budgets, 1, interval, stats.target_l1, stats.estimated_l1,
                                fingerprint, f"{reason} (measured at this call site; re-measured within "
                                             f"{interval} calls)" if dense else None,
                                weakref.ref(inp.k), inp.k._version)
        if entries is None:
            if len(_SITE_BUDGETS) >= EARLY_FALLBACK_CACHE_SIZE:
                _SITE_BUDGETS.popitem(last=False)
            entries = _SITE_BUDGETS[key] = []
        if match is not None:
            entries[match] = measured
        else:
            if len(entries) >= SITE_INPUTS:
                entries.pop(0)
            entries.append(measured)
    return out, stats


def _same_key_tensor(entries: list["_SiteBudgets"], k: torch.Tensor) -> int | None:
    """The entry measured on this very key tensor, unmodified since (a weak reference: a new
    tensor is never taken for a dead one), or None. Calls that pass the same tensors again
    skip the fingerprint and its host wait."""
    for i, entry in enumerate(entries):
        if entry.key_ref is not None and entry.key_ref() is k and entry.key_version == k._version:
            return i
    return None


def _matching_entry(entries: list["_SiteBudgets"], fingerprint: np.ndarray) -> int | None:
    """The index of the first entry whose inputs look like ``fingerprint``'s (per kv head
    cosine >= `SAME_INPUTS_COSINE`), or None; on the host."""
    for i, entry in enumerate(entries):
        if entry.fingerprint.shape == fingerprint.shape and \
                bool(((entry.fingerprint * fingerprint).sum(-1) >= SAME_INPUTS_COSINE).all()):
            return i
    return None


@dataclass
class _SiteBudgets:
    budgets: torch.Tensor | None  # None: the measurement ran dense
    calls: int
    interval: int
    target: float | None
    estimated: float | None
    fingerprint: np.ndarray
    reason: str | None
    key_ref: Any = None  # weakref to the key tensor measured on
    key_version: int = -1


#: Cosine similarity (per kv head) of the block-pooled keys above which a call site's
#: budgets still apply: consecutive denoising steps of one layer stay above 0.99, another
#: layer or another input at the same call site falls far below.
SAME_INPUTS_COSINE = 0.95


#: Key tokens per (batch, kv head) in a call site's input fingerprint, evenly spaced: few,
#: since every host op on it counts (128 tokens cost ~1 ms of host time per call on an H200
#: host; distinct layers' keys stay near cosine 0 with 32, consecutive steps near 1).
FINGERPRINT_TOKENS = 32


def _key_fingerprint(inp: AttentionInputs) -> np.ndarray:
    """Evenly spaced key tokens, centred and L2-normalised per (batch, kv head): float32
    [B, Hkv, T * D] on the host. One small copy (the only host wait of a reused call):
    comparing on the host takes no more launches, where the block-pooled keys and a device
    cosine took ~20 small ops (~0.7 ms of host time per call on an H200 host)."""
    step = max(1, inp.len_k // FINGERPRINT_TOKENS)
    keys = inp.k[:, :, ::step][:, :, :FINGERPRINT_TOKENS].float().cpu().numpy()  # [B, Hkv, T, D]
    keys = keys - keys.mean(axis=2, keepdims=True)  # a bias shared by every key says nothing of the input
    flat = keys.reshape(keys.shape[0], keys.shape[1], -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
