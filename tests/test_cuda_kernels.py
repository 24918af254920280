"""The CUDA extension (csrc/cuda) against independent references, on fresh random inputs
at odd sizes: the block-sparse forward (dtypes, head dims incl. padded ones, GQA, causal,
key padding, empty rows, the pv skip; outputs and per-row log-sum-exp), the GPU prediction pieces, the public entry points
with backend="cuda", and the custom ops under torch.compile. All marked `cuda`."""

from __future__ import annotations

import math

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops import predict_cuda
from hf_creative_sparse.ops._ext import load_extension
from hf_creative_sparse.ops.custom_ops import block_sparse_fwd, compiled_sparse_attention
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.masks import block_mask_to_lut, check_block_mask, pool_blocks, predict_from_inputs
from hf_creative_sparse.ops.reference import reference_attention
from reference_impl import element_mask, masked_attention_f64, pv_skip_attention_f64

pytestmark = pytest.mark.cuda

TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp(min=1e-30))


def _case(b, hq, hkv, nq, nk, d, dtype, *, causal=False, padded=False, keep=0.5, scale_q=1.0):
    dev = "cuda"
    q = (torch.randn(b, hq, nq, d, device=dev) * scale_q).to(dtype)
    k = torch.randn(b, hkv, nk, d, device=dev).to(dtype)
    v = torch.randn(b, hkv, nk, d, device=dev).to(dtype)
    kpm = None
    if padded:
        kpm = torch.rand(b, nk, device=dev) > 0.25
        kpm[0, : min(nk, 150)] = False  # causal: the first rows of batch 0 have no key at all
    inp = attention_inputs(q, k, v, is_causal=causal, key_padding_mask=kpm)
    mask = check_block_mask(torch.rand(b, hq, inp.num_q_blocks, inp.num_k_blocks, device=dev) < keep, inp)
    return inp, mask


# mma.sync (sm_80 style) and the Hopper kernel (warp-specialized TMA + wgmma)
KERNELS = {"mma": 1, "hopper": 2}


@pytest.fixture(params=list(KERNELS))
def kernel(request):
    """Runs the test with one CUDA kernel forced."""
    mod = load_extension("cuda").module
    assert mod is not None, load_extension("cuda").error
    if request.param != "mma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the {request.param} kernel needs an sm_90 GPU")
    mod.set_kernel_preference(KERNELS[request.param])
    yield request.param
    mod.set_kernel_preference(0)


def _check_kernel_used(kernel: str, d: int) -> None:
    expected = KERNELS[kernel] if d <= 128 else 1  # head dims > 128 always run the mma.sync kernel
    assert load_extension("cuda").module.last_kernel() == expected


def _poison_freed_memory(inp) -> None:
    """Leave NaN-filled blocks of the output's and the lse's sizes in the caching allocator,
    so the kernel's outputs (allocated next, with at::empty) start as NaN where not written."""
    poison = [torch.full(inp.q.shape, math.nan, dtype=inp.q.dtype, device="cuda") for _ in range(2)]
    poison += [torch.full(inp.q.shape[:3], math.nan, dtype=torch.float32, device="cuda") for _ in range(2)]
    del poison


def _run(inp, mask, pv=math.inf):
    """(out, pv_counts, lse) of the kernel on ``mask``."""
    counts, indices = block_mask_to_lut(mask)
    pvt = torch.full((inp.heads_q,), float(pv), device="cuda")
    _poison_freed_memory(inp)
    return block_sparse_fwd(inp.q, inp.k, inp.v, counts, indices, inp.key_padding_mask, inp.is_causal,
                            inp.scale, pvt)


