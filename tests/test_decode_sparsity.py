"""Decode-time KV-block sparsity (ops/decode.py, csrc/cpu/decode_attn.cpp, ops/decode_triton.py)
against float64 references, and its wiring into transformers' generate."""

import math
import os

import pytest
import torch

from hf_creative_sparse.creative.control import SparsityController, set_current_sparsity
from hf_creative_sparse.ops import decode as dm

CPU_READY = dm.decode_backend_reason("cpu", torch.zeros(1)) is None
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not CPU_READY, reason="cpu extension not built"))]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    BACKENDS.append("triton")


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def reference_f64(q, k, v, block_idx, block_size, valid, scale):
    """Float64 softmax attention of each query head over exactly the keys of its kv head's
    listed blocks (a per-head loop, no gathering tricks)."""
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            keys = sorted(t for blk in block_idx[bi, h // g].tolist()
                          for t in range(blk * block_size, min((blk + 1) * block_size, n))
                          if valid is None or bool(valid[bi, t]))
            if not keys:
                continue
            kk, vv = k[bi, h // g, keys].double(), v[bi, h // g, keys].double()
            w = torch.softmax((kk @ q[bi, h].double()) * scale, dim=0)
            out[bi, h] = w @ vv
    return out


def random_blocks(b, hkv, nb, kept, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(nb, generator=g)[:kept] for _ in range(b * hkv)]).view(b, hkv, kept)


# (B, Hq, Hkv, N, D, block_size, kept): odd lengths, GQA and MHA, several head dims
SHAPES = [(2, 8, 2, 1000, 64, 32, 9), (1, 4, 4, 77, 40, 16, 3), (3, 6, 1, 515, 128, 64, 4), (2, 4, 2, 33, 16, 16, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_kept_block_attention_equals_float64_reference(backend, shape, padded):
    b, hq, hkv, n, d, bs, kept = shape
    dev = _device(backend)
    g = torch.Generator().manual_seed(n + d)
    q, k, v = torch.randn(b, hq, d, generator=g), torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    nb = -(-n // bs)
    idx = random_blocks(b, hkv, nb, min(kept, nb), n)
    valid = None
    if padded:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[-1, : n // 2] = False  # left padding of the last row
        valid[0, n - 3:] = False     # and a few padded keys at the end of the first
    if backend == "triton" and bs < 16:
        pytest.skip("triton needs blocks of >= 16 keys")
    ref = reference_f64(q, k, v, idx, bs, valid, 0.2)
    # twice: on CUDA the second call launches the compiled kernels directly (ops/triton_launch.py)
    for _ in range(2):
        out, lse, ran = dm.decode_block_attention(q.to(dev), k.to(dev), v.to(dev), idx.to(dev), bs,
                                                  None if valid is None else valid.to(dev), 0.2, backend)
        assert ran == backend
        assert (out.cpu().double() - ref).abs().max() < 2e-5
    if backend == "triton" and dev == "cuda":
        from hf_creative_sparse.ops.decode_triton import _launch

        assert _launch.decode_partial_kernel.direct_launches > 0 and _launch.decode_merge_kernel.direct_launches > 0
    # lse: natural log of the softmax denominator over the used keys
    assert torch.isfinite(lse).all() or padded


def test_row_without_attendable_key_is_zero_and_lse_minus_inf():
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    valid = torch.ones(1, 40, dtype=torch.bool)
    valid[0, :32] = False
    idx = torch.tensor([[[0]]])  # only the fully padded block
    for backend in ["torch"] + (["cpu"] if CPU_READY else []):
        out, lse, _ = dm.decode_block_attention(q, k, v, idx, 32, valid, 0.5, backend)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_one_equals_dense(backend):
    """budget 1.0 (every block kept, run by the kernel, not the fallback) equals float64 dense."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, n, d = 2, 8, 2, 333, 32
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :50] = False
    state = dm.DecodeState(dm.DecodeSparsityConfig(budget=1.0, max_kept_fraction=1.0, min_context=0, block_size=16,
                                                   backend=backend))
    out, stats = state.attend(q.to(dev), k.to(dev), v.to(dev), scale=0.3, key_padding_mask=valid.to(dev))
    assert stats.fallback_reason is None and stats.backend == backend and stats.kept_fraction == 1.0
    kk, vv = (t.double().repeat_interleave(hq // hkv, 1) for t in (k, v))
    logits = (q.double() @ kk.transpose(-1, -2)) * 0.3
    ref = logits.masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1) @ vv
    assert (out.cpu().double() - ref).abs().max() < 2e-5


@pytest.mark.parametrize("use_cpu_op", [False, pytest.param(True, marks=pytest.mark.skipif(not CPU_READY, reason="no cpu ext"))])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("score", ["bound", "mass"])
def test_incremental_block_statistics_equal_recomputation(monkeypatch, use_cpu_op, padded, score):
    if not use_cpu_op:
        monkeypatch.setattr(dm, "_cpu_ops", lambda name: None)
    g = torch.Generator().manual_seed(5)
    b, h, n0, d, bs = 2, 3, 101, 24, 16
    keys = torch.randn(b, h, n0 + 40, d, generator=g)
    valid = torch.ones(b, n0 + 40, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
        valid[0, 48:64] = False  # one whole block padded: empty
    stats = dm.KeyBlockStats(bs, score)
    kinds = [stats.update(keys[:, :, :n0], valid[:, :n0] if padded else None)]
    for n in range(n0 + 1, n0 + 41):  # one key a step, across several block boundaries
        kinds.append(stats.update(keys[:, :, :n].contiguous(), valid[:, :n] if padded else None))
        if n in (n0 + 11, n0 + 40):
            nb = -(-n // bs)
            kk = keys[:, :, :n].reshape(b, h, -1, d)
            ok = valid[:, :n]
            for j in range(nb):
                blk = torch.arange(j * bs, min((j + 1) * bs, n))
                for bi in range(b):
                    use = blk[ok[bi, blk]] if padded else blk
                    assert stats.counts[bi, j] == len(use)
                    if len(use) and score == "bound":
                        assert torch.equal(stats.kmin[bi, :, j], kk[bi][:, use].amin(1))
                        assert torch.equal(stats.kmax[bi, :, j], kk[bi][:, use].amax(1))
                    elif len(use):
                        x = kk[bi][:, use].double()
                        assert torch.allclose(stats.kmean[bi, :, j].double(), x.mean(1), atol=1e-5)
                        assert torch.allclose(stats.kvar[bi, :, j].double(), x.var(1, unbiased=False), atol=1e-5)
    assert kinds[0] == "rebuilt" and set(kinds[1:]) == {"incremental"}
    assert stats.updates == 40 and stats.rebuilds == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("padded, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_fused_triton_statistics_and_scores_equal_recomputation(padded, dtype):
    """16-bit keys keep 16-bit statistics (exact: min and max are keys)."""
    dev = _device("triton")
    g = torch.Generator().manual_seed(9)
    b, hq, hkv, n0, d, bs = 2, 6, 2, 90, 24, 16
    keys = torch.randn(b, hkv, n0 + 20, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    valid = torch.ones(b, n0 + 20, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
        valid[0, 16:32] = False
    stats = dm.KeyBlockStats(bs)
    kinds = []
    for n in (n0, n0 + 1, n0 + 7, n0 + 20):  # a rebuild, then growth across a block boundary
        pad = valid[:, :n].to(dev) if padded else None
        kind, scores = stats.update_and_score(keys[:, :, :n].to(dev), pad, q.to(dev), verify=True, sink_blocks=1,
                                              recent_blocks=2, fused=True)
        kinds.append(kind)
        kmin, kmax, count = dm._block_minmax(keys[:, :, :n], valid[:, :n] if padded else None, bs)
        assert torch.equal(stats.kmin.cpu(), kmin) and torch.equal(stats.kmax.cpu(), kmax)
        assert torch.equal(stats.counts.cpu(), count)
        ref = dm.force_blocks(dm.block_scores(q, kmin, kmax, count if padded else None), 1, 2)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(scores.cpu()), finite)
        assert torch.allclose(scores.cpu()[finite], ref[finite], atol=1e-4)
    assert kinds == ["rebuilt", "incremental", "incremental", "incremental"]
    assert stats._min.dtype == dtype and stats._max.dtype == dtype  # half the bytes the scores read


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("nb, keep", [(1, 1), (37, 10), (300, 75), (1024, 256)])
def test_triton_block_selection_keeps_the_top_scores(nb, keep):
    """The one-launch selection keeps a set of `keep` blocks whose scores are the `keep`
    largest (as torch.topk), in ascending block order, with ties, +-inf and negatives."""
    from hf_creative_sparse.ops.decode_triton import select_blocks_triton

    dev = _device("triton")
    g = torch.Generator().manual_seed(nb)
    scores = torch.randn(2, 3, nb, generator=g)
    scores[0, 0] = torch.randint(-3, 3, (nb,), generator=g).float()  # many ties at the cut
    scores[0, 1, :nb // 3] = -math.inf  # empty blocks
    scores[1, 0, -2:] = math.inf  # forced blocks
    scores[1, 1] = -scores[1, 1].abs() - 1e-30  # all negative, one tiny
    idx = select_blocks_triton(scores.to(dev), keep).cpu()
    assert idx.shape == (2, 3, keep) and idx.dtype == torch.int64
    assert torch.equal(idx, idx.sort(-1).values) and bool((idx[..., 1:] > idx[..., :-1]).all())
    kept = torch.gather(scores, 2, idx).sort(-1, descending=True).values
    assert torch.equal(kept, scores.topk(keep, -1).values)
    with pytest.raises(ValueError, match="keep"):
        select_blocks_triton(scores.to(dev), nb + 1)


def test_sparse_step_checks_its_operands_before_any_kernel():
    state = dm.DecodeState(dm.DecodeSparsityConfig(budget=0.25, min_context=0, backend="torch"))
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 300, 16)
    with pytest.raises(ValueError, match="k and v must be"):
        state.attend(q, k, torch.randn(1, 2, 299, 16))
    with pytest.raises(TypeError, match="share a dtype"):
        state.attend(q, k, k.double())
    with pytest.raises(ValueError, match="key_padding_mask"):
        state.attend(q, k, k, key_padding_mask=torch.ones(1, 299, dtype=torch.bool))
    assert state.report()["calls"] == 0


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_triton_mass_statistics_and_scores_equal_recomputation(padded, dtype):
    """Score "mass" on the Triton path: the block means, variances and counts, and the
    forced shares, against `_block_moments` and `block_mass_scores` recomputed, through a
    rebuild and incremental growth across block boundaries. 16-bit keys keep their
    statistics in their dtype (to its rounding) and score in 16-bit products."""
    dev = _device("triton")
    if dev == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter's 16-bit tl.dot is wrong (triton 3.9); runs on CUDA")
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, n0, d, bs, scale = 2, 6, 2, 90, 24, 16, 0.4
    keys = (torch.randn(b, hkv, n0 + 20, d, generator=g) * 2.0).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    valid = torch.ones(b, n0 + 20, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
        valid[0, 16:32] = False
    exact = dtype == torch.float32
    stats = dm.KeyBlockStats(bs, "mass")
    kinds = []
    for n in (n0, n0 + 1, n0 + 7, n0 + 20):
        pad = valid[:, :n].to(dev) if padded else None
        kind, scores = stats.update_and_score(keys[:, :, :n].to(dev), pad, q.to(dev), verify=True, sink_blocks=1,
                                              recent_blocks=2, fused=True, scale=scale)
        kinds.append(kind)
        assert stats.kmean.dtype == dtype and stats.kvar.dtype == dtype
        mean, var, count = dm._block_moments(keys[:, :, :n], valid[:, :n] if padded else None, bs)
        if exact:
            assert torch.allclose(stats.kmean.cpu(), mean, atol=1e-5)
            assert torch.allclose(stats.kvar.cpu(), var, atol=1e-4)
        else:  # within the dtype's rounding
            assert torch.allclose(stats.kmean.cpu().float(), mean, rtol=8e-3, atol=1e-3)
            assert torch.allclose(stats.kvar.cpu().float(), var, rtol=8e-3, atol=1e-3)
        assert torch.equal(stats.counts.cpu(), count)
        ref = dm.force_blocks(dm.block_mass_scores(q.float(), stats.kmean.cpu().float(), stats.kvar.cpu().float(),
                                                   count, scale), 1, 2)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(scores.cpu()), finite) and torch.equal(scores.cpu() > 0, ref > 0)
        assert torch.allclose(scores.cpu()[finite], ref[finite], atol=1e-5 if exact else 2e-3, rtol=0 if exact else 1e-2)
    assert kinds == ["rebuilt", "incremental", "incremental", "incremental"]


def test_auto_score_resolves_by_device_and_explicit_choices_are_kept():
    """score="auto": the measured fused path on CUDA (bound, blocks of 32), the mass score
    (blocks of 16) elsewhere; a named score or block size is never replaced."""
    auto = dm.DecodeSparsityConfig(budget=0.25, min_context=0)
    assert auto.layout("cpu") == ("mass", 16) and auto.layout("cuda") == ("bound", 32)
    assert auto.replace(backend="torch").layout("cuda") == ("mass", 16)
    assert auto.replace(score="mass").layout("cuda") == ("mass", 16)
    assert auto.replace(score="bound").layout("cpu") == ("bound", 32)
    assert auto.replace(block_size=64).layout("cpu") == ("mass", 64)
    state = dm.DecodeState(auto)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    _, stats = state.attend(q, k, k)
    assert (stats.score, stats.block_size, stats.num_blocks) == ("mass", 16, 19)
    state.set_config(auto.replace(score="bound", block_size=32))
    _, stats = state.attend(q, k, k)
    assert (stats.score, stats.block_size, stats.num_blocks) == ("bound", 32, 10)
    assert state.stats.score == "bound" and state.stats.block_size == 32


def test_changed_cache_is_rebuilt_not_updated():
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(2, 2, 70, 8, generator=g)
    stats = dm.KeyBlockStats(16)
    stats.update(keys[:, :, :60])
    grown = torch.cat([keys[:, :, :60], keys[:, :, 60:61]], 2)
    reordered = grown.flip(0)  # beam search reorders the batch
    assert stats.update(reordered) == "rebuilt"
    assert torch.equal(stats.kmax[0, :, 0], reordered[0, :, :16].amax(1))
    assert stats.update(keys[:, :, :30]) == "rebuilt"  # shorter: a new sequence


def test_quest_bound_is_an_upper_bound_summed_over_the_group():
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, n, d, bs = 2, 6, 2, 200, 16, 32
    q, keys = torch.randn(b, hq, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    stats = dm.KeyBlockStats(bs)
    stats.update(keys)
    for scores in (stats.scores(q, False), dm.block_scores(q, stats.kmin, stats.kmax)):
        grp = q.view(b, hkv, hq // hkv, d)
        exact = torch.einsum("bhgd,bhnd->bhn", grp, keys)  # sum over the group of q_g . k
        nb = stats.num_blocks
        per_block = torch.stack([exact[..., j * bs:(j + 1) * bs].amax(-1) for j in range(nb)], -1)
        assert (scores >= per_block - 1e-4).all()
        # tight for a block of one key
    one = dm.KeyBlockStats(1)
    one.update(keys[:, :, :5])
    assert torch.allclose(one.scores(q, False), torch.einsum("bhgd,bhnd->bhn", q.view(b, hkv, 3, d), keys[:, :, :5]),
                          atol=1e-4)


def mass_reference_f64(q, keys, valid, bs, scale):
    """The "mass" score by its definition, per query head and block in float64: with
    v = s^2 (q*q).var, log n + s q.mu + v/2 for v <= 2 ln n, else log n + s q.mu +
    sqrt(2 v ln n) - ln n (the random energy model's estimate of log sum exp(s q.k) over
    the block's attendable keys), a softmax over the non-empty blocks, summed over the kv
    head's heads."""
    b, hq, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    nb = -(-n // bs)
    out = torch.zeros(b, hkv, nb, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            est = torch.full((nb,), -math.inf, dtype=torch.float64)
            for j in range(nb):
                use = [t for t in range(j * bs, min((j + 1) * bs, n)) if valid is None or bool(valid[bi, t])]
                if use:
                    x, qq = keys[bi, h // g, use].double(), q[bi, h].double()
                    mu, var = x.mean(0), x.var(0, unbiased=False)
                    v, lim = float(scale ** 2 * ((qq * qq) @ var)), 2 * math.log(len(use))
                    spread = v / 2 if v <= lim else math.sqrt(2 * v * math.log(len(use))) - math.log(len(use))
                    est[j] = math.log(len(use)) + float(scale * (qq @ mu)) + spread
            out[bi, h // g] += torch.softmax(est, 0)
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("scale", [0.3, 0.7])
def test_mass_scores_equal_float64_definition(padded, scale):
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, n, d, bs = 2, 6, 2, 150, 16, 16
    q, keys = torch.randn(b, hq, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    keys[:, 1] *= torch.linspace(0.2, 1.5, n)[:, None]  # logit variances on both sides of 2 ln n
    valid = None
    if padded:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[1, :40] = False  # left padding: blocks 0-1 empty, block 2 partly
    stats = dm.KeyBlockStats(bs, "mass")
    stats.update(keys, valid)
    v = scale ** 2 * (q.view(b, hkv, -1, d) ** 2) @ stats.kvar.transpose(-1, -2)
    lim = 2 * stats.counts.float().log()[:, None, None, :]
    full = (stats.counts > 1)[:, None, None, :].expand_as(v)
    assert bool((v <= lim)[full].any()) and bool((v > lim)[full].any())  # both branches of the estimate
    scores = stats.scores(q, padded, scale)
    ref = mass_reference_f64(q, keys, valid, bs, scale)
    empty = (stats.counts == 0)[:, None, :].expand_as(scores)
    assert bool(empty.any()) == padded
    assert torch.equal(torch.isinf(scores), empty) and (scores[empty] < 0).all()  # empty blocks: -inf
    assert torch.allclose(scores[~empty].double(), ref[~empty], atol=1e-5)
    assert torch.allclose(scores.clamp_min(0).sum(-1), torch.full((b, hkv), hq / hkv), atol=1e-5)


def test_mass_score_is_the_true_attention_mass_for_blocks_of_equal_keys():
    """With every key of a block equal (zero variance) the estimate is exact: the score of a
    block is the softmax mass its keys receive, summed over the group's query heads."""
    g = torch.Generator().manual_seed(12)
    b, hq, hkv, nb, d, bs = 1, 4, 2, 9, 8, 4
    q = torch.randn(b, hq, d, generator=g)
    keys = torch.randn(b, hkv, nb, 1, d, generator=g).expand(b, hkv, nb, bs, d).reshape(b, hkv, nb * bs, d)
    keys = keys[:, :, :nb * bs - 1].contiguous()  # a partly filled last block: its count weighs it
    stats = dm.KeyBlockStats(bs, "mass")
    stats.update(keys)
    kk = keys.double().repeat_interleave(hq // hkv, 1)
    p = torch.softmax((q.double()[:, :, None] @ kk.transpose(-1, -2))[:, :, 0] * 0.5, -1)  # [B, Hq, N]
    p = torch.nn.functional.pad(p, (0, 1)).view(b, hkv, hq // hkv, nb, bs).sum((2, 4))
    assert torch.allclose(stats.scores(q, False, 0.5).double(), p, atol=1e-5)


def test_score_option_changes_the_selection_to_the_block_of_most_mass():
    """A block of diverse keys (each large in one channel) has the larger min/max box and the
    larger bound; a block of keys moderately aligned with the query holds most of the
    attention. "bound" keeps the first, "mass" the second (the option is not ignored)."""
    g = torch.Generator().manual_seed(13)
    b, hq, hkv, d, bs, nb = 1, 2, 1, 8, 16, 8
    k = torch.randn(b, hkv, nb * bs, d, generator=g) * 0.1
    v = torch.randn(b, hkv, nb * bs, d, generator=g)
    diverse, aligned = 3, 5
    k[0, 0, diverse * bs:(diverse + 1) * bs] = 4.0 * torch.eye(d).repeat(2, 1)  # key i: 4 e_(i mod 8)
    k[0, 0, aligned * bs:(aligned + 1) * bs] = 2.0
    q = torch.ones(b, hq, 1, d)
    mass = torch.softmax((q[0, :, 0] @ k[0, 0].T) * d ** -0.5, -1).view(hq, nb, bs).sum((0, 2))
    assert int(mass[1:-1].argmax()) + 1 == aligned
    picked = {}
    for score in ("bound", "mass"):
        cfg = dm.DecodeSparsityConfig(budget=3 / nb, min_context=0, block_size=bs, sink_blocks=1, recent_blocks=1,
                                      score=score)
        state = dm.DecodeState(cfg)
        out, stats = state.attend(q, k, v)
        assert stats.kept_blocks == 3 and state.stats.score == score
        picked[score] = set(stats.block_idx[0, 0].tolist()) - {0, nb - 1}
    assert picked == {"bound": {diverse}, "mass": {aligned}}


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("score", ["mass", "bound"])
def test_budget_honoured_and_selection_keeps_the_hot_block(budget, score):
    g = torch.Generator().manual_seed(8)
    b, hq, hkv, n, d, bs = 2, 4, 2, 1000, 32, 32
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g) * 0.1, torch.randn(b, hkv, n, d, generator=g)
    hot = 17  # a middle block whose keys align with every query head
    k[:, :, hot * bs:(hot + 1) * bs] += 3.0 * q[:, :, 0].view(b, hkv, 2, d).sum(2)[:, :, None] / d ** 0.5
    cfg = dm.DecodeSparsityConfig(budget=budget, min_context=0, block_size=bs, sink_blocks=1, recent_blocks=2,
                                  score=score)
    out, stats = dm.DecodeState(cfg).attend(q, k, v)
    nb = -(-n // bs)
    keep = max(3, math.ceil(budget * nb))
    assert stats.num_blocks == nb and stats.kept_blocks == keep and stats.kept_fraction == keep / nb
    idx = stats.block_idx
    assert idx.shape == (b, hkv, keep)
    for row in idx.view(-1, keep).tolist():
        assert len(set(row)) == keep and row == sorted(row)
        assert 0 in row and nb - 1 in row and nb - 2 in row and hot in row
    ref = reference_f64(q[:, :, 0], k, v, idx, bs, None, d ** -0.5)
    assert (out[:, :, 0].double() - ref).abs().max() < 2e-5


def test_dense_fallbacks_say_why():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    cases = {
        dm.DecodeSparsityConfig(budget=0.25): "short context",
        dm.DecodeSparsityConfig(min_context=0): "no decode budget",
        dm.DecodeSparsityConfig(budget=0.95, min_context=0, block_size=16): "kept fraction",
        dm.DecodeSparsityConfig(budget=0.25, min_context=0, enabled=False): "disabled",
    }
    for cfg, why in cases.items():
        state = dm.DecodeState(cfg)
        out, stats = state.attend(q, k, v)
        assert why in stats.fallback_reason and stats.backend == "sdpa" and torch.allclose(out, ref, atol=1e-6)
        assert state.report()["sparse_calls"] == 0 and state.report()["calls"] == 1
    dense_first = dm.DecodeSparsityConfig(budget=0.25, min_context=0, block_size=8, dense_layers=2)
    assert "dense layer" in dm.DecodeState(dense_first, layer_index=1).attend(q, k, v)[1].fallback_reason
    assert dm.DecodeState(dense_first, layer_index=2).attend(q, k, v)[1].fallback_reason is None
    # a dial budget (k_attn(s)) is used when the config has none
    out, stats = dm.DecodeState(dm.DecodeSparsityConfig(min_context=0, block_size=8)).attend(q, k, v, budget=0.5)
    assert stats.fallback_reason is None and stats.kept_blocks == 7


def test_config_validation():
    with pytest.raises(ValueError, match="budget"):
        dm.DecodeSparsityConfig(budget=0.0)
    with pytest.raises(TypeError, match="budget"):
        dm.DecodeSparsityConfig(budget="0.5")
    with pytest.raises(ValueError, match="block_size"):
        dm.DecodeSparsityConfig(block_size=0)
    with pytest.raises(ValueError, match="recent_blocks"):
        dm.DecodeSparsityConfig(recent_blocks=0)
    with pytest.raises(ValueError, match="backend"):
        dm.DecodeSparsityConfig(backend="gpu")
    with pytest.raises(ValueError, match="max_kept_fraction"):
        dm.DecodeSparsityConfig(max_kept_fraction=1.5)
    with pytest.raises(TypeError, match="enabled"):
        dm.DecodeSparsityConfig(enabled=1)
    with pytest.raises(ValueError, match="dense_layers"):
        dm.DecodeSparsityConfig(dense_layers=-1)
    with pytest.raises(ValueError, match="score"):
        dm.DecodeSparsityConfig(score="quest")
    with pytest.raises(ValueError, match="score"):
        dm.KeyBlockStats(16, "max")
    mass = dm.KeyBlockStats(4, "mass")
    mass.update(torch.randn(1, 1, 10, 8))
    with pytest.raises(RuntimeError, match="no min statistics"):
        mass.kmin
    odd = dm.KeyBlockStats(3, "mass")  # the Triton kernels take blocks of a power of two (or no triton here)
    with pytest.raises(ValueError, match="triton"):
        odd.update_and_score(torch.randn(1, 1, 11, 8), None, torch.randn(1, 2, 8), verify=True, sink_blocks=1,
                             recent_blocks=1, fused=True)
    with pytest.raises(ValueError, match="layer_index"):
        dm.DecodeState(layer_index=-2)
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 40, 8)
    with pytest.raises(ValueError, match="block_idx"):
        dm.decode_block_attention(q, k, k, torch.zeros(1, 1, 2, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="key_valid"):
        dm.decode_block_attention(q, k, k, torch.zeros(1, 1, 2, dtype=torch.long), 16, torch.ones(1, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot run"):
        dm.decode_block_attention(q.double(), k.double(), k.double(), torch.zeros(1, 1, 1, dtype=torch.long), 16,
                                  backend="cpu")
    with pytest.raises(ValueError, match="one decode row"):
        dm.DecodeState().attend(torch.randn(1, 2, 3, 8), k, k)


# -- transformers: generate with a DynamicCache ------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama():
    from hf_creative_sparse.patches import transformers_attention as ta
    from hf_creative_sparse.testing import tiny_llama

    model = tiny_llama(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.config._attn_implementation_internal = "sdpa"
    yield model, ta
    import hf_creative_sparse as hcs

    if hcs.integrations.enable.get_handle(model) is not None:
        hcs.disable_creative_sparse(model)
    set_current_sparsity(None)


def _generate(model, ids, mask, steps=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True)


def test_generate_decode_steps_run_sparse_and_budget_one_matches_sdpa(llama):
    import hf_creative_sparse as hcs
    from hf_creative_sparse.ops.config import SparseAttentionConfig

    model, ta = llama
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    ref = _generate(model, ids, mask)
    hcs.enable_creative_sparse(model, SparseAttentionConfig.dense(backend="reference", min_seq_len=0))
    ta.set_decode_config(dm.DecodeSparsityConfig(budget=1.0, max_kept_fraction=1.0, min_context=0, block_size=16),
                         model)
    out = _generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() < 1e-4
    states = ta.decode_states(model)
    assert len(states) == 2
    for st in states.values():
        rep = st.report()
        assert rep["sparse_calls"] == 5 and rep["stats_rebuilds"] == 1 and rep["stats_updates"] == 4
    # budget 0.25: the same steps read a quarter of the blocks; the layer report says so
    ta.set_decode_config(dm.DecodeSparsityConfig(budget=0.25, min_context=0, block_size=16), model)
    sparse = _generate(model, ids, mask)
    for name, st in states.items():
        last = st.last
        assert last.fallback_reason is None and last.kept_blocks == math.ceil(0.25 * last.num_blocks)
        row = ta.layer_states(model)[name].report_row()
        assert "decode-" in row["backend"] and row["sparse_calls"] == 2 * (1 + 5)  # two generates: prefill + 5 decode steps each
    assert all(torch.isfinite(x).all() for x in sparse.logits)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(sparse.logits[1:], ref.logits[1:]))  # it acted


def test_published_dial_sets_the_decode_budget(llama):
    import hf_creative_sparse as hcs

    model, ta = llama
    ids = torch.randint(1, 100, (1, 400), generator=torch.Generator().manual_seed(2))
    hcs.enable_creative_sparse(model)
    ta.set_decode_config(dm.DecodeSparsityConfig(min_context=0, block_size=16), model)
    for s in (0.0, 0.7, 0.3):
        set_current_sparsity(s)
        _generate(model, ids, torch.ones_like(ids), steps=3)
        budget = SparsityController().attention_budget(s)
        for st in ta.decode_states(model).values():
            if s == 0.0:  # k_attn(0) = 1: dense decode
                assert "kept fraction" in st.last.fallback_reason
            else:
                assert st.last.kept_blocks == math.ceil(budget * st.last.num_blocks - 1e-9)
    set_current_sparsity(None)
    _generate(model, ids, torch.ones_like(ids), steps=2)
    assert all("no decode budget" in st.last.fallback_reason for st in ta.decode_states(model).values())
