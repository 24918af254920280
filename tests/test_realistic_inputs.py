"""benchmarks.realistic_inputs: structured inputs whose dense attention has the designed structure."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.realistic_inputs import FAMILIES, default_grid, head_kinds, make_inputs

GRID = (6, 32, 32)
N = math.prod(GRID)


def _probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Dense float64 softmax rows [H, R, N] of batch 0 (GQA: keys repeated per group)."""
    group = q.shape[1] // k.shape[1]
    kk = k[0].double().repeat_interleave(group, dim=0)
    s = q[0, :, rows].double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.arange(k.shape[2])[None, None, :] > rows[None, :, None], -math.inf)
    return s.softmax(-1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def _grid_offsets(rows: torch.Tensor) -> torch.Tensor:
    """|offset| [R, N, 3] (frame, row, column) between each sampled query and every key."""
    t, h, w = GRID
    idx = torch.arange(N)
    coords = torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=1)
    return (coords[rows][:, None, :] - coords[None]).abs()


@pytest.fixture(scope="module")
def video():
    q, k, _ = make_inputs("video", 1, 8, N, 64, grid=GRID, seed=0)
    rows = torch.linspace(0, N - 1, 96).long()
    return _probs(q, k, rows), _grid_offsets(rows)


def test_spatial_heads_attend_near_the_query(video):
    p, off = video
    near = (off[..., 0] <= 1) & (off[..., 1] <= 6) & (off[..., 2] <= 6)
    frac = near.double().mean()
    kinds = head_kinds("video", 8)
    spatial = [h for h, kind in enumerate(kinds) if kind == "spatial"]
    mass = torch.stack([(p[h] * near).sum(-1).mean() for h in spatial])
    # The sharpest spatial heads hold most of their mass in ~6% of the keys; every spatial
    # head concentrates there well above chance (diffuse heads included).
    assert mass.max() > 0.9
    assert (mass / frac).min() > 2.0
    # Control: white noise does not.
    q, k, _ = make_inputs("random", 1, 1, N, 64, seed=0)
    p_rand = _probs(q, k, torch.linspace(0, N - 1, 96).long())
    assert (p_rand[0] * near).sum(-1).mean() / frac < 1.5


def test_temporal_heads_attend_the_same_position_across_frames(video):
    p, off = video
    same = (off[..., 1] <= 1) & (off[..., 2] <= 1)
    other_frames = same & (off[..., 0] >= 1)
    frac = same.double().mean()
    for h, kind in enumerate(head_kinds("video", 8)):
        if kind == "temporal":
            assert (p[h] * same).sum(-1).mean() / frac > 20
            assert (p[h] * other_frames).sum(-1).mean() > 0.1  # not just the query's own frame


def test_entropy_below_uniform_with_peaked_and_diffuse_heads(video):
    p, _ = video
    ent = _entropy(p).mean(-1) / math.log(N)
    assert ent.mean() < 0.75
    assert ent.min() < 0.45 and ent.max() > 0.6


def test_text_tokens_have_no_position_and_go_last_with_text_last():
    text = 64
    q, k, _ = make_inputs("video", 1, 1, text + N, 64, grid=GRID, text_len=text, text_last=True, seed=0)
    rows = torch.cat([torch.arange(N - 32, N), torch.arange(N, N + text)])
    ent = _entropy(_probs(q, k, rows)[0])
    # Text queries (last rows) spread over the video; the spatial head's video queries are peaked.
    assert ent[32:].mean() > ent[:32].mean() + 2.0


def test_causal_text_rows_are_peaked_with_a_sink():
    q, k, _ = make_inputs("causal_text", 1, 4, 2048, 128, seed=3)
    rows = torch.arange(1024, 2048, 16)
    p = _probs(q, k, rows, causal=True)
    ent = _entropy(p).mean(-1) / torch.log(rows.double() + 1).mean()
    assert ent.max() < 0.75
    hh = [h for h, kind in enumerate(head_kinds("causal_text", 4)) if kind == "heavy_hitter"]
    assert p[hh[0], :, 0].mean() > 100 / 1536  # the sink gets far more than its share


def test_local_rows_are_banded():
    q, k, _ = make_inputs("local", 1, 2, 1500, 64, seed=1)
    rows = torch.arange(100, 1400, 50)
    p = _probs(q, k, rows)
    band = (torch.arange(1500)[None, :] - rows[:, None]).abs() <= 64
    assert (p * band).sum(-1).mean() > 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtype_gqa_and_determinism(family):
    kw = {"grid": (2, 5, 7), "text_len": 3} if family == "video" else {}
    n = 73 if family == "video" else 75
    q, k, v = make_inputs(family, 2, 6, n, 32, kv_heads=2, dtype=torch.bfloat16, seed=5, **kw)
    assert q.shape == (2, 6, n, 32) and k.shape == v.shape == (2, 2, n, 32)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert all(torch.isfinite(t.float()).all() for t in (q, k, v))
    again = make_inputs(family, 2, 6, n, 32, kv_heads=2, dtype=torch.bfloat16, seed=5, **kw)
    other = make_inputs(family, 2, 6, n, 32, kv_heads=2, dtype=torch.bfloat16, seed=6, **kw)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    assert not torch.equal(q, other[0])
    # Batch elements differ (content), head groups differ (recipes).
    assert not torch.equal(k[0], k[1]) and not torch.equal(k[:, 0], k[:, 1])


def test_common_offset_keeps_attention_and_makes_blocks_self_similar():
    from hf_creative_sparse.ops.masks import pool_blocks

    kw = {"grid": (2, 16, 24), "text_len": 40}
    q, k, _ = make_inputs("video", 1, 4, 40 + 2 * 16 * 24, 64, seed=2, **kw)
    q0, k0, _ = make_inputs("video", 1, 4, 40 + 2 * 16 * 24, 64, seed=2, common_offset=False, **kw)
    rows = torch.arange(0, q.shape[2], 37)
    torch.testing.assert_close(_probs(q, k, rows), _probs(q0, k0, rows), atol=1e-5, rtol=1e-4)
    sim = [pool_blocks(t, block, None)[1].mean().item() for t, block in ((q, 128), (k, 64), (q0, 128), (k0, 64))]
    assert sim[0] > 0.5 and sim[1] > 0.5, sim  # as in real models (SpargeAttn's threshold is 0.6)
    assert sim[2] < sim[0] - 0.2 and sim[3] < sim[1] - 0.2, sim


def test_default_grid():
    assert math.prod(default_grid(17550)) == 17550
    t, h, w = default_grid(32760)
    assert t * h * w == 32760 and 1 < t <= 32
    assert default_grid(4096) in {(4, 32, 32), (16, 16, 16)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        make_inputs("audio", 1, 1, 64, 64)
    with pytest.raises(ValueError, match="grid"):
        make_inputs("video", 1, 1, 64, 64, grid=(2, 4, 4))
    with pytest.raises(ValueError, match="kv_heads"):
        make_inputs("local", 1, 4, 64, 64, kv_heads=3)
    with pytest.raises(ValueError, match="video"):
        make_inputs("local", 1, 1, 64, 64, text_len=4)
    with pytest.raises(ValueError, match="head_dim"):
        make_inputs("local", 1, 1, 64, 4)
    with pytest.raises(TypeError, match="text_last"):
        make_inputs("video", 1, 1, 64, 64, text_last="yes")
    with pytest.raises(TypeError, match="common_offset"):
        make_inputs("local", 1, 1, 64, 64, common_offset=1)
    with pytest.raises(TypeError, match="dtype"):
        make_inputs("local", 1, 1, 64, 64, dtype=torch.int32)
