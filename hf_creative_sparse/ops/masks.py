"""Block masks as data: prediction (SpargeAttn stage 1), validity and index lists.

A block mask is a bool tensor [B, Hq, ceil(Nq/128), ceil(Nk/64)]: entry (b, h, i, j) says
whether query block i of head h attends to key block j. Kernels take it as a compact
index list (`block_mask_to_lut`), in the manner of FlexAttention's ``kv_num_blocks`` /
``kv_indices`` and SpargeAttn's LUT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import BLOCK_M, BLOCK_N, BLOCK_RANKINGS, SparseAttentionConfig
from .inputs import AttentionInputs, attention_inputs, per_head
from .sampled_scores import sampled_block_mass


#: `predict_block_mask`'s rule when no threshold is given (a mass share; see
#: `SparseAttentionConfig.cdfthreshd` for why `sparse_attention` uses an error target instead).
DEFAULT_PREDICT_CDFTHRESHD = 0.995


def causal_block_mask(len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    """bool [Mq, Mk]: key block j holds a key that some query of block i may see
    (top-left aligned causal: key index <= query index)."""
    mq, mk = math.ceil(len_q / BLOCK_M), math.ceil(len_k / BLOCK_N)
    last_row = torch.clamp(torch.arange(mq, device=device) * BLOCK_M + BLOCK_M - 1, max=len_q - 1)
    first_col = torch.arange(mk, device=device) * BLOCK_N
    return first_col[None, :] <= last_row[:, None]


def diagonal_block_mask(len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    """bool [Mq, Mk]: key block j overlaps the token range of query block i. Causal
    prediction always keeps these so that every query sees at least itself."""
    mq, mk = math.ceil(len_q / BLOCK_M), math.ceil(len_k / BLOCK_N)
    row_lo = torch.arange(mq, device=device) * BLOCK_M
    row_hi = torch.clamp(row_lo + BLOCK_M - 1, max=len_q - 1)
    col_lo = torch.arange(mk, device=device) * BLOCK_N
    col_hi = torch.clamp(col_lo + BLOCK_N - 1, max=len_k - 1)
    return (col_lo[None, :] <= row_hi[:, None]) & (col_hi[None, :] >= row_lo[:, None])


def key_block_has_keys(key_padding_mask: torch.Tensor | None, batch: int, len_k: int, device: torch.device) -> torch.Tensor:
    """bool [B, Mk]: the key block holds at least one attendable key."""
    mk = math.ceil(len_k / BLOCK_N)
    if key_padding_mask is None:
        return torch.ones(batch, mk, dtype=torch.bool, device=device)
    padded = torch.nn.functional.pad(key_padding_mask, (0, mk * BLOCK_N - len_k), value=False)
    return padded.view(batch, mk, BLOCK_N).any(-1)


def attendable_blocks(inp: AttentionInputs) -> torch.Tensor:
    """bool [B, 1, Mq, Mk]: blocks with at least one (query, key) pair that attention may
    use (causal and key padding applied). Kept fractions are counted over these."""
    valid = key_block_has_keys(inp.key_padding_mask, inp.batch, inp.len_k, inp.device)[:, None, None, :]
    if inp.is_causal:
        valid = valid & causal_block_mask(inp.len_q, inp.len_k, inp.device)[None, None]
    return valid.expand(inp.batch, 1, inp.num_q_blocks, inp.num_k_blocks)


def pool_blocks(x: torch.Tensor, block: int, token_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-pool x [B, H, N, D] per block of ``block`` tokens and measure self-similarity.

    Returns (pooled [B, H, nb, D] float32, mean pairwise cosine similarity [B, H, nb]
    (self pairs included, as SpargeAttn), token count [B, 1, nb]). Padded and masked
    tokens are left out; an empty block has count 0, pooled 0, similarity 0.
    """
    if x.is_cuda:  # one fused pass on the GPU (ops/predict_cuda.py), when the extension is built
        from .predict_cuda import pool_blocks_cuda

        fused = pool_blocks_cuda(x, block, token_valid)
        if fused is not None:
            return fused
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):  # one compiled pass
        from .predict_cpu import pool_blocks_cpu

        fused = pool_blocks_cpu(x, block, token_valid)
        if fused is not None:
            return fused
    b, h, n, d = x.shape
    nb = math.ceil(n / block)
    pad = nb * block - n
    x32 = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(b, h, nb, block, d)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if token_valid is None else token_valid
    valid = torch.nn.functional.pad(valid, (0, pad), value=False).view(b, 1, nb, block, 1).float()
    count = valid.sum(-2)  # [B, 1, nb, 1]
    pooled = (x32 * valid).sum(-2) / count.clamp(min=1.0)
    unit = x32 / x32.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    unit_sum = (unit * valid).sum(-2)
    sim = (unit_sum * unit_sum).sum(-1) / (count.squeeze(-1) ** 2).clamp(min=1.0)
    return pooled, sim, count.squeeze(-1)


