"""Input validation and normalisation shared by every attention entry point.

Every public op funnels its tensors through `attention_inputs`, which checks shapes,
dtypes and devices *before* anything is launched and returns HND views, so backends
never see a malformed call.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .config import BLOCK_M, BLOCK_N

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("HND", "NHD")
#: Layout sanity checks (`attention_inputs`): no attention model has this many q heads
#: (the largest have 128). With this many, a sequence shorter than `IMPLAUSIBLE_SEQ` looks
#: like (batch, seq, heads, head_dim) read as HND (a warning, once); q heads that equal the
#: key length while q's length equals the k/v heads look like q and k/v given in different
#: layouts, read as grouped-query attention with hundreds of groups (an error).
IMPLAUSIBLE_HEADS = 256
IMPLAUSIBLE_SEQ = 16
_warned_implausible = False


@dataclass(frozen=True)
class AttentionInputs:
    """Validated attention operands in HND layout (views; not necessarily contiguous).

    Shapes: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D]; Hq is a multiple of Hkv (GQA/MQA).
    ``key_padding_mask`` is bool [B, Nk] with True meaning "attend", or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str
    is_causal: bool
    scale: float
    key_padding_mask: torch.Tensor | None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def len_q(self) -> int:
        return self.q.shape[2]

    @property
    def len_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.len_q / BLOCK_M)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.len_k / BLOCK_N)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to_layout(self, out_hnd: torch.Tensor) -> torch.Tensor:
        """Return an HND output in the caller's layout."""
        return out_hnd.transpose(1, 2) if self.layout == "NHD" else out_hnd


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim) or (batch, seq, heads, head_dim), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when None, else a finite float."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_key_padding_mask(mask: object, batch: int, len_k: int, device: torch.device) -> torch.Tensor | None:
    """A bool [B, Nk] mask (True = attend) on the inputs' device, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape [{batch}, {len_k}], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = attend), got {mask.dtype}")
    if tuple(mask.shape) != (batch, len_k):
        raise ValueError(f"key_padding_mask must have shape [batch, len_k] = [{batch}, {len_k}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    return mask


def attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "HND",
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> AttentionInputs:
    """Validate q/k/v and return them as HND views with the resolved scale.

    Raises:
        TypeError: non-tensors, integer or mixed dtypes, a non-bool padding mask.
        ValueError: wrong rank, mismatched batch/length/head_dim, heads that do not
            divide, mixed devices, causal with Nq != Nk, an unknown layout, empty tensors.
    """
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if layout == "NHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    names = "(batch, heads, seq, head_dim)" if layout == "HND" else "(batch, seq, heads, head_dim)"
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise ValueError(f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {names}, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"q, k and v must not be empty, got q={tuple(q.shape)}, k={tuple(k.shape)}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    # q's heads and length swapped relative to k/v's: q and k/v in different layouts
    swapped = heads_q == k.shape[2] and q.shape[2] == heads_kv and heads_q != heads_kv
    if heads_q % heads_kv != 0:
        raise ValueError(f"the number of q heads ({heads_q}) must be a multiple of the number of k/v heads "
                         f"({heads_kv}) for grouped-query attention"
                         + (f"; q and k/v look like different layouts: {_LAYOUT_HINT}" if swapped else ""))
    if heads_q >= IMPLAUSIBLE_HEADS:
        _check_plausible(q.shape, k.shape, layout, swapped)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"is_causal=True needs len_q == len_k (top-left aligned), got {q.shape[2]} and {k.shape[2]}")
    return AttentionInputs(
        q=q, k=k, v=v, layout=layout, is_causal=is_causal,
        scale=check_scale(scale, q.shape[3]),
        key_padding_mask=check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q.device),
    )


_LAYOUT_HINT = ("give q, k and v all in the same layout and name it: layout='HND' is (batch, heads, seq, "
                "head_dim), layout='NHD' is (batch, seq, heads, head_dim)")


def _check_plausible(q_shape: torch.Size, k_shape: torch.Size, layout: str, swapped: bool) -> None:
    """Refuse or warn about shapes with implausibly many heads (see `IMPLAUSIBLE_HEADS`);
    called only then, so the common path pays one comparison."""
    global _warned_implausible
    heads_q, len_q, heads_kv, len_k = q_shape[1], q_shape[2], k_shape[1], k_shape[2]
    if swapped:
        raise ValueError(f"q and k/v look like different layouts: read as layout={layout!r}, q has {heads_q} heads "
                         f"over {len_q} tokens and k/v {heads_kv} heads over {len_k} tokens, i.e. grouped-query "
                         f"attention with {heads_q // heads_kv} q heads per k/v head; {_LAYOUT_HINT}")
    if len_q < IMPLAUSIBLE_SEQ and not _warned_implausible:
        _warned_implausible = True
        other = "NHD" if layout == "HND" else "HND"
        warnings.warn(f"attention read as layout={layout!r} has {heads_q} q heads over {len_q} tokens; if the "
                      f"tensors are in the other layout, pass layout={other!r} ({_LAYOUT_HINT}). "
                      "This warning is shown once.", UserWarning, stacklevel=4)


def per_head(name: str, value: float | torch.Tensor, heads: int, device: torch.device) -> torch.Tensor:
    """A threshold as a float32 tensor [heads] (scalars broadcast; NaN refused)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.numel() not in (1, heads):
            raise ValueError(f"{name} must be a scalar or have one value per q head ({heads}), got shape {tuple(value.shape)}")
        if bool(torch.isnan(value.detach()).any()):  # where the value lives: a host tensor costs no GPU wait
            raise ValueError(f"{name} must not be NaN")
        return value.detach().to(device=device, dtype=torch.float32).expand(heads).contiguous()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise ValueError(f"{name} must not be NaN")
        return torch.full((heads,), float(value), device=device, dtype=torch.float32)
    raise TypeError(f"{name} must be a float or a 1-D per-head tensor, got {type(value).__name__}")
