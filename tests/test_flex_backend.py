"""The flex backend (FlexAttention + BlockMask): the block-mask translation, the refusal
rules, and (on a GPU) results against a float64 dense reference on odd shapes.

The CPU tests run FlexAttention compiled for the CPU (its eager path mishandles
non-square 128x64 blocks), which checks the BlockMask construction without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.backends import flex as backend_flex
from hf_creative_sparse.ops.backends.flex import BACKEND, PV_EXACT_THRESHOLD, flex_block_sparse, kernel_options
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.masks import check_block_mask
from reference_impl import element_mask, masked_attention_f64


def _case(b, hq, hkv, nq, nk, d, *, causal, padded, device="cpu", dtype=torch.float32, keep=0.5):
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    kpm = None
    if padded:
        kpm = torch.rand(b, nk, device=device) > 0.3
        kpm[0, :70] = False  # with causal: early rows of batch 0 have no key at all
    inp = attention_inputs(q, k, v, is_causal=causal, key_padding_mask=kpm)
    mask = check_block_mask(torch.rand(b, hq, inp.num_q_blocks, inp.num_k_blocks, device=device) < keep, inp)
    ref = masked_attention_f64(q, k, v, element_mask(mask, nq, nk, is_causal=causal, key_padding_mask=kpm,
                                                     batch=b, heads=hq))
    return inp, mask, ref


def test_block_mask_translation_cpu_compiled():
    # GQA, causal, padded keys (whole rows without keys), odd length, head dim 48 (padded to 64)
    inp, mask, ref = _case(2, 4, 2, 300, 300, 48, causal=True, padded=True)
    out = flex_block_sparse(inp, mask, compiled=True)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_partial_blocks_are_the_diagonal_and_padded_ones():
    q = torch.randn(1, 1, 256, 16)
    causal = backend_flex._partial_blocks(attention_inputs(q, q, q, is_causal=True))[0, 0]
    # rows 128..255 see key blocks 0 and 1 entirely; blocks reaching past a block's first row are partial
    assert torch.equal(causal, torch.tensor([[True, True, True, True], [False, False, True, True]]))
    kpm = torch.ones(1, 256, dtype=torch.bool)
    kpm[0, 200] = False  # key block 3 holds a padded key
    padded = backend_flex._partial_blocks(attention_inputs(q, q, q, key_padding_mask=kpm))[0, 0]
    assert torch.equal(padded, torch.tensor([[False, False, False, True]] * 2))


def test_refuses_small_pv_thresholds_and_cpu_inputs():
    q = torch.randn(1, 2, 128, 64)
    inp = attention_inputs(q, q, q)
    assert "CUDA" in BACKEND.unsupported_reason(inp)
    if torch.cuda.is_available():
        inp = attention_inputs(*(t.cuda() for t in (q, q, q)))
        small = torch.tensor([math.inf, 5.0], device="cuda")
        assert "pv-threshold" in BACKEND.unsupported_reason(inp, small)
        large = torch.tensor([math.inf, PV_EXACT_THRESHOLD + 1], device="cuda")
        assert BACKEND.unsupported_reason(inp, large) is None


@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_tiles_divide_the_sparse_blocks(d, dtype):
    opts = kernel_options(d, dtype)
    assert 128 % opts["BLOCK_M"] == 0 and 64 % opts["BLOCK_N"] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [
    # (b, hq, hkv, nq, nk, d, causal, padded, dtype)
    (2, 4, 2, 333, 333, 64, True, True, torch.bfloat16),
    (1, 3, 3, 200, 517, 128, False, True, torch.float16),
    (1, 2, 1, 257, 257, 80, False, False, torch.bfloat16),
])
def test_flex_matches_float64_reference_on_gpu(shape):
    b, hq, hkv, nq, nk, d, causal, padded, dtype = shape
    inp, mask, ref = _case(b, hq, hkv, nq, nk, d, causal=causal, padded=padded, device="cuda", dtype=dtype)
    out, stats = hcs.block_sparse_attention(inp.q, inp.k, inp.v, mask, is_causal=causal,
                                            key_padding_mask=inp.key_padding_mask, backend="flex",
                                            return_stats=True)
    assert stats.backend == "flex"
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert torch.isfinite(out).all()


def _pooled_case(b, hq, hkv, nq, mk, d, *, device="cpu", dtype=torch.float32, seed=0):
    """q, pooled k/v and a bias with masked (-inf) entries, one query block fully masked."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(device, dtype)
    pk = torch.randn(b, hkv, mk, d, generator=g).to(device)
    pv = torch.randn(b, hkv, mk, d, generator=g).to(device)
    mq = math.ceil(nq / 128)
    bias = torch.log(torch.randint(1, 65, (b, hq, mq, mk), generator=g).float())
    bias = bias.masked_fill(torch.rand(b, hq, mq, mk, generator=g) < 0.4, -math.inf)
    bias[0, 0, min(1, mq - 1)] = -math.inf  # a query block with no pooled token at all
    return q, pk, pv, bias.to(device)