def _lse_f64(inp, em: torch.Tensor) -> torch.Tensor:
    """float64 log-sum-exp [B, Hq, Nq] of scale * q.k over the usable keys ``em``
    (bool [B, Hq, Nq, Nk]); -inf for rows without any."""
    q, k = inp.q.double().cpu(), inp.k.double().cpu()
    k = k.repeat_interleave(inp.heads_q // inp.heads_kv, 1)
    s = (q @ k.transpose(-1, -2)) * inp.scale
    return s.masked_fill(~em.expand(s.shape), -math.inf).logsumexp(-1)


def _check_lse(lse: torch.Tensor, ref: torch.Tensor) -> None:
    """The kernel's lse against a float64 one: same -inf rows, close elsewhere (the scores
    of both come from the same 16-bit inputs; float32 accumulation)."""
    assert lse.dtype == torch.float32 and lse.shape == ref.shape
    lse = lse.double().cpu()
    assert not lse.isnan().any(), "unwritten (poisoned) or NaN lse"
    empty = ref == -math.inf
    assert (lse[empty] == -math.inf).all(), "rows without a usable key must have lse -inf"
    assert torch.isfinite(lse[~empty]).all()
    err = (lse[~empty] - ref[~empty]).abs().max().item() if (~empty).any() else 0.0
    assert err < 2e-3 + 1e-4 * ref[~empty].abs().max().item(), f"lse max error {err:.2e}"


def test_extension_builds():
    status = load_extension("cuda")
    assert status.module is not None, status.error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [
    # (b, hq, hkv, nq, nk, d, causal, padded)
    (2, 4, 2, 333, 333, 64, True, True),     # GQA, causal, padding, rows without keys
    (1, 3, 3, 200, 517, 128, False, True),   # Nq != Nk, padding
    (1, 2, 1, 257, 257, 128, True, False),   # causal, odd length
    (1, 2, 2, 131, 190, 32, False, False),   # padded head dim 32 -> 64
    (1, 2, 1, 300, 300, 80, True, False),    # 80 -> 128
    (1, 1, 1, 150, 260, 160, False, True),   # 160 -> 256
    (1, 2, 2, 129, 129, 256, False, False),  # native 256
])
def test_forward_matches_float64_reference(shape, dtype, kernel):
    b, hq, hkv, nq, nk, d, causal, padded = shape
    inp, mask = _case(b, hq, hkv, nq, nk, d, dtype, causal=causal, padded=padded)
    out, counts, lse = _run(inp, mask)
    _check_kernel_used(kernel, d)
    em = element_mask(mask, nq, nk, is_causal=causal, key_padding_mask=inp.key_padding_mask, batch=b, heads=hq)
    ref = masked_attention_f64(inp.q, inp.k, inp.v, em)
    _check_lse(lse, _lse_f64(inp, em))
    assert out.shape == (b, hq, nq, d) and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert _rel(out, ref) < TOL[dtype], f"relative error {_rel(out, ref):.2e}"
    no_key = ~em.any(-1)  # rows without any usable key must be exact zeros
    assert (out.cpu()[no_key] == 0).all()
    _, skipped, visited = reference_attention(inp, mask, torch.full((hq,), math.inf, device="cuda"))
    assert counts.tolist() == [0, visited]


@pytest.fixture(params=[1, 3, 7])
def few_ctas(request):
    """The Hopper kernel with a persistent grid of 1, 3 or 7 CTAs, so that each CTA walks
    many work items: empty rows, odd and even tile counts, heads and batches in turn."""
    mod = load_extension("cuda").module
    assert mod is not None, load_extension("cuda").error
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs an sm_90 GPU")
    mod.set_kernel_preference(KERNELS["hopper"])
    mod.set_max_ctas(request.param)
    yield request.param
    mod.set_max_ctas(0)
    mod.set_kernel_preference(0)


