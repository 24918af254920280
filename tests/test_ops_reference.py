"""The reference backend and the public ops against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_creative_sparse as hcs
from reference_impl import (element_mask, masked_attention_f64, pv_skip_attention_f64, rel_max_err,
                            structured_qkv, to_hnd)

DENSE_CONFIGS = [dict(topk=1.0), dict(cdfthreshd=1.0), dict(simthreshd1=1.0)]


def _padding(b: int, n: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("cfg", DENSE_CONFIGS)
@pytest.mark.parametrize("n,d,hq,hkv,causal", [(1, 8, 2, 2, False), (77, 64, 4, 2, True), (300, 80, 3, 1, False),
                                                (513, 128, 2, 2, True), (200, 256, 2, 1, False)])
def test_forced_dense_matches_sdpa_f64(cfg, n, d, hq, hkv, causal):
    q, k, v = (torch.randn(2, h, n, d) for h in (hq, hkv, hkv))
    out = hcs.sparse_attention(q, k, v, is_causal=causal, backend="reference", **cfg)
    ref = masked_attention_f64(q, k, v, element_mask(None, n, n, is_causal=causal, batch=2, heads=hq))
    assert rel_max_err(out, ref) < 1e-4


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [(4, 4), (4, 2), (4, 1)])
def test_sparse_matches_dense_restricted_to_kept_blocks(layout, causal, gqa):
    hq, hkv = gqa
    n = 1000
    q, k, v = structured_qkv(2, hq, hkv, n, 64, layout=layout, seed=hq * 10 + hkv)
    pad = _padding(2, n, [n, 700])
    out, stats = hcs.sparse_attention(q, k, v, layout=layout, is_causal=causal, key_padding_mask=pad,
                                      min_seq_len=0, max_kept_fraction=1.0, pvthreshd=math.inf, compensate=False,
                                      backend="cpu" if hcs.available_backends()["cpu"] is None else "reference",
                                      return_stats=True)  # a named backend: no policy may choose dense
    assert stats.backend != "sdpa" and stats.kept_fraction < 1.0
    mask = element_mask(stats.block_mask, n, n, is_causal=causal, key_padding_mask=pad)
    ref = masked_attention_f64(to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout), mask)
    assert rel_max_err(to_hnd(out, layout), ref) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_within_tolerance(dtype, tol):
    q, k, v = structured_qkv(1, 2, 2, 700, 64, dtype=dtype)
    out, stats = hcs.sparse_attention(q, k, v, topk=0.3, simthreshd1=-1.0, min_seq_len=0, backend="reference",
                                      return_stats=True)
    assert out.dtype == dtype
    ref = masked_attention_f64(q, k, v, element_mask(stats.block_mask, 700, 700))
    assert rel_max_err(out, ref) < tol


@pytest.mark.parametrize("causal", [False, True])
def test_pv_threshold_skip_matches_row_loop(causal):
    n, thr = 333, 3.0
    q, k, v = structured_qkv(1, 2, 1, n, 16, seed=3)
    q = q * 0.5
    # a few strong keys in block 0 set a high running max early, so later blocks that are
    # visited afterwards fall below the threshold for some rows and not for others
    k[:, :, :4] += 0.4 * q.mean(dim=(1, 2), keepdim=True)[:, 0]
    pad = _padding(1, n, [300])
    out, stats = hcs.sparse_attention(q, k, v, is_causal=causal, key_padding_mask=pad, topk=0.7, simthreshd1=-1.0,
                                      pvthreshd=thr, min_seq_len=0, backend="reference", return_stats=True)
    ref, skipped, visited = pv_skip_attention_f64(q, k, v, stats.block_mask, thr, is_causal=causal,
                                                  key_padding_mask=pad)
    assert skipped > 0, "the test inputs must exercise the skip"
    assert rel_max_err(out, ref) < 1e-4
    assert stats.pv_skipped_fraction == pytest.approx(skipped / visited)


def test_all_masked_rows_are_zero_not_nan():
    q, k, v = (torch.randn(2, 2, 200, 32) for _ in range(3))
    pad = _padding(2, 200, [0, 150])
    for backend in ("reference", "sdpa"):
        out = hcs.sparse_attention(q, k, v, key_padding_mask=pad, topk=0.5, min_seq_len=0, backend=backend)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()
    # causal with a padded start: rows before the first real key have nothing to attend
    pad = torch.ones(1, 200, dtype=torch.bool)
    pad[0, :10] = False
    out = hcs.sparse_attention(q[:1], k[:1], v[:1], is_causal=True, key_padding_mask=pad, backend="sdpa")
    assert (out[0, :, :10] == 0).all() and torch.isfinite(out).all()


def test_nan_propagates_like_sdpa():
    q, k, v = (torch.randn(1, 1, 200, 16) for _ in range(3))
    q[0, 0, 5, 0] = float("nan")
    out = hcs.sparse_attention(q, k, v, topk=1.0, backend="reference")
    assert torch.isnan(out[0, 0, 5]).all()
    assert torch.isfinite(out[0, 0, :5]).all() and torch.isfinite(out[0, 0, 6:]).all()


def test_block_sparse_attention_user_mask_and_broadcast():
    n = 400
    q, k, v = (torch.randn(2, 3, n, 32) for _ in range(3))
    mask = torch.rand(1, 3, 4, 7) < 0.5
    mask[..., 0] = True
    out, stats = hcs.block_sparse_attention(q, k, v, mask, return_stats=True, backend="reference")
    ref = masked_attention_f64(q, k, v, element_mask(mask.expand(2, 3, 4, 7), n, n))
    assert rel_max_err(out, ref) < 1e-4
    assert stats.kept_fraction == pytest.approx(mask.float().mean().item())
    out_int = hcs.block_sparse_attention(q, k, v, mask.to(torch.int32), backend="reference")
    assert torch.equal(out, out_int)


def test_policy_falls_back_and_says_why():
    q, k, v = (torch.randn(1, 2, 300, 32) for _ in range(3))
    out, stats = hcs.sparse_attention(q, k, v, return_stats=True)  # default min_seq_len > 300
    assert stats.backend == "sdpa" and "short sequence" in stats.fallback_reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    q, k, v = (torch.randn(1, 2, 1100, 32) for _ in range(3))  # white noise: nothing is self-similar
    _, stats = hcs.sparse_attention(q, k, v, return_stats=True)
    assert stats.backend == "sdpa" and "low predicted sparsity" in stats.fallback_reason
    assert stats.predicted_kept_fraction == pytest.approx(1.0)


def test_sparge_drop_ins():
    q, k, v = structured_qkv(1, 2, 2, 1100, 64)
    out, sparsity = hcs.spas_sage2_attn_meansim_cuda(q, k, v, return_sparsity=True)
    assert out.shape == q.shape and 0.0 < sparsity < 1.0
    out1 = hcs.spas_sage_attn_meansim_cuda(q, k, v)
    torch.testing.assert_close(out, out1)
    mask = torch.ones(1, 2, 9, 18, dtype=torch.bool)
    out2, sp2 = hcs.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask, return_sparsity=True)
    ref = masked_attention_f64(q, k, v, element_mask(None, 1100, 1100, heads=2))
    assert rel_max_err(out2, ref) < 1e-4 and sp2 == 0.0
    nhd = [t.transpose(1, 2) for t in (q, k, v)]
    out3 = hcs.spas_sage2_attn_meansim_cuda(*nhd, tensor_layout="NHD")
    torch.testing.assert_close(out3.transpose(1, 2), out)
    with pytest.raises(ValueError, match="attn_mask"):
        hcs.spas_sage2_attn_meansim_cuda(q, k, v, attn_mask=torch.ones(1))
    with pytest.raises(ValueError, match="mask_id"):
        hcs.block_sparse_sage2_attn_cuda(q, k, v)
    # topk replaces the cdf rule, as in SpargeAttn (the default cdfthreshd is not an error)
    _, sp_topk = hcs.spas_sage2_attn_meansim_cuda(q, k, v, topk=0.3, simthreshd1=-1.0, return_sparsity=True)
    assert sp_topk > 0.5


def test_block_sparse_sage2_honours_smooth_k(monkeypatch):
    """smooth_k centres the keys (issue 16: accepted arguments are honoured): the attention
    sees centred keys with it and the caller's keys without, and the outputs agree."""
    from hf_creative_sparse.ops import sparge

    q, k, v = structured_qkv(1, 2, 2, 300, 32)
    seen = []
    real = sparge.block_sparse_attention

    def spy(q_, k_, *args, **kwargs):
        seen.append(k_)
        return real(q_, k_, *args, **kwargs)

    monkeypatch.setattr(sparge, "block_sparse_attention", spy)
    mask = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    smooth = hcs.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask, smooth_k=True)
    plain = hcs.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask, smooth_k=False)
    assert seen[0].mean(dim=2).abs().max() < 1e-5 and torch.equal(seen[1], k)
    torch.testing.assert_close(smooth, plain, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="smooth_k"):
        hcs.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask, smooth_k="yes")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 8, 4)), {}, ValueError, "q must be 4-D"),
    ((torch.randn(1, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)), {}, ValueError, "batch"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)), {}, ValueError, "head_dim"),
    ((torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)), {}, ValueError, "multiple"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8, 4)), {}, ValueError, "same shape"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4).half(), torch.randn(1, 2, 8, 4)), {}, TypeError, "share a dtype"),
    ((torch.ones(1, 2, 8, 4, dtype=torch.int64),) * 3, {}, TypeError, "float32"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)), {"is_causal": True}, ValueError,
     "len_q == len_k"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"layout": "BHSD"}, ValueError, "layout"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"cdfthreshd": float("nan")}, ValueError, "cdfthreshd must not be NaN"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"topk": 1.5}, ValueError, "topk"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"pvthreshd": -1.0}, ValueError, "pvthreshd"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"simthreshd1": torch.tensor([0.5, 0.5, 0.5])}, ValueError, "per q head"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"key_padding_mask": torch.ones(1, 8)}, TypeError, "torch.bool"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"key_padding_mask": torch.ones(1, 9, dtype=torch.bool)}, ValueError, "shape"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"backend": "tpu"}, ValueError, "backend"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"scale": float("inf")}, ValueError, "scale"),
    (("not a tensor", torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)), {}, TypeError, "torch.Tensor"),
])
def test_bad_input_is_named(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hcs.sparse_attention(*args, min_seq_len=0, **kwargs)


def test_bad_block_mask():
    q = torch.randn(1, 2, 300, 16)
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 5\]"):
        hcs.block_sparse_attention(q, q, q, torch.ones(1, 2, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        hcs.block_sparse_attention(q, q, q, torch.ones(1, 2, 3, 5))
    with pytest.raises(ValueError, match="mask_id"):
        hcs.block_sparse_sage2_attn_cuda(q, q, q, mask_id=torch.ones(2, 2, 3, 5, dtype=torch.bool))


def test_unavailable_backend_raises_with_reason():
    q = torch.randn(1, 2, 300, 16)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        hcs.sparse_attention(q, q, q, backend="cuda", topk=0.5)


def test_config_validation():
    assert hcs.SparseAttentionConfig().selection == "target"  # no threshold: the error target
    with pytest.raises(ValueError, match="not both"):
        hcs.SparseAttentionConfig(cdfthreshd=0.9, topk=0.2)
    with pytest.raises(ValueError, match="target_l1"):
        hcs.SparseAttentionConfig(target_l1=0.02, topk=0.2)
    with pytest.raises(ValueError, match="target_l1"):
        hcs.SparseAttentionConfig(target_l1=1.5)
    with pytest.raises(TypeError, match="compensate"):
        hcs.SparseAttentionConfig(compensate=1)
    with pytest.raises(ValueError, match="block_ranking"):
        hcs.SparseAttentionConfig(block_ranking="max")
    assert hcs.SparseAttentionConfig(topk=0.2).ranking_for(False) == "mean" and hcs.SparseAttentionConfig().ranking_for(False) == "sample"
    from hf_creative_sparse.integrations.state import PatchOptions
    with pytest.raises(ValueError, match="remeasure_every"):
        PatchOptions(remeasure_every=0)
    with pytest.raises(TypeError, match="dense_prefix"):
        hcs.SparseAttentionConfig(dense_prefix=1.5)
    with pytest.raises(ValueError, match="max_kept_fraction"):
        hcs.SparseAttentionConfig(max_kept_fraction=float("nan"))
    cfg = hcs.SparseAttentionConfig(topk=torch.tensor([0.2, 0.4]), pvthreshd=math.inf)
    again = hcs.SparseAttentionConfig.from_dict(cfg.to_dict())
    assert torch.equal(again.topk, cfg.topk) and again.pvthreshd == math.inf


# ---------------------------------------------------------------- properties (hypothesis)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), n=st.integers(1, 420),
    d=st.sampled_from([8, 16, 24, 64]), causal=st.booleans(), layout=st.sampled_from(["HND", "NHD"]),
    topk=st.floats(0.05, 1.0), pad=st.booleans(), seed=st.integers(0, 10_000),
)
def test_property_sparse_equals_masked_dense(b, hkv, group, n, d, causal, layout, topk, pad, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    shape = (b, hq, n, d) if layout == "HND" else (b, n, hq, d)
    kv_shape = (b, hkv, n, d) if layout == "HND" else (b, n, hkv, d)
    q = torch.randn(shape, generator=g)
    k, v = torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    kpm = (torch.rand(b, n, generator=g) > 0.3) if pad else None
    out, stats = hcs.sparse_attention(q, k, v, layout=layout, is_causal=causal, key_padding_mask=kpm, topk=topk,
                                      simthreshd1=-1.0, pvthreshd=math.inf, backend="reference", return_stats=True)
    mask = element_mask(stats.block_mask, n, n, is_causal=causal, key_padding_mask=kpm)
    ref = masked_attention_f64(to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout), mask)
    assert torch.isfinite(out).all()
    assert rel_max_err(to_hnd(out, layout), ref) < 1e-4


def test_auto_skips_a_capable_backend_that_measured_slower_but_a_named_one_runs(monkeypatch):
    from hf_creative_sparse.ops import dispatch
    from hf_creative_sparse.ops.backends.reference import ReferenceBackend

    class SlowButCapable(ReferenceBackend):
        name = "cuda"
        calls = 0

        def auto_skip_reason(self, inp, pvthreshd=None):
            return "measured slower than the next backend"

        def run(self, inp, block_mask, pvthreshd):
            SlowButCapable.calls += 1
            return super().run(inp, block_mask, pvthreshd)

    dispatch._load()
    monkeypatch.setitem(dispatch._REGISTRY.backends, "cuda", SlowButCapable())
    q = torch.randn(1, 2, 300, 16)
    _, stats = hcs.sparse_attention(q, q, q, topk=0.5, min_seq_len=0, return_stats=True)
    assert stats.backend != "cuda" and SlowButCapable.calls == 0
    _, stats = hcs.sparse_attention(q, q, q, topk=0.5, backend="cuda", return_stats=True)
    assert stats.backend == "cuda" and SlowButCapable.calls == 1


def test_register_backend_adds_a_new_name():
    """register_backend can add a backend under a new name (issue 16): the name becomes a
    valid backend= everywhere and the calls run on it."""
    from hf_creative_sparse.ops import dispatch
    from hf_creative_sparse.ops.backends.reference import ReferenceBackend

    class Counting(ReferenceBackend):
        name = "counting"
        calls = 0

        def run(self, inp, block_mask, pvthreshd):
            Counting.calls += 1
            return super().run(inp, block_mask, pvthreshd)

    q, k, v = structured_qkv(1, 2, 2, 300, 32)
    with pytest.raises(ValueError, match="backend"):
        hcs.sparse_attention(q, k, v, topk=0.5, backend="counting")
    dispatch.register_backend(Counting())
    try:
        assert "counting" in dispatch.backend_names() and hcs.SparseAttentionConfig(backend="counting")
        out, stats = hcs.sparse_attention(q, k, v, topk=0.5, min_seq_len=0, backend="counting", return_stats=True)
        assert stats.backend == "counting" and Counting.calls == 1
        ref = hcs.sparse_attention(q, k, v, topk=0.5, min_seq_len=0, backend="reference")
        torch.testing.assert_close(out, ref)
    finally:
        dispatch._REGISTRY.backends.pop("counting", None)
    with pytest.raises(ValueError, match="reserved"):
        dispatch.register_backend(type("Auto", (Counting,), {"name": "auto"})())
    with pytest.raises(TypeError, match="lacks"):
        dispatch.register_backend(type("Half", (), {"name": "half"})())
