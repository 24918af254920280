"""Structured attention inputs that look like real attention, for judging speed at a stated error.

Random q/k/v make every attention row nearly uniform: nothing can be skipped and every
sparse method looks either useless or (with a loose threshold) wrong. Real attention is
different: rows have entropy well below uniform, mass sits near the query's position or on
a few content-related tokens, and neighbouring tokens have similar queries, keys and
values. This module builds q, k, v [B, H, N, D] whose logits ``scale * q.k`` (scale =
``head_dim ** -0.5``, the default of every attention call) have that structure, with a
known design, so benchmarks and tests can measure speed and relative L1 on inputs of
several kinds.

How the logits are built (per head; every term is an inner product of features, so q and k
are ordinary tensors any kernel can take):

* Position term ``A * mean_f cos(w_f . (x_i - x_j))``: random Fourier features of the
  token's grid coordinates x (frame, row, column). With Gaussian frequencies w_f of spread
  ``1 / length`` this is a Gaussian kernel of the offset, peak ``A`` logits (the head's
  sharpness), plus the sidelobes a finite number of frequencies leaves: a long tail, as in
  real (RoPE) attention.
* Content term ``A_c * u_seg(i) . u_seg(j)``: tokens belong to segments (objects: Voronoi
  cells around seeds that drift across frames in video; topics in text) with random unit
  embeddings, so content-driven heads attend whole segments, far apart in the sequence.
* Noise ``sigma * g_i . g'_j``: per-token content noise of ``sigma`` logits.
* Bias dimension: a constant 1 in every query against a per-key bias (text tokens in video,
  the attention sink and heavy hitters in causal text).
* Offset dimension: a constant in every query times a constant in every key. It moves
  every logit of a row by the same amount (the softmax is unchanged) but gives q and k the
  large shared component real projections have (SageAttention subtracts K's mean for this
  reason), so neighbouring tokens' q and k are similar: block self-similarity (mean cosine)
  spreads over ~0.4-0.9 per head, as predictors such as SpargeAttn's expect.

Families (``FAMILIES``):

* ``"video"``: video DiT heads on a frames x height x width grid, text tokens first (or last
  with ``text_last=True``, as HunyuanVideo). Head kinds cycle spatial, temporal, spatial,
  global (``head_kinds``): spatial heads attend nearby positions in the same and adjacent
  frames; temporal heads the same position across all frames; global heads their content
  segment. Sharpness and extent are drawn per head, so peaked and diffuse heads mix.
* ``"local"``: a 1-D sequence, peaked and banded (window of a few to ~50 tokens).
* ``"random"``: white noise q, k, v ~ N(0, 1): nothing to skip, the control case.
* ``"causal_text"``: LM-like, to be run with ``is_causal=True``: recency heads, heavy-hitter
  heads (an attention sink at token 0 and a few tokens with large key bias), and topic
  heads (contiguous topic segments, topics recurring along the sequence).

Values are smooth in position plus segment and noise terms with a per-channel mean (real
values are not zero-mean), so that relative L1 of a diffuse row's output is meaningful.

Everything is drawn from one ``torch.Generator`` on ``device`` seeded by ``seed``: the same
call gives the same tensors on the same device type (CPU and CUDA streams differ).
Built in float32 and cast to ``dtype`` at the end.

Example:
    >>> from benchmarks.realistic_inputs import make_inputs
    >>> q, k, v = make_inputs("video", 1, 4, 226 + 13 * 30 * 45, 64, grid=(13, 30, 45), text_len=226)
    >>> tuple(q.shape)
    (1, 4, 17776, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FAMILIES = ("video", "local", "random", "causal_text")
VIDEO_KINDS = ("spatial", "temporal", "spatial", "global")
TEXT_KINDS = ("recency", "heavy_hitter", "topic", "recency")
LOCAL_KINDS = ("local",)


@dataclass(frozen=True)
class HeadSpec:
    """One key/value head's logit recipe (all amplitudes in logits, lengths in tokens).

    ``pos_amp``: peak of the position term; ``length``: (frame, row, column) kernel widths
    (inf = flat along that axis); ``content_amp``: same-segment logit; ``noise``: std of
    the per-token noise term; ``key_bias``: logit added to the special keys (text tokens,
    sink and heavy hitters).
    """

    kind: str
    pos_amp: float
    length: tuple[float, float, float]
    content_amp: float
    noise: float
    key_bias: float


def head_kinds(family: str, heads: int) -> list[str]:
    """The kind of each key/value head, in order (the cycle the generator uses)."""
    _check_family(family)
    cycle = {"video": VIDEO_KINDS, "causal_text": TEXT_KINDS, "local": LOCAL_KINDS, "random": ("random",)}[family]
    return [cycle[h % len(cycle)] for h in range(heads)]


def default_grid(video_tokens: int) -> tuple[int, int, int]:
    """A (frames, height, width) grid with exactly ``video_tokens`` cells, frames <= 32 and
    the most square frame; used when ``make_inputs`` gets no ``grid``."""
    if video_tokens < 1:
        raise ValueError(f"video_tokens must be >= 1, got {video_tokens}")
    best: tuple[float, tuple[int, int, int]] | None = None
    for t in range(1, min(32, video_tokens) + 1):
        if video_tokens % t:
            continue
        per_frame = video_tokens // t
        for h in range(1, math.isqrt(per_frame) + 1):
            if per_frame % h == 0:
                w = per_frame // h
                # Prefer square frames, then a few frames (video) over one long frame.
                cost = math.log(w / h) + 0.25 * abs(math.log(t / 8.0))
                if best is None or cost < best[0]:
                    best = (cost, (t, h, w))
    assert best is not None
    return best[1]


def make_inputs(
    family: str,
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    *,
    grid: tuple[int, int, int] | None = None,
    text_len: int = 0,
    text_last: bool = False,
    kv_heads: int | None = None,
    common_offset: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured q [B, H, N, D] and k, v [B, Hkv, N, D] of one ``family`` (see module doc).

    ``grid`` (frames, height, width) and ``text_len``/``text_last`` apply to ``"video"``:
    ``seq_len`` must equal ``text_len + frames * height * width`` (``grid=None`` picks
    ``default_grid(seq_len - text_len)``). ``kv_heads`` (default ``heads``) gives GQA: the
    query heads of one group share the group's kind and keys, with their own sharpness.
    Batch elements share the head recipes and differ in content and noise.
    ``common_offset`` adds the softmax-invariant q/k offsets that make blocks self-similar
    (module doc; False leaves every logit and the attention the same up to a per-row
    constant, for tests and for measuring what the offsets do). ``"random"`` has none.
    """
    _check_family(family)
    for name, val in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8 (room for position, content and bias features), got {head_dim}")
    hkv = heads if kv_heads is None else kv_heads
    if isinstance(hkv, bool) or not isinstance(hkv, int) or hkv < 1 or heads % hkv:
        raise ValueError(f"kv_heads must be a positive int dividing heads={heads}, got {kv_heads!r}")
    for name, flag in (("common_offset", common_offset), ("text_last", text_last)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    if family != "video" and (text_len or grid is not None or text_last):
        raise ValueError(f"grid, text_len and text_last apply to family 'video' only, got family {family!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))

    if family == "random":
        shapes = ((batch, heads, seq_len, head_dim), (batch, hkv, seq_len, head_dim), (batch, hkv, seq_len, head_dim))
        q, k, v = (torch.randn(s, generator=gen, device=device) for s in shapes)
        return q.to(dtype), k.to(dtype), v.to(dtype)

    if family == "video":
        video_len = seq_len - text_len
        if video_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must exceed text_len ({text_len})")
        if grid is None:
            grid = default_grid(video_len)
        if (len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
                or math.prod(grid) != video_len):
            raise ValueError(f"grid must be 3 positive ints (frames, height, width) with product "
                             f"seq_len - text_len = {video_len}, got {grid!r}")
        layout = _video_layout(grid, text_len, text_last, batch, device, gen)
    else:
        layout = _sequence_layout(family, seq_len, batch, device, gen)

    specs = _head_specs(family, hkv, gen)
    q_parts, k_parts, v_parts = [], [], []
    group = heads // hkv
    for g, spec in enumerate(specs):
        # Query heads of a group: the group's recipe, sharpness scaled by 0.7-1.4.
        sharp = torch.exp(torch.empty(group, device=device).uniform_(math.log(0.7), math.log(1.4), generator=gen))
        qg, kg, vg = _head_features(spec, layout, head_dim, sharp, gen, common_offset)
        q_parts.append(qg)
        k_parts.append(kg)
        v_parts.append(vg)
    q = torch.cat(q_parts, dim=1)
    k = torch.cat(k_parts, dim=1)
    v = torch.cat(v_parts, dim=1)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


# --------------------------------------------------------------------------- internals

@dataclass(frozen=True)
class _Layout:
    """Per-token geometry shared by all heads. ``pos`` [N, 3] float (frame, row, column;
    zeros for text), ``is_grid`` [N] bool (False for text tokens), ``segment`` [B, N] long,
    ``special`` [B, N] float (key-bias multiplier: 1 for text / sink, 0.4-1 for heavy
    hitters, 0 otherwise), ``n_segments``."""

    pos: torch.Tensor
    is_grid: torch.Tensor
    segment: torch.Tensor
    special: torch.Tensor
    n_segments: int


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _video_layout(grid: tuple[int, int, int], text_len: int, text_last: bool, batch: int,
                  device: torch.device, gen: torch.Generator) -> _Layout:
    t_n, h_n, w_n = grid
    idx = torch.arange(t_n * h_n * w_n, device=device)
    coords = torch.stack([idx // (h_n * w_n), (idx // w_n) % h_n, idx % w_n], dim=1).float()
    # Objects: Voronoi cells around seeds drifting linearly across frames (about one object
    # per 300 cells of a frame, 4..24 of them).
    n_seg = max(4, min(24, (h_n * w_n) // 300))
    start = torch.rand(batch, n_seg, 2, generator=gen, device=device) * torch.tensor([h_n, w_n], device=device)
    drift = torch.randn(batch, n_seg, 2, generator=gen, device=device) * 0.05 * max(h_n, w_n)
    # centre[b, i, s] = start[b, s] + drift[b, s] * frame(i): [B, Nv, S, 2]
    centre = start[:, None, :, :] + drift[:, None, :, :] * coords[None, :, 0, None, None]
    dist = (coords[None, :, None, 1:] - centre).square().sum(-1)
    seg_video = dist.argmin(-1)                                             # [B, Nv]
    seg_text = torch.randint(0, n_seg, (batch, text_len), generator=gen, device=device)
    zeros = torch.zeros(text_len, 3, device=device)
    text_flag = torch.zeros(text_len, dtype=torch.bool, device=device)
    grid_flag = torch.ones(len(idx), dtype=torch.bool, device=device)
    if text_last:
        pos, is_grid = torch.cat([coords, zeros]), torch.cat([grid_flag, text_flag])
        segment = torch.cat([seg_video, seg_text], dim=1)
    else:
        pos, is_grid = torch.cat([zeros, coords]), torch.cat([text_flag, grid_flag])
        segment = torch.cat([seg_text, seg_video], dim=1)
    special = (~is_grid).float().expand(batch, -1).contiguous()
    return _Layout(pos, is_grid, segment, special, n_seg)


def _sequence_layout(family: str, n: int, batch: int, device: torch.device, gen: torch.Generator) -> _Layout:
    pos = torch.zeros(n, 3, device=device)
    pos[:, 2] = torch.arange(n, device=device, dtype=torch.float32)
    is_grid = torch.ones(n, dtype=torch.bool, device=device)
    # Topics: contiguous runs of ~64-512 tokens, each one of n_seg topics that recur.
    n_seg = 12
    run = torch.randint(64, 513, (batch, n // 64 + 2), generator=gen, device=device)
    bounds = run.cumsum(1)
    segment_run = torch.searchsorted(bounds, torch.arange(n, device=device).expand(batch, -1).contiguous(), right=True)
    topic_of_run = torch.randint(0, n_seg, (batch, bounds.shape[1] + 1), generator=gen, device=device)
    segment = topic_of_run.gather(1, segment_run)
    special = torch.zeros(batch, n, device=device)
    if family == "causal_text":
        # Attention sink at token 0 plus ~1 heavy hitter per 512 tokens (punctuation-like).
        special[:, 0] = 1.0
        n_hh = max(1, n // 512)
        hh = torch.randint(1, max(2, n), (batch, n_hh), generator=gen, device=device)
        strength = 0.4 + 0.6 * torch.rand(batch, n_hh, generator=gen, device=device)
        special.scatter_(1, hh, strength)
    return _Layout(pos, is_grid, segment, special, n_seg)


def _loguniform(lo: float, hi: float, gen: torch.Generator) -> float:
    u = float(torch.rand(1, generator=gen, device=gen.device))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _head_specs(family: str, hkv: int, gen: torch.Generator) -> list[HeadSpec]:
    """Per-kv-head recipes. Ranges chosen so that rows are far below uniform entropy, with
    sharp (peak 12-16 logits, 1-2 token kernels) and diffuse (peak ~5, wide) heads mixed."""
    inf = math.inf
    specs = []
    for kind in head_kinds(family, hkv):
        if kind == "spatial":
            s = _loguniform(1.2, 6.0, gen)                       # spatial extent, cells
            specs.append(HeadSpec(kind, _loguniform(6.0, 18.0, gen), (_loguniform(0.6, 2.0, gen), s, s),
                                  0.0, _loguniform(0.3, 1.0, gen), _loguniform(0.5, 3.0, gen)))
        elif kind == "temporal":
            s = _loguniform(0.5, 1.2, gen)
            specs.append(HeadSpec(kind, _loguniform(8.0, 16.0, gen), (inf, s, s),
                                  0.0, _loguniform(0.3, 1.0, gen), _loguniform(0.5, 3.0, gen)))
        elif kind == "global":
            specs.append(HeadSpec(kind, _loguniform(1.0, 3.0, gen), (2.0, 8.0, 8.0),
                                  _loguniform(4.0, 9.0, gen), _loguniform(0.5, 1.2, gen), _loguniform(1.0, 4.0, gen)))
        elif kind in ("local", "recency"):
            width = _loguniform(1.5, 48.0, gen)
            specs.append(HeadSpec(kind, _loguniform(8.0, 16.0, gen), (inf, inf, width),
                                  0.0, _loguniform(0.3, 1.0, gen), _loguniform(3.0, 6.0, gen)))
        elif kind == "heavy_hitter":
            specs.append(HeadSpec(kind, _loguniform(3.0, 6.0, gen), (inf, inf, _loguniform(2.0, 8.0, gen)),
                                  0.0, _loguniform(0.3, 1.0, gen), _loguniform(8.0, 12.0, gen)))
        elif kind == "topic":
            specs.append(HeadSpec(kind, _loguniform(1.0, 3.0, gen), (inf, inf, 64.0),
                                  _loguniform(4.0, 8.0, gen), _loguniform(0.5, 1.2, gen), _loguniform(3.0, 6.0, gen)))
        else:  # pragma: no cover - head_kinds only yields the kinds above
            raise AssertionError(kind)
    return specs


def _head_features(spec: HeadSpec, layout: _Layout, d: int, sharp: torch.Tensor, gen: torch.Generator,
                   common_offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, G, N, d], k [B, 1, N, d], v [B, 1, N, d] for one kv head and its G query heads.

    Feature split of the d dims: 1 bias dim, 2F position dims, content (segment embedding
    + noise), 1 offset dim: F = d // 4 for content heads, else as many as leave 8 content
    dims (more frequencies, lower sidelobes). Logits = q.k * d**-0.5, so q carries sqrt(d).
    """
    device = layout.pos.device
    b, n = layout.segment.shape
    g = sharp.numel()
    f = d // 4 if spec.content_amp > 0 else max(1, (d - 10) // 2)
    c = d - 2 - 2 * f

    # Position features: Gaussian frequencies per axis with spread 1/length (0 for flat axes).
    inv_len = torch.tensor([0.0 if math.isinf(x) else 1.0 / x for x in spec.length], device=device)
    omega = torch.randn(f, 3, generator=gen, device=device) * inv_len
    ang = layout.pos @ omega.T                                               # [N, F]
    phi = torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(f)           # phi_i.phi_j = mean cos
    phi = phi * layout.is_grid[:, None]                                      # text: no position

    emb = torch.randn(b, layout.n_segments, c, generator=gen, device=device)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    u = emb.gather(1, layout.segment[..., None].expand(-1, -1, c))           # [B, N, C] unit
    noise_q = torch.randn(b, n, c, generator=gen, device=device) / math.sqrt(c)
    noise_k = torch.randn(b, n, c, generator=gen, device=device)

    sq = sharp.view(1, g, 1, 1)
    amp_c = math.sqrt(spec.content_amp) if spec.content_amp > 0 else 0.0
    # q.k = A*phi_i.phi_j + A_c*u_i.u_j + noise*(gq_i.gk_j)/sqrt(c) + key_bias*special_j
    q_pos = spec.pos_amp * phi[None, None].expand(b, 1, n, 2 * f)
    q_con = amp_c * u[:, None] + spec.noise * noise_q[:, None]
    q_bias = torch.ones(b, 1, n, 1, device=device)
    q = torch.cat([q_bias * spec.key_bias, q_pos, q_con], dim=-1) * sq      # [B, G, N, d - 1]
    k_con = amp_c * u + noise_k * (1.0 if spec.noise > 0 else 0.0)
    k = torch.cat([layout.special[..., None], phi[None].expand(b, n, 2 * f), k_con], dim=-1)[:, None]
    q = q * math.sqrt(d)
    # Balance the norms of q and k (the product, hence the logits, is unchanged).
    r = (q.square().mean().sqrt() / k.square().mean().sqrt().clamp_min(1e-12)).sqrt()
    q, k = q / r, k * r

    # Values: smooth in position (low-frequency features), segment, noise, per-channel mean.
    omega_v = torch.randn(f, 3, generator=gen, device=device) * (0.5 * inv_len.clamp(max=1.0) + 0.02)
    ang_v = layout.pos @ omega_v.T
    smooth = torch.cat([ang_v.cos(), ang_v.sin()], dim=-1) @ torch.randn(2 * f, d, generator=gen, device=device)
    smooth = smooth / math.sqrt(2 * f)
    seg_v = torch.randn(b, layout.n_segments, d, generator=gen, device=device).gather(
        1, layout.segment[..., None].expand(-1, -1, d))
    mean = torch.randn(d, generator=gen, device=device)
    v = (smooth[None] + 0.7 * seg_v + 0.5 * torch.randn(b, n, d, generator=gen, device=device) + 0.5 * mean)[:, None]

    # Common offsets (the q/k biases real projections have, which SageAttention's "smooth K"
    # subtracts): q_o = alpha_h for every query, k_o = beta for every key, so every logit
    # moves by the same alpha_h * beta / sqrt(d) and the softmax does not change; but blocks
    # become self-similar as in real models (offset energy 0.5-6x the features' per head).
    rho = torch.exp(torch.empty(g + 1, device=device).uniform_(math.log(0.5), math.log(6.0), generator=gen))
    if not common_offset:
        rho = torch.zeros_like(rho)
    alpha = (rho[:g] * q.square().sum(-1).mean(dim=(0, 2))).sqrt().view(1, g, 1, 1)
    beta = (rho[g] * k.square().sum(-1).mean()).sqrt()
    q = torch.cat([q, alpha.expand(b, g, n, 1)], dim=-1)
    k = torch.cat([k, beta.expand(b, 1, n, 1)], dim=-1)
    return q, k, v