@pytest.mark.parametrize("shape", [
    # (b, hq, hkv, nq, nk, d, causal, padded, dtype)
    (2, 4, 2, 700, 700, 64, True, True, torch.bfloat16),
    (2, 3, 3, 450, 1030, 128, False, True, torch.float16),
    (1, 6, 2, 901, 901, 128, True, False, torch.bfloat16),
])
def test_persistent_grid_walks_items_correctly(shape, few_ctas):
    b, hq, hkv, nq, nk, d, causal, padded, dtype = shape
    inp, mask = _case(b, hq, hkv, nq, nk, d, dtype, causal=causal, padded=padded, keep=0.4)
    mask[:, :, 1] = False  # whole query blocks without a kept block, between busy ones
    mask[0, 0, 2, :3] = True  # and one with a single (odd) kept block next to them
    mask[0, 0, 2, 3:] = False
    mask = check_block_mask(mask, inp)
    out, counts, lse = _run(inp, mask)
    assert load_extension("cuda").module.last_kernel() == KERNELS["hopper"]
    em = element_mask(mask, nq, nk, is_causal=causal, key_padding_mask=inp.key_padding_mask, batch=b, heads=hq)
    ref = masked_attention_f64(inp.q, inp.k, inp.v, em)
    _check_lse(lse, _lse_f64(inp, em))
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert _rel(out, ref) < TOL[dtype], f"relative error {_rel(out, ref):.2e}"
    assert (out.cpu()[~em.any(-1)] == 0).all()
    _, _, visited = reference_attention(inp, mask, torch.full((hq,), math.inf, device="cuda"))
    assert counts.tolist() == [0, visited]