def _row_param(name: str, value: float | torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
    """A per-row selection parameter as float32 broadcastable to [B, Hq, Mq, 1]: a scalar or
    per-head [Hq] tensor (`per_head`), or a [B, Hq, Mq] tensor of per-(batch, head, query
    block) values (the target estimate's budgets)."""
    if isinstance(value, torch.Tensor) and value.dim() == 3:
        expected = (inp.batch, inp.heads_q, inp.num_q_blocks)
        if tuple(value.shape) != expected:
            raise ValueError(f"{name} as a 3-D tensor must have shape [B, Hq, Mq] = {list(expected)}, "
                             f"got {list(value.shape)}")
        return value.to(device=inp.device, dtype=torch.float32)[..., None]
    return per_head(name, value, inp.heads_q, inp.device).view(1, -1, 1, 1)


def _select_by_cdf(prob: torch.Tensor, thr: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, the fewest candidate blocks (by descending probability) whose mass
    reaches the threshold (broadcastable to [B, H, Mq, 1]); a threshold of 1 keeps every
    candidate."""
    sorted_prob, order = prob.sort(dim=-1, descending=True)
    cdf = sorted_prob.cumsum(-1)
    n_candidates = candidates.sum(-1, keepdim=True)
    n_select = (cdf < thr).sum(-1, keepdim=True) + 1
    n_select = torch.where(thr >= 1.0, n_candidates, torch.minimum(n_select, n_candidates))
    ranks = torch.arange(prob.shape[-1], device=prob.device)
    chosen_sorted = ranks < n_select
    return torch.zeros_like(candidates).scatter(-1, order, chosen_sorted)


def topk_block_counts(topk: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Blocks a top-k fraction selects per row: ceil(topk * #attendable blocks), at least
    one (float32, broadcast of ``topk`` [.., 1] against ``allowed`` [B, 1, Mq, Mk])."""
    n_allowed = allowed.sum(-1, keepdim=True).float()
    return torch.ceil(topk * n_allowed - 1e-6).clamp(min=1.0)


def _select_topk(prob: torch.Tensor, topk: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row, the ceil(topk * #attendable blocks) most probable candidates (>= 1)."""
    order = prob.sort(dim=-1, descending=True).indices
    n_select = torch.minimum(topk_block_counts(topk, allowed), candidates.sum(-1, keepdim=True).float())
    ranks = torch.arange(prob.shape[-1], device=prob.device)
    return torch.zeros_like(candidates).scatter(-1, order, ranks < n_select)


@dataclass
class BlockScores:
    """Stage 1 of the prediction before any selection rule (SpargeAttn's compressed map).

    Attributes:
        prob: float32 [B, Hq, Mq, Mk]: softmax(pooled_q @ pooled_k^T * scale) over the
            candidate blocks of each row, 0 elsewhere.
        candidates: bool [B, Hq, Mq, Mk]: attendable blocks a rule may drop (self-similar,
            not forced).
        forced: bool [B, Hq, Mq, Mk]: attendable blocks kept whatever the rule
            (non-self-similar rows and columns, sink, text, the causal diagonal and the
            recent window: the key blocks of the previous query block).
        allowed: bool [B, 1, Mq, Mk]: attendable blocks (`attendable_blocks`).
        pooled_k: float32 [B, Hkv, Mk, D]: mean of each key block's attendable keys (0 if
            none), reused by coarse compensation.
        count_k: float32 [B, 1, Mk]: attendable keys per key block.

    Causal inputs are scored strictly causally: query block i is scored with the pooled
    query (and self-similarity) of block i - 1, whose rows all precede block i's first row,
    and every block it may drop lies before that row (the diagonal is forced). So no row's
    mask depends on a later token.
    """

    prob: torch.Tensor
    candidates: torch.Tensor
    forced: torch.Tensor
    allowed: torch.Tensor
    pooled_k: torch.Tensor
    count_k: torch.Tensor


def _reaches_block(inp: AttentionInputs) -> torch.Tensor:
    """bool [Mq, Mk]: key block j holds a key at or after query block i's first row."""
    first_row = torch.arange(inp.num_q_blocks, device=inp.device) * BLOCK_M
    last_key = torch.clamp(torch.arange(inp.num_k_blocks, device=inp.device) * BLOCK_N + BLOCK_N - 1, max=inp.len_k - 1)
    return last_key[None, :] >= first_row[:, None]


def _key_block_extremes(k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block and channel, the max and min over its attendable keys (float32
    [B, Hkv, Mk, D]; 0 for an empty block)."""
    b, h, n, d = k.shape
    mk = math.ceil(n / BLOCK_N)
    pad = mk * BLOCK_N - n
    valid = torch.ones(b, n, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    valid = torch.nn.functional.pad(valid, (0, pad), value=False).view(b, 1, mk, BLOCK_N, 1)
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, mk, BLOCK_N, d)
    k_max = kb.masked_fill(~valid, float("-inf")).amax(3).float()
    k_min = kb.masked_fill(~valid, float("inf")).amin(3).float()
    empty = ~valid.any(3)
    return k_max.masked_fill(empty, 0.0), k_min.masked_fill(empty, 0.0)


def _previous_block(x: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """x [B, H, Mq, ...] shifted by one query block (block i gets block i - 1's value)."""
    first = torch.full_like(x[:, :, :1], fill)
    return torch.cat([first, x[:, :, :-1]], dim=2)


def block_scores(
    inp: AttentionInputs,
    *,
    simthreshd1: float | torch.Tensor = 0.6,
    attention_sink: bool = False,
    dense_prefix: int = 0,
    dense_suffix: int = 0,
    smooth_k: bool = False,
    ranking: str = "mean",
) -> BlockScores:
    """The compressed attention map and the blocks that must stay (see `BlockScores`).

    ``ranking``: "mean" scores a key block by pooled_q . pooled_k (SpargeAttn); "bound" by
    the upper bound pooled_q+ . k_max + pooled_q- . k_min over the block's keys (Quest's
    per-channel bound), which finds blocks with a few heavy keys that a mean dilutes: on
    LM-like causal inputs it halved the error of a top-k mask, on local inputs -20%, on
    video-like inputs the same; "sample" by the exact softmax mass of a few rows per query
    block (ops/sampled_scores.py), which is what error targets use: on video-like inputs it
    cut the error of the same budget 2.4x against the mean, to within 1.15x of the oracle.
    """
    if ranking not in BLOCK_RANKINGS:
        raise ValueError(f"ranking must be one of {BLOCK_RANKINGS}, got {ranking!r}")
    heads, group = inp.heads_q, inp.heads_q // inp.heads_kv
    sim_thr = per_head("simthreshd1", simthreshd1, heads, inp.device).view(1, heads, 1)
    k = inp.k
    if smooth_k:  # SpargeAttn centres k before pooling; softmax is invariant to it
        k = k - k.float().mean(dim=-2, keepdim=True).to(k.dtype)

    pooled_q, sim_q, _ = pool_blocks(inp.q, BLOCK_M, None)
    pooled_k, sim_k, count_k = pool_blocks(k, BLOCK_N, inp.key_padding_mask)
    q_similar = sim_q > sim_thr  # [B, H, Mq]
    if inp.is_causal:  # strict causality: score block i from rows before it
        pooled_q, q_similar = _previous_block(pooled_q, 0.0), _previous_block(q_similar, True)
    pooled_kq, sim_kq = pooled_k, sim_k
    if group > 1:
        pooled_kq = pooled_k.repeat_interleave(group, dim=1)
        sim_kq = sim_k.repeat_interleave(group, dim=1)
    k_similar = sim_kq > sim_thr  # [B, H, Mk]

    allowed = attendable_blocks(inp)  # [B, 1, Mq, Mk]
    if ranking == "bound":
        k_max, k_min = _key_block_extremes(k, inp.key_padding_mask)
        if group > 1:
            k_max, k_min = k_max.repeat_interleave(group, dim=1), k_min.repeat_interleave(group, dim=1)
        score = (pooled_q.clamp(min=0) @ k_max.transpose(-1, -2) + pooled_q.clamp(max=0) @ k_min.transpose(-1, -2))
        score = score * inp.scale
    elif ranking == "sample":
        score = None
    else:
        score = pooled_q @ pooled_kq.transpose(-1, -2) * inp.scale
    forced = ~k_similar[:, :, None, :] | ~q_similar[:, :, :, None]
    if attention_sink:
        forced[..., 0] = True
    if dense_prefix > 0:
        forced[:, :, : math.ceil(min(dense_prefix, inp.len_q) / BLOCK_M), :] = True
        forced[..., : math.ceil(min(dense_prefix, inp.len_k) / BLOCK_N)] = True
    if dense_suffix > 0:
        forced[:, :, max(inp.len_q - dense_suffix, 0) // BLOCK_M:, :] = True
        forced[..., max(inp.len_k - dense_suffix, 0) // BLOCK_N:] = True
    if inp.is_causal:  # the diagonal, and the recent window: the key blocks of the previous query block
        diagonal = diagonal_block_mask(inp.len_q, inp.len_k, inp.device)
        recent = torch.cat([torch.zeros_like(diagonal[:1]), diagonal[:-1]], dim=0)
        forced = forced | (diagonal | recent)[None, None]
    forced = forced & allowed
    # Forced blocks stay candidates of the cdf/top-k ranking (as SpargeAttn: only non-similar
    # key columns leave it), so a rule's count of kept blocks means what it did before.
    candidates = allowed & k_similar[:, :, None, :]
    if inp.is_causal:  # blocks holding keys at or after the query block's first row are forced, never ranked
        candidates = candidates & ~_reaches_block(inp)[None, None]
    if score is None:  # sampled mass, renormalised over the candidates
        mass = sampled_block_mass(inp) * candidates
        prob = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        score = score.masked_fill(~candidates, float("-inf"))
        prob = torch.softmax(score, dim=-1).nan_to_num(0.0)  # rows without candidates -> 0
    return BlockScores(prob=prob, candidates=candidates, forced=forced, allowed=allowed,
                       pooled_k=pooled_k, count_k=count_k)


def select_blocks(scores: BlockScores, inp: AttentionInputs, *, cdfthreshd: float | torch.Tensor | None = None,
                  topk: float | torch.Tensor | None = None) -> torch.Tensor:
    """The block mask (bool [B, Hq, Mq, Mk]) of a selection rule on `block_scores`: the top
    ``topk`` fraction of attendable blocks per row, or the fewest reaching ``cdfthreshd`` of
    the predicted mass; forced blocks are kept on top. Thresholds: scalars, per-head [Hq],
    or [B, Hq, Mq]."""
    if topk is not None:
        keep = _select_topk(scores.prob, _row_param("topk", topk, inp), scores.candidates, scores.allowed)
    elif cdfthreshd is not None:
        keep = _select_by_cdf(scores.prob, _row_param("cdfthreshd", cdfthreshd, inp), scores.candidates)
    else:
        raise ValueError("one of cdfthreshd or topk must be set")
    return ((keep | scores.forced) & scores.allowed).contiguous()


def predict_from_inputs(
    inp: AttentionInputs,
    *,
    simthreshd1: float | torch.Tensor = 0.6,
    cdfthreshd: float | torch.Tensor | None = 0.995,
    topk: float | torch.Tensor | None = None,
    attention_sink: bool = False,
    dense_prefix: int = 0,
    dense_suffix: int = 0,
    smooth_k: bool = False,
) -> torch.Tensor:
    """`predict_block_mask` on already validated inputs (see there)."""
    if cdfthreshd is None and topk is None:
        raise ValueError("one of cdfthreshd or topk must be set")
    per_row = any(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (cdfthreshd, topk))
    if inp.q.is_cuda and not inp.is_causal and not per_row:  # fused GPU prediction (ops/predict_cuda.py)
        from .predict_cuda import predict_cuda

        fused = predict_cuda(inp, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                             attention_sink=attention_sink, dense_prefix=dense_prefix, dense_suffix=dense_suffix,
                             smooth_k=smooth_k)
        if fused is not None:
            return fused
    scores = block_scores(inp, simthreshd1=simthreshd1, attention_sink=attention_sink, dense_prefix=dense_prefix,
                          dense_suffix=dense_suffix, smooth_k=smooth_k)
    return select_blocks(scores, inp, cdfthreshd=cdfthreshd, topk=topk)


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: str = "HND",
    is_causal: bool = False,
    scale: float | None = None,
    simthreshd1: float | torch.Tensor = 0.6,
    cdfthreshd: float | torch.Tensor | None = None,
    topk: float | torch.Tensor | None = None,
    attention_sink: bool = False,
    dense_prefix: int = 0,
    dense_suffix: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    smooth_k: bool = False,
) -> torch.Tensor:
    """Predict which 128x64 blocks of the attention map matter (SpargeAttn stage 1).

    Q and K are mean-pooled per block; a block is self-similar when the mean cosine
    similarity of its tokens exceeds ``simthreshd1``. The compressed map
    softmax(pooled_q @ pooled_k^T * scale) over self-similar, attendable key blocks then
    selects, per query block, the fewest key blocks whose cumulative mass reaches
    ``cdfthreshd`` (or the top ``topk`` fraction of attendable blocks). Blocks that are not
    self-similar are always kept (query blocks: the whole row; key blocks: the whole
    column). ``attention_sink`` keeps key block 0; ``dense_prefix`` / ``dense_suffix``
    tokens stay dense as rows and columns; causal masks apply, and the diagonal blocks are
    always kept so every query sees itself. Fully padded key blocks are never kept.
    Causal prediction is strictly causal: query block i is scored with block i - 1's pooled
    query, so no row's mask depends on a later token (`BlockScores`).

    Thresholds may be floats or per-q-head 1-D tensors; give ``cdfthreshd`` or ``topk``
    (neither: ``cdfthreshd=0.995``).

    Returns:
        bool tensor [B, Hq, ceil(Nq/128), ceil(Nk/64)].

    Example:
        >>> import torch, hf_creative_sparse as hcs
        >>> q = torch.randn(1, 2, 300, 64); k = torch.randn(1, 2, 300, 64)
        >>> hcs.predict_block_mask(q, k, topk=0.5).shape
        torch.Size([1, 2, 3, 5])
    """
    inp = attention_inputs(q, k, k, layout=layout, is_causal=is_causal, scale=scale,
                           key_padding_mask=key_padding_mask)
    for name, value in (("dense_prefix", dense_prefix), ("dense_suffix", dense_suffix)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if cdfthreshd is None and topk is None:
        cdfthreshd = DEFAULT_PREDICT_CDFTHRESHD
    # the same ranges as SparseAttentionConfig, so both entry points refuse the same values
    SparseAttentionConfig(simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk)
    with torch.no_grad():
        return predict_from_inputs(inp, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                                   attention_sink=attention_sink, dense_prefix=dense_prefix,
                                   dense_suffix=dense_suffix, smooth_k=smooth_k)


def check_block_mask(block_mask: object, inp: AttentionInputs, name: str = "block_mask") -> torch.Tensor:
    """Validate a user block mask and return it as bool [B, Hq, Mq, Mk].

    Accepts bool or integer tensors (non-zero = keep) whose batch and head dims are
    either full or 1 (broadcast). The causal and padding validity is applied on top.
    """
    expected = (inp.batch, inp.heads_q, inp.num_q_blocks, inp.num_k_blocks)
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {list(expected)}, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool and (block_mask.is_floating_point() or block_mask.is_complex()):
        raise TypeError(f"{name} must be a bool (or integer 0/1) tensor, got {block_mask.dtype}")
    if block_mask.dim() != 4 or block_mask.shape[2:] != expected[2:] or \
            block_mask.shape[0] not in (1, inp.batch) or block_mask.shape[1] not in (1, inp.heads_q):
        raise ValueError(f"{name} must have shape [B, Hq, ceil(Nq/128), ceil(Nk/64)] = {list(expected)} "
                         f"(B and Hq may be 1), got {list(block_mask.shape)}")
    if block_mask.device != inp.device:
        raise ValueError(f"{name} is on {block_mask.device} but q is on {inp.device}")
    mask = block_mask if block_mask.dtype == torch.bool else block_mask != 0
    return (mask.expand(expected) & attendable_blocks(inp)).contiguous()


def attendable_block_count(inp: AttentionInputs) -> int:
    """Attendable blocks summed over B and Hq; on the host (no device sync) unless a key
    padding mask decides it."""
    if inp.key_padding_mask is not None:
        return int(attendable_blocks(inp).sum().item()) * inp.heads_q
    mk = inp.num_k_blocks
    if not inp.is_causal:
        per_head = inp.num_q_blocks * mk
    else:  # query block i reaches key blocks 0 .. (last row of i) // BLOCK_N
        per_head = sum(min(mk, min(i * BLOCK_M + BLOCK_M - 1, inp.len_q - 1) // BLOCK_N + 1)
                       for i in range(inp.num_q_blocks))
    return per_head * inp.batch * inp.heads_q


def kept_fraction(block_mask: torch.Tensor, inp: AttentionInputs) -> tuple[float, int]:
    """(kept blocks / attendable blocks, attendable blocks summed over B and Hq)."""
    kept, total = kept_fraction_on_device(block_mask, inp)
    return float(kept), total


def kept_fraction_on_device(block_mask: torch.Tensor, inp: AttentionInputs) -> tuple[torch.Tensor, int]:
    """`kept_fraction` with the fraction left a 0-d tensor on the mask's device (no wait)."""
    total = attendable_block_count(inp)
    kept = block_mask.sum(dtype=torch.float64)
    return (kept / total if total else torch.ones((), dtype=torch.float64, device=block_mask.device)), total


def block_mask_to_lut(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact index lists of a block mask [B, H, Mq, Mk].

    Returns (kv_counts int32 [B, H, Mq], kv_indices int32 [B, H, Mq, Mk]): row (b, h, i)
    visits key blocks kv_indices[b, h, i, :kv_counts[b, h, i]] in ascending order; the
    tail is zero-filled.
    """
    mk = block_mask.shape[-1]
    cols = torch.arange(mk, device=block_mask.device, dtype=torch.int32)
    key = torch.where(block_mask, cols, cols + mk)
    ordered = key.sort(dim=-1).values
    indices = torch.where(ordered < mk, ordered, torch.zeros_like(ordered))
    counts = block_mask.sum(-1, dtype=torch.int32)
    return counts.contiguous(), indices.to(torch.int32).contiguous()
