"""The compiled kernels as PyTorch custom ops (`torch.library`), with fake (meta)
implementations, so `torch.compile` traces through attention instead of breaking the
graph around an opaque Python call (SpargeAttn disables compilation instead).

Ops (namespace ``hf_creative_sparse``):

* ``block_sparse_fwd(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale,
  pvthreshd) -> (out, pv_counts, lse)``: the kernel interface shared by csrc/cuda and csrc/cpu.
  q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; kv_counts int32 [B, Hq, Mq] and kv_indices int32
  [B, Hq, Mq, Mk] from `masks.block_mask_to_lut`; key_padding_mask bool [B, Nk] or None;
  pvthreshd float32 [Hq] (inf = off). Returns out [B, Hq, Nq, D] in q's dtype and
  pv_counts int64 [2] = (skipped, visited) (row, block) pairs, lse float32 [B, Hq, Nq] (natural
  log-sum-exp of each row's used keys, -inf for a row with none; docs/DESIGN.md "Partial
  softmax"). CUDA: the CUDA extension; CPU: the CPU extension, or the reference when that is
  not built.
* ``sparse_attention(q, k, v, key_padding_mask, is_causal, scale, simthreshd1, cdfthreshd,
  topk, pvthreshd, attention_sink, dense_prefix, dense_suffix, min_seq_len,
  max_kept_fraction, backend) -> (out, stats)``: the whole `ops.sparse_attention` policy
  (prediction, fallback, dispatch) as one op, for patched models under `torch.compile`.
  HND in and out; stats float32 [4] on the CPU = (kept_fraction, pv_skipped_fraction,
  predicted_kept_fraction or NaN, 1.0 if it fell back to dense SDPA else 0.0).
"""

from __future__ import annotations

import math

import torch

from ._ext import load_extension

_NS = "hf_creative_sparse"


