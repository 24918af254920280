"""Independent float64 references for tests: dense attention restricted to an element
mask, and a per-row loop implementation of the pv-threshold skip. Deliberately written
differently from hf_creative_sparse/ops/reference.py (dense N x N, small inputs only)."""

from __future__ import annotations

import math

import torch


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "NHD" else x


def element_mask(block_mask: torch.Tensor | None, nq: int, nk: int, *, is_causal: bool = False,
                 key_padding_mask: torch.Tensor | None = None, batch: int = 1, heads: int = 1) -> torch.Tensor:
    """bool [B, H, Nq, Nk]: which (query, key) pairs attention may use."""
    if block_mask is None:
        mask = torch.ones(batch, heads, nq, nk, dtype=torch.bool)
    else:
        mask = block_mask.cpu().repeat_interleave(128, dim=2)[:, :, :nq].repeat_interleave(64, dim=3)[..., :nk]
    if is_causal:
        mask = mask & torch.ones(nq, nk, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.cpu()[:, None, None, :]
    return mask


def masked_attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Dense softmax attention in float64 over ``mask`` (HND in, HND out); rows with no
    usable key are zero."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    mask = mask.expand(s.shape)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def pv_skip_attention_f64(q, k, v, block_mask, pvthreshd: float, *, is_causal=False, key_padding_mask=None,
                          scale=None) -> tuple[torch.Tensor, int, int]:
    """Per-row loop: visit kept blocks in ascending order, drop a block whose max falls
    more than pvthreshd below the running max; softmax over what is left."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    skipped = visited = 0
    for bi in range(b):
        for h in range(hq):
            s_all = (q[bi, h] @ k[bi, h // group].T) * scale
            for r in range(nq):
                used = torch.zeros(k.shape[2], dtype=torch.bool)
                running = -math.inf
                for j in range(block_mask.shape[-1]):
                    if not bool(block_mask[bi, h, r // 128, j]):
                        continue
                    cols = torch.arange(j * 64, min((j + 1) * 64, k.shape[2]))
                    if is_causal:
                        cols = cols[cols <= r]
                    if key_padding_mask is not None:
                        cols = cols[key_padding_mask[bi, cols].cpu()]
                    if len(cols) == 0:
                        continue
                    visited += 1
                    block_max = float(s_all[r, cols].max())
                    if math.isfinite(running) and block_max - running < -pvthreshd:
                        skipped += 1
                        continue
                    used[cols] = True
                    running = max(running, block_max)
                if used.any():
                    p = torch.softmax(s_all[r, used], dim=-1)
                    out[bi, h, r] = p @ v[bi, h // group, used]
    return out, skipped, visited


def rel_max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 when both are all zero)."""
    denom = ref.abs().max().item()
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    return err / denom if denom > 0 else err


def structured_qkv(b: int, hq: int, hkv: int, n: int, d: int, *, dtype=torch.float32, seed: int = 0,
                   layout: str = "HND"):
    """q/k/v with smooth structure along the sequence (blocks are self-similar, attention is
    peaked), so the predictor actually drops blocks, unlike on white noise."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.rand(1, d, generator=g) * 0.02
    phase = torch.rand(1, d, generator=g) * 6.28

    def make(h: int, shift: float) -> torch.Tensor:
        base = torch.sin(pos * freqs + phase + shift)  # [N, D]
        t = base[None, None] * 3.0 + 0.3 * torch.randn(b, h, n, d, generator=g)
        return t

    q, k, v = make(hq, 0.0), make(hkv, 0.5), torch.randn(b, hkv, n, d, generator=g)
    if layout == "NHD":
        q, k, v = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    return q.to(dtype), k.to(dtype), v.to(dtype)