def test_persistent_grid_pv_skip_counts(few_ctas):
    # the pv-skip votes alternate between two vote slots across items: counts must stay exact
    b, h, n, d = 1, 2, 700, 64
    base = torch.randn(b, h, math.ceil(n / 64), d, device="cuda") * 2.5
    q = base.repeat_interleave(64, dim=2)[:, :, :n].to(torch.float16)
    k = torch.randn(b, h, n, d, device="cuda").to(torch.float16)
    v = torch.randn(b, h, n, d, device="cuda").to(torch.float16)
    inp = attention_inputs(q, k, v)
    mask = check_block_mask(torch.rand(b, h, inp.num_q_blocks, inp.num_k_blocks, device="cuda") < 0.7, inp)
    out, counts, _ = _run(inp, mask, 3.0)
    ref, skipped, visited = pv_skip_attention_f64(q, k, v, mask.cpu(), 3.0)
    assert skipped > 0, "the test inputs should trigger the skip"
    assert counts.tolist() == [skipped, visited]
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("causal,padded", [(False, False), (True, True)])
def test_partials_over_disjoint_masks_merge_to_the_whole(kernel, causal, padded):
    # docs/DESIGN.md "Partial softmax": two results over disjoint key sets merge exactly by
    # their lse; also through the backend (BackendResult.lse), GQA, odd length.
    from hf_creative_sparse.ops.dispatch import get_backend

    inp, mask = _case(2, 4, 2, 461, 461, 128, torch.bfloat16, causal=causal, padded=padded, keep=0.7)
    part = check_block_mask(mask & (torch.rand(mask.shape, device="cuda") < 0.5), inp)
    rest = check_block_mask(mask & ~part, inp)
    pvt = torch.full((4,), math.inf, device="cuda")
    _poison_freed_memory(inp)
    a, b = get_backend("cuda").run(inp, part, pvt), get_backend("cuda").run(inp, rest, pvt)
    whole, _, whole_lse = _run(inp, mask)
    m = torch.maximum(a.lse, b.lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = (a.lse - m).exp()[..., None], (b.lse - m).exp()[..., None]
    merged = (a.out.float() * wa + b.out.float() * wb) / (wa + wb).clamp_min(1e-30)
    em = element_mask(mask, 461, 461, is_causal=causal, key_padding_mask=inp.key_padding_mask, batch=2, heads=4)
    ref = masked_attention_f64(inp.q, inp.k, inp.v, em)
    assert _rel(merged, ref) < TOL[torch.bfloat16]
    _check_lse(torch.logaddexp(a.lse, b.lse), _lse_f64(inp, em))
    _check_lse(whole_lse, _lse_f64(inp, em))


def test_nhd_views_and_full_mask_equal_sdpa(kernel):
    q = torch.randn(2, 700, 8, 64, device="cuda", dtype=torch.bfloat16)  # NHD: strided HND views
    k = torch.randn(2, 700, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 700, 2, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 6, 11, dtype=torch.bool, device="cuda")
    out = hcs.block_sparse_attention(q, k, v, mask, layout="NHD", backend="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(4, 1),
        v.transpose(1, 2).float().repeat_interleave(4, 1)).transpose(1, 2)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_pv_skip_equals_per_row_reference_when_group_rows_agree(kernel):
    # Every 64-row group of a query block holds one repeated row, so the kernels' per-warp
    # decision is the per-row one: results and counts must match the per-row reference.
    b, h, n, d = 1, 2, 384, 64
    base = torch.randn(b, h, n // 64, d, device="cuda") * 2.5
    q = base.repeat_interleave(64, dim=2).to(torch.float16)
    k = torch.randn(b, h, n, d, device="cuda").to(torch.float16)
    v = torch.randn(b, h, n, d, device="cuda").to(torch.float16)
    inp = attention_inputs(q, k, v)
    mask = check_block_mask(torch.rand(b, h, 3, 6, device="cuda") < 0.8, inp)
    thr = 3.0
    out, counts, lse = _run(inp, mask, thr)
    ref, skipped, visited = pv_skip_attention_f64(q, k, v, mask.cpu(), thr)
    assert skipped > 0, "the test inputs should trigger the skip"
    assert counts.tolist() == [skipped, visited]
    assert _rel(out, ref) < TOL[torch.float16]
    # lse over the keys actually used: skipped blocks are left out, as in the reference
    pvt = torch.full((h,), thr, device="cuda")
    _, _, _, ref_lse = reference_attention(inp, mask, pvt, return_lse=True)
    _check_lse(lse, ref_lse.double().cpu())
    full = _lse_f64(inp, element_mask(mask, n, n, batch=b, heads=h))
    drop = full - ref_lse.double().cpu()
    rows = drop > 1e-3
    assert rows.any(), "the skip should remove visible mass from some rows"
    assert ((full - lse.double().cpu())[rows] > 0.5 * drop[rows]).all(), "skipped blocks must leave the lse"


def test_pv_skip_per_group_within_tolerance_on_random_rows(kernel):
    inp, mask = _case(1, 2, 2, 512, 1024, 64, torch.bfloat16, keep=0.9, scale_q=3.0)
    thr = 6.0
    out, counts, _ = _run(inp, mask, thr)
    _, ref_skipped, ref_visited = reference_attention(inp, mask, torch.full((2,), thr, device="cuda"))
    exact = masked_attention_f64(inp.q, inp.k, inp.v, element_mask(mask, 512, 1024, batch=1, heads=2))
    skipped, visited = counts.tolist()
    assert visited == ref_visited and 0 <= skipped <= ref_skipped
    # a skipped block's weights are < exp(-thr) of the row max: bounded change from exact attention
    assert _rel(out, exact) < TOL[torch.bfloat16] + 16 * math.exp(-thr)


def test_hopper_kernel_skips_no_vote_where_the_skip_cannot_change_the_output():
    # pvthreshd >= 20: skipped weights would be < exp(-20) of the row's largest, far under
    # bf16 rounding, and the Hopper kernel runs P V regardless; it does not vote then.
    mod = load_extension("cuda").module
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs an sm_90 GPU")
    mod.set_kernel_preference(KERNELS["hopper"])
    try:
        inp, mask = _case(1, 2, 2, 700, 1500, 128, torch.bfloat16, keep=0.9, scale_q=6.0)
        exact, exact_counts, exact_lse = _run(inp, mask, math.inf)
        out, counts, lse = _run(inp, mask, 25.0)
        low, low_counts, _ = _run(inp, mask, 4.0)
    finally:
        mod.set_kernel_preference(0)
    assert counts.tolist() == exact_counts.tolist() and counts[0] == 0
    assert torch.equal(out, exact) and torch.equal(lse, exact_lse)
    assert low_counts[0] > 0, "a low threshold must still skip"


@pytest.mark.parametrize("block,d,dtype", [
    (128, 128, torch.bfloat16),  # vectorised kernel, 16 lanes a token
    (64, 64, torch.float16),     # vectorised, 8 lanes a token
    (128, 64, torch.float32),    # vectorised, 16 lanes of 4 floats
    (64, 96, torch.bfloat16),    # 12 lanes: the scalar kernel
])
def test_gpu_pooling_matches_torch(block, d, dtype):
    x = torch.randn(2, 3, 1000, d, device="cuda").to(dtype)
    valid = torch.rand(2, 1000, device="cuda") > 0.2
    fused = predict_cuda.pool_blocks_cuda(x, block, valid)
    predict_cuda.ENABLED = False
    try:
        ref = pool_blocks(x, block, valid)
    finally:
        predict_cuda.ENABLED = True
    for a, r in zip(fused, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)


def _gpu_and_torch_predictions(inp, variant: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused GPU prediction and the PyTorch path's, simthreshd1 0.3."""
    got = predict_from_inputs(inp, simthreshd1=0.3, **variant)
    predict_cuda.ENABLED = False
    try:
        want = predict_from_inputs(inp, simthreshd1=0.3, **variant)
    finally:
        predict_cuda.ENABLED = True
    return got, want


@pytest.mark.parametrize("variant", [
    dict(cdfthreshd=0.9),
    dict(cdfthreshd=None, topk=0.3),
    dict(cdfthreshd=0.95, causal=True, attention_sink=True),
    dict(cdfthreshd=0.8, dense_prefix=300, dense_suffix=200, gqa=True),
])
def test_gpu_prediction_agrees_with_torch_prediction(variant):
    variant = dict(variant)
    causal, gqa = variant.pop("causal", False), variant.pop("gqa", False)
    # Smooth (self-similar) tokens so the prediction actually selects blocks.
    walk = torch.randn(2, 4, 4000, 64, device="cuda").cumsum(2) / 20
    q = (walk + 0.3 * torch.randn_like(walk)).to(torch.bfloat16)
    k = (walk + 0.3 * torch.randn_like(walk)).to(torch.bfloat16)
    if gqa:
        k = k[:, ::2].contiguous()
    kpm = None if causal else torch.rand(2, 4000, device="cuda") > 0.1
    inp = attention_inputs(q, k, k, key_padding_mask=kpm, is_causal=causal)
    got, want = _gpu_and_torch_predictions(inp, variant)
    assert got.shape == want.shape and got.dtype == torch.bool
    assert 0.02 < want.float().mean() < 0.98, "the test should select a proper subset"
    agree = (got == want).float().mean().item()
    assert agree > 0.999, f"GPU and torch predictions agree on {agree:.5f} of the blocks"


@pytest.mark.parametrize("variant", [dict(cdfthreshd=0.9), dict(cdfthreshd=None, topk=0.2)])
def test_gpu_prediction_long_rows_agree_with_torch(variant):
    # 1100 key blocks: past the warp-per-row selection, through the block-per-row kernel
    walk = torch.randn(1, 2, 70400, 64, device="cuda").cumsum(2) / 40
    q = (walk + 0.3 * torch.randn_like(walk)).to(torch.bfloat16)
    k = (walk + 0.3 * torch.randn_like(walk)).to(torch.bfloat16)
    inp = attention_inputs(q, k, k)
    assert inp.num_k_blocks > predict_cuda.WARP_SELECT_MAX_KEY_BLOCKS
    got, want = _gpu_and_torch_predictions(inp, variant)
    assert 0.02 < want.float().mean() < 0.98
    assert (got == want).float().mean().item() > 0.999


@pytest.mark.parametrize("causal,hkv,d", [(False, 4, 64), (True, 4, 128), (False, 2, 128)])
def test_dense_fallback_matches_float64(causal, hkv, d):
    from hf_creative_sparse.ops.dense import dense_attention

    q = torch.randn(2, 4, 777, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, hkv, 777, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, hkv, 777, d, device="cuda", dtype=torch.bfloat16)
    inp = attention_inputs(q, k, v, is_causal=causal)
    with torch.no_grad():
        out = dense_attention(inp)
    em = torch.ones(777, 777, dtype=torch.bool).tril() if causal else torch.ones(777, 777, dtype=torch.bool)
    ref = masked_attention_f64(q, k, v, em[None, None].expand(2, 4, 777, 777))
    assert out.shape == (2, 4, 777, d) and out.dtype == torch.bfloat16
    assert _rel(out, ref) < TOL[torch.bfloat16]
    if torch.cuda.get_device_capability() == (9, 0):
        from hf_creative_sparse.ops import dense

        assert dense._CUDNN_DIRECT_OK, "the direct cuDNN call should work on Hopper"


def test_mask_to_lut_equals_torch():
    mask = torch.rand(3, 5, 7, 133, device="cuda") < 0.3
    mask[0, 0, 0] = False
    mask[0, 0, 1] = True
    got = predict_cuda.mask_to_lut(mask)
    want = block_mask_to_lut(mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_public_api_with_cuda_backend():
    inp, mask = _case(1, 4, 1, 1500, 1500, 128, torch.bfloat16, causal=True, padded=True)
    out, stats = hcs.sparse_attention(inp.q, inp.k, inp.v, is_causal=True, key_padding_mask=inp.key_padding_mask,
                                      topk=0.5, simthreshd1=-1.0, backend="cuda", return_stats=True)
    assert stats.backend == "cuda"
    em = element_mask(stats.block_mask, 1500, 1500, is_causal=True, key_padding_mask=inp.key_padding_mask,
                      batch=1, heads=4)
    ref = masked_attention_f64(inp.q, inp.k, inp.v, em)
    assert _rel(out, ref) < TOL[torch.bfloat16]


def test_custom_ops_compile_without_graph_breaks():
    q = torch.randn(1, 4, 1100, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    inp = attention_inputs(q, k, v)
    mask = check_block_mask(torch.rand(1, 4, 9, 18, device="cuda") < 0.5, inp)
    counts, indices = block_mask_to_lut(mask)
    pv = torch.full((4,), math.inf, device="cuda")

    def layer(q, k, v):
        out, _, lse = block_sparse_fwd(q * 1.0, k, v, counts, indices, None, False, 0.125, pv)
        return out.float().relu() + lse[..., None]

    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)

    cfg = hcs.SparseAttentionConfig(topk=0.3, simthreshd1=-1.0, min_seq_len=0, backend="cuda")

    def model(q, k, v):
        out, stats = compiled_sparse_attention(q * 1.0, k, v, cfg)
        return out + 1.0, stats

    e_out, e_stats = model(q, k, v)
    c_out, c_stats = torch.compile(model, fullgraph=True)(q, k, v)
    torch.testing.assert_close(c_out, e_out)
    assert c_stats[0].item() == pytest.approx(e_stats[0].item()) and c_stats[3].item() == 0.0


def test_kernel_switches_reject_bad_values():
    # In a subprocess: on the lent H100/H200 machines (torch 2.11+cu130) any C++ exception
    # from a torch extension, even a minimal load_inline one, kills Python with SIGSEGV.
    import subprocess
    import sys

    code = """
import pytest
from hf_creative_sparse.ops._ext import load_extension
mod = load_extension("cuda").module
with pytest.raises(RuntimeError, match="kernel preference must be"):
    mod.set_kernel_preference(3)
with pytest.raises(RuntimeError, match="probe bits must be"):
    mod.set_probe(-1)
with pytest.raises(RuntimeError, match="max_ctas must be"):
    mod.set_max_ctas(-1)
print("raised")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        pytest.skip(f"C++ exceptions from torch extensions crash this Python (signal {-proc.returncode})")
    assert proc.returncode == 0 and "raised" in proc.stdout, proc.stdout + proc.stderr[-2000:]
