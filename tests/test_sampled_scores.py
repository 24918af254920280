"""The "sample" block ranking (ops/sampled_scores.py): block masses of a few exact rows per
query block, checked against a float64 softmax of the same rows; strict causality; that it
ranks better than pooled means on structured inputs; the Triton kernel against PyTorch."""

import math

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.config import BLOCK_M, BLOCK_N
from hf_creative_sparse.ops.estimate import sample_rows
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.masks import block_scores, select_blocks
from hf_creative_sparse.ops.sampled_scores import _stats_torch, ranking_rows, sampled_block_mass

from benchmarks.realistic_inputs import make_inputs


def brute_force_mass(q, k, key_padding_mask, is_causal, rows_per_block=8):
    """float64: per query block, the mean over its ranking rows of each key block's share of
    the row's softmax (causal: shifted by one block)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    mq, mk = math.ceil(nq / BLOCK_M), math.ceil(nk / BLOCK_N)
    out = torch.zeros(b, hq, mq, mk, dtype=torch.float64)
    for i in range(mq):
        r0, size = i * BLOCK_M, min(BLOCK_M, nq - i * BLOCK_M)
        rows = [r0 + int((j + 0.5) * size / rows_per_block) for j in range(rows_per_block)]
        for bb in range(b):
            for h in range(hq):
                kk = k[bb, h // (hq // hkv)].double()
                for r in rows:
                    s = (q[bb, h, r].double() @ kk.T) * d ** -0.5
                    ok = torch.ones(nk, dtype=torch.bool)
                    if key_padding_mask is not None:
                        ok &= key_padding_mask[bb]
                    if is_causal:
                        ok &= torch.arange(nk) <= r
                    if not ok.any():
                        continue
                    p = torch.softmax(s.masked_fill(~ok, -math.inf), -1)
                    p = torch.nn.functional.pad(p, (0, mk * BLOCK_N - nk)).view(mk, BLOCK_N).sum(-1)
                    out[bb, h, i] += p / rows_per_block
    if is_causal:
        out = torch.cat([torch.zeros_like(out[:, :, :1]), out[:, :, :-1]], dim=2)
    return out


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_sampled_mass_matches_float64_softmax(is_causal, gqa):
    torch.manual_seed(0)
    b, hq, n, d = 2, 4, 333, 24  # lengths not multiples of the blocks, odd head dim
    hkv = 2 if gqa else hq
    q, k = torch.randn(b, hq, n, d) * 2, torch.randn(b, hkv, n, d)
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, 250:] = False
    inp = attention_inputs(q, k, k, is_causal=is_causal, key_padding_mask=None if is_causal else pad)
    got = sampled_block_mass(inp)
    want = brute_force_mass(q, k, inp.key_padding_mask, is_causal)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-4)
    full = got.sum(-1)[:, :, 1:] if is_causal else got.sum(-1)
    torch.testing.assert_close(full, torch.ones_like(full))  # every block's rows see a key


def test_sampled_mass_honours_rows_per_block():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 256, 16) * 3, torch.randn(1, 2, 256, 16)
    inp = attention_inputs(q, k, k)
    two = sampled_block_mass(inp, rows_per_block=2)
    torch.testing.assert_close(two.double(), brute_force_mass(q, k, None, False, rows_per_block=2), atol=2e-6, rtol=1e-4)
    assert not torch.allclose(two, sampled_block_mass(inp, rows_per_block=8))
    with pytest.raises(ValueError, match="rows_per_block"):
        sampled_block_mass(inp, rows_per_block=0)


def test_ranking_rows_lie_in_their_block():
    rows = ranking_rows(300)
    assert rows.shape == (3, 8)
    for i in range(3):
        assert ((rows[i] >= i * BLOCK_M) & (rows[i] < min(300, (i + 1) * BLOCK_M))).all()
    assert rows[0].tolist() == [8, 24, 40, 56, 72, 88, 104, 120]


def test_budget_estimate_avoids_the_ranking_rows():
    for n in (300, 4096, 17776):
        q = torch.zeros(1, 1, n, 8)
        rows = sample_rows(attention_inputs(q, q, q), 64)
        assert rows.numel() == 64 and rows.unique().numel() == 64
        assert not torch.isin(rows, ranking_rows(n).flatten()).any()


def test_sample_ranking_beats_pooled_means_on_video_like_inputs():
    """At the same top-k budget the sampled ranking's mask errs less than SpargeAttn's
    pooled means (the module doc's measurement, on a small grid)."""
    q, k, v = make_inputs("video", 1, 4, 64 + 8 * 24 * 32, 32, grid=(8, 24, 32), text_len=64, seed=2)
    inp = attention_inputs(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    errs = {}
    for ranking in ("mean", "sample"):
        scores = block_scores(inp, simthreshd1=-1.0, ranking=ranking)
        mask = select_blocks(scores, inp, topk=0.2)
        out = hcs.block_sparse_attention(q, k, v, mask, backend="reference")
        errs[ranking] = float((out - ref).abs().sum() / ref.abs().sum())
    assert errs["sample"] < 0.7 * errs["mean"], errs


@pytest.mark.parametrize("ranking", ["sample", "bound"])
def test_sample_ranking_is_strictly_causal(ranking):
    torch.manual_seed(3)
    n, cut = 700, 650
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    cfg = hcs.SparseAttentionConfig(topk=0.3, block_ranking=ranking, backend="reference", min_seq_len=0)
    base = hcs.sparse_attention(q, k, v, is_causal=True, config=cfg)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.randn_like(x[:, :, cut:]) * 3
    out = hcs.sparse_attention(q2, k2, v2, is_causal=True, config=cfg)
    assert torch.equal(out[:, :, :cut], base[:, :, :cut])


def test_error_target_ranks_by_samples_by_default():
    assert hcs.SparseAttentionConfig().ranking_for(False) == "sample"
    assert hcs.SparseAttentionConfig().ranking_for(True) == "bound"
    assert hcs.SparseAttentionConfig(topk=0.2).ranking_for(False) == "mean"
    assert hcs.SparseAttentionConfig(block_ranking="sample").ranking_for(True) == "sample"
    with pytest.raises(ValueError, match="block_ranking"):
        hcs.SparseAttentionConfig(block_ranking="oracle")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_stats_match_torch(dtype, is_causal):
    from hf_creative_sparse.ops.sampled_scores_triton import sampled_block_stats_triton

    torch.manual_seed(4)
    for hq, hkv, n, d in ((4, 2, 1000, 64), (2, 2, 333, 128), (3, 1, 700, 40)):
        q = (torch.randn(2, hq, n, d, device="cuda") * 2).to(dtype)
        k = torch.randn(2, hkv, n, d, device="cuda").to(dtype)
        pad = torch.ones(2, n, dtype=torch.bool, device="cuda")
        pad[1, n // 2:] = False
        inp = attention_inputs(q, k, k, is_causal=is_causal, key_padding_mask=None if is_causal else pad)
        rows = ranking_rows(n, device="cuda").flatten()
        m_t, l_t = sampled_block_stats_triton(inp, rows)
        m_r, l_r = _stats_torch(inp, rows)
        tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        assert torch.equal(torch.isinf(m_t), torch.isinf(m_r))
        fin = torch.isfinite(m_r)
        torch.testing.assert_close(m_t[fin], m_r[fin], **tol)
        torch.testing.assert_close(l_t, l_r, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_mass_matches_float64_softmax(is_causal):
    torch.manual_seed(6)
    b, hq, hkv, n, d = 2, 4, 2, 1000, 64
    q, k = torch.randn(b, hq, n, d) * 2, torch.randn(b, hkv, n, d)
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, 700:] = False
    kpm = None if is_causal else pad
    inp = attention_inputs(q.cuda(), k.cuda(), k.cuda(), is_causal=is_causal,
                           key_padding_mask=None if kpm is None else kpm.cuda())
    got = sampled_block_mass(inp).cpu()
    torch.testing.assert_close(got.double(), brute_force_mass(q, k, kpm, is_causal), atol=1e-5, rtol=1e-4)


def test_triton_kernels_say_why_they_cannot_run():
    """On a CPU tensor (or without triton) the kernels decline with a reason, and the callers
    run PyTorch instead (the sampled mass above came from that path)."""
    from hf_creative_sparse.ops._triton import kernel_unavailable_reason, triton
    from hf_creative_sparse.ops.compensation_triton import unavailable_reason as comp_reason

    q = torch.zeros(1, 1, 8, 16)
    reason = kernel_unavailable_reason("sampled-statistics", q)
    assert reason is not None and ("triton" in reason if triton is None else "CUDA" in reason)
    assert comp_reason(attention_inputs(q, q, q), q) is not None


@pytest.mark.cuda
def test_fused_compensation_refuses_a_mismatched_result():
    from hf_creative_sparse.ops.compensation import compensation_bias, pooled_kv
    from hf_creative_sparse.ops.compensation_triton import compensate_triton

    q = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    inp = attention_inputs(q, q, q)
    mask = torch.zeros(1, 2, 3, 5, dtype=torch.bool, device="cuda")
    mask[..., 0] = True
    pk, pv, count = pooled_kv(inp)
    lse = torch.zeros(1, 2, 300, device="cuda")
    with pytest.raises(ValueError, match="result"):
        compensate_triton(inp, q, lse, compensation_bias(mask, inp, count), pk, pv, result=q.float())