def _pooled_f64(q, pk, pv, bias, scale):
    """float64 softmax over the pooled tokens with the per-query-block bias: (out, lse)."""
    group = q.shape[1] // pk.shape[1]
    k, v = pk.double().cpu().repeat_interleave(group, 1), pv.double().cpu().repeat_interleave(group, 1)
    s = q.double().cpu() @ k.transpose(-1, -2) * scale
    s = s + bias.double().cpu()[:, :, torch.arange(q.shape[2]) // 128]
    lse = s.logsumexp(-1)
    p = (s - lse[..., None]).exp().nan_to_num(0.0)
    return p @ v, lse


def _check_pooled(out, lse, ref_out, ref_lse, tol):
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    empty = ref_lse == -math.inf
    assert empty.any() and (lse.cpu()[empty] == -math.inf).all() and (out.cpu()[empty] == 0).all()
    assert torch.isfinite(lse.cpu()[~empty]).all() and torch.isfinite(out).all()
    torch.testing.assert_close(lse.double().cpu()[~empty], ref_lse[~empty], atol=tol, rtol=tol)
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tol, rtol=tol)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("shape", [
    # (b, hq, hkv, nq, mk, d)
    (2, 4, 2, 300, 7, 48),   # GQA, odd length, head dim padded to 64
    (1, 3, 3, 128, 1, 64),   # one query block, one pooled token
    (1, 2, 1, 401, 12, 32),  # MQA
])
def test_pooled_attention_matches_float64_on_cpu(shape):
    # torch's CPU compilation of FlexAttention cannot return the lse: the eager path here
    b, hq, hkv, nq, mk, d = shape
    q, pk, pv, bias = _pooled_case(b, hq, hkv, nq, mk, d)
    out, lse = backend_flex.flex_pooled_attention(q, pk, pv, bias, 0.3)
    _check_pooled(out, lse, *_pooled_f64(q, pk, pv, bias, 0.3), 1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_pooled_attention_honours_bias_per_query_block_and_scale():
    q, pk, pv, bias = _pooled_case(1, 2, 2, 300, 5, 64)
    out, lse = backend_flex.flex_pooled_attention(q, pk, pv, bias, 0.3)
    moved = bias.clone()
    moved[:, :, 2, 0] = 5.0  # only rows 256..299 see the change
    out2, lse2 = backend_flex.flex_pooled_attention(q, pk, pv, moved, 0.3)
    assert torch.equal(lse2[:, :, :256], lse[:, :, :256]) and not torch.allclose(lse2[:, :, 256:], lse[:, :, 256:])
    _, lse3 = backend_flex.flex_pooled_attention(q, pk, pv, bias, 0.6)
    finite = torch.isfinite(lse)
    assert not torch.allclose(lse3[finite], lse[finite])
    shared = bias[:, :1]  # one bias for every head broadcasts
    out4, lse4 = backend_flex.flex_pooled_attention(q, pk, pv, shared, 0.3)
    _check_pooled(out4, lse4, *_pooled_f64(q, pk, pv, shared.expand_as(bias), 0.3), 1e-5)


def test_pooled_attention_rejects_bad_arguments():
    q, pk, pv, bias = _pooled_case(1, 4, 2, 300, 5, 64)
    fpa = backend_flex.flex_pooled_attention
    with pytest.raises(ValueError, match="bias"):
        fpa(q, pk, pv, bias[:, :, :2], 0.1)
    with pytest.raises(ValueError, match="bias"):
        fpa(q, pk, pv, bias.double(), 0.1)
    with pytest.raises(ValueError, match="pooled_k"):
        fpa(q, pk[:, :, :, :32], pv[:, :, :, :32], bias, 0.1)
    with pytest.raises(ValueError, match="pooled_k"):
        fpa(q, torch.randn(1, 3, 5, 64), torch.randn(1, 3, 5, 64), bias, 0.1)
    with pytest.raises(ValueError, match="same shape"):
        fpa(q, pk, pv[:, :, :4], bias, 0.1)
    with pytest.raises(TypeError, match="scale"):
        fpa(q, pk, pv, bias, float("nan"))
    with pytest.raises(TypeError, match="q must be"):
        fpa(q.numpy(), pk, pv, bias, 0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dtype", [
    ((2, 4, 2, 333, 6, 64), torch.bfloat16),
    ((1, 3, 3, 1000, 40, 128), torch.float16),
    ((1, 2, 1, 257, 3, 80), torch.bfloat16),
])
def test_pooled_attention_compiled_on_gpu(shape, dtype):
    b, hq, hkv, nq, mk, d = shape
    q, pk, pv, bias = _pooled_case(b, hq, hkv, nq, mk, d, device="cuda", dtype=dtype)
    out, lse = backend_flex.flex_pooled_attention(q, pk, pv, bias, d ** -0.5)
    # the reference sees the pooled operands rounded as the kernel does
    _check_pooled(out, lse, *_pooled_f64(q, pk.to(dtype), pv.to(dtype), bias, d ** -0.5), 2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [
    # (b, hq, hkv, nq, nk, d, causal, padded, dtype)
    (2, 4, 2, 333, 333, 64, True, True, torch.bfloat16),
    (1, 3, 3, 200, 517, 128, False, True, torch.float16),
])
def test_flex_backend_returns_lse_on_gpu(shape):
    b, hq, hkv, nq, nk, d, causal, padded, dtype = shape
    inp, mask, _ = _case(b, hq, hkv, nq, nk, d, causal=causal, padded=padded, device="cuda", dtype=dtype)
    poison = torch.full((b, hq, nq), math.nan, device="cuda")  # leave NaN in the allocator's cache
    del poison
    result = BACKEND.run(inp, mask, torch.full((hq,), math.inf, device="cuda"))
    em = element_mask(mask, nq, nk, is_causal=causal, key_padding_mask=inp.key_padding_mask, batch=b, heads=hq)
    k = inp.k.double().cpu().repeat_interleave(hq // hkv, 1)
    s = (inp.q.double().cpu() @ k.transpose(-1, -2)) * inp.scale
    ref = s.masked_fill(~em, -math.inf).logsumexp(-1)
    lse = result.lse.double().cpu()
    assert result.lse.dtype == torch.float32 and lse.shape == ref.shape
    empty = ref == -math.inf
    if causal:
        assert empty.any(), "causal with padding: the first rows of batch 0 have no key"
    assert (lse[empty] == -math.inf).all() and not lse.isnan().any()
    torch.testing.assert_close(lse[~empty], ref[~empty], atol=2e-2, rtol=1e-3)