def _lut_to_mask(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int) -> torch.Tensor:
    """Inverse of `block_mask_to_lut`: bool [B, H, Mq, mk]."""
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    live = slots < kv_counts[..., None]
    mask = torch.zeros(*kv_counts.shape, mk + 1, dtype=torch.bool, device=kv_indices.device)
    target = torch.where(live, kv_indices.long(), torch.full_like(kv_indices, mk, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :mk]


def _reference_fwd(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd):
    from .dispatch import get_backend
    from .inputs import attention_inputs
    from .masks import check_block_mask

    inp = attention_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    mask = check_block_mask(_lut_to_mask(kv_counts, kv_indices, inp.num_k_blocks), inp)
    result = get_backend("reference").run(inp, mask, pvthreshd.to(torch.float32))
    if result.lse is None:
        raise RuntimeError("the reference backend returned no lse; block_sparse_fwd must return one")
    counts = torch.tensor([result.pv_skipped, result.pv_visited], dtype=torch.int64, device=q.device)
    return result.out, counts, result.lse


@torch.library.custom_op(f"{_NS}::block_sparse_fwd", mutates_args=(), device_types="cuda")
def block_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                     kv_indices: torch.Tensor, key_padding_mask: torch.Tensor | None, is_causal: bool,
                     scale: float, pvthreshd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward over the kept blocks listed in (kv_counts, kv_indices)."""
    status = load_extension("cuda")
    if status.module is None:
        raise RuntimeError(f"the CUDA extension is unavailable: {status.error}")
    out, pv_counts, lse = status.module.forward(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal,
                                                float(scale), pvthreshd)
    return out, pv_counts, lse


@block_sparse_fwd.register_kernel("cpu")
def _block_sparse_fwd_cpu(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd):
    status = load_extension("cpu")
    if status.module is None:
        return _reference_fwd(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd)
    return status.module.forward(q.contiguous(), k.contiguous(), v.contiguous(), kv_counts, kv_indices,
                                 key_padding_mask, is_causal, float(scale), pvthreshd.to(torch.float32).contiguous())


@block_sparse_fwd.register_fake
def _block_sparse_fwd_fake(q, k, v, kv_counts, kv_indices, key_padding_mask, is_causal, scale, pvthreshd):
    b, hq, nq, d = q.shape
    return q.new_empty(b, hq, nq, d), q.new_empty(2, dtype=torch.int64), q.new_empty(b, hq, nq, dtype=torch.float32)


STATS_FIELDS = ("kept_fraction", "pv_skipped_fraction", "predicted_kept_fraction", "fell_back")


@torch.library.custom_op(f"{_NS}::sparse_attention", mutates_args=())
def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                        is_causal: bool, scale: float, simthreshd1: torch.Tensor, cdfthreshd: torch.Tensor | None,
                        topk: torch.Tensor | None, pvthreshd: torch.Tensor, attention_sink: bool, dense_prefix: int,
                        dense_suffix: int, min_seq_len: int, max_kept_fraction: float,
                        backend: str, target_l1: float = 0.0, compensate: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.sparse_attention` (HND) with thresholds as per-head tensors; see the module doc.
    ``target_l1`` 0 and no cdfthreshd/topk means the default target; ``compensate`` -1 is
    unset, 0/1 off/on."""
    from .config import SparseAttentionConfig
    from .attention import sparse_attention_inputs
    from .inputs import attention_inputs

    cfg = SparseAttentionConfig(
        simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk, target_l1=target_l1 if target_l1 > 0 else None,
        compensate=None if compensate < 0 else bool(compensate),
        pvthreshd=pvthreshd, attention_sink=attention_sink, dense_prefix=dense_prefix, dense_suffix=dense_suffix,
        min_seq_len=min_seq_len, max_kept_fraction=max_kept_fraction, backend=backend)
    inp = attention_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    out, stats = sparse_attention_inputs(inp, cfg)
    predicted = stats.predicted_kept_fraction
    values = [stats.kept_fraction, stats.pv_skipped_fraction,
              math.nan if predicted is None else predicted, 1.0 if stats.fallback_reason else 0.0]
    return out.contiguous(), torch.tensor(values, dtype=torch.float32)


@sparse_attention_op.register_fake
def _sparse_attention_fake(q, k, v, key_padding_mask, is_causal, scale, simthreshd1, cdfthreshd, topk, pvthreshd,
                           attention_sink, dense_prefix, dense_suffix, min_seq_len, max_kept_fraction, backend,
                           target_l1=0.0, compensate=-1):
    b, hq, nq, d = q.shape
    return q.new_empty(b, hq, nq, d), torch.empty(len(STATS_FIELDS), dtype=torch.float32, device="cpu")


def _heads(value, heads: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(heads).contiguous()
    return torch.full((heads,), float(value), dtype=torch.float32, device=device)


def compiled_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config=None, *,
                              is_causal: bool = False, scale: float | None = None,
                              key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_attention` on HND tensors through the ``hf_creative_sparse::sparse_attention``
    op: one node in a `torch.compile` graph (no graph break), stats as a tensor
    (`STATS_FIELDS`).

    Example:
        >>> import torch
        >>> from hf_creative_sparse.ops.custom_ops import compiled_sparse_attention
        >>> q = k = v = torch.randn(1, 2, 256, 32)
        >>> out, stats = compiled_sparse_attention(q, k, v)
        >>> out.shape, stats.shape
        (torch.Size([1, 2, 256, 32]), torch.Size([4]))
    """
    from .config import SparseAttentionConfig

    cfg = config if config is not None else SparseAttentionConfig()
    heads, device = q.shape[1], q.device
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return sparse_attention_op(
        q, k, v, key_padding_mask, is_causal, scale, _heads(cfg.effective_simthreshd1, heads, device),
        None if cfg.cdfthreshd is None or cfg.topk is not None else _heads(cfg.cdfthreshd, heads, device),
        None if cfg.topk is None else _heads(cfg.topk, heads, device), _heads(cfg.pvthreshd, heads, device),
        cfg.sink_for(is_causal), cfg.dense_prefix, cfg.dense_suffix, cfg.min_seq_len, float(cfg.max_kept_fraction),
        cfg.backend, float(cfg.target_l1 or 0.0), -1 if cfg.compensate is None else int(cfg.compensate))


__all__ = ["STATS_FIELDS", "block_sparse_fwd", "compiled_sparse_attention", "sparse_attention_op"]
