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
from hf_creative_sparse.ops import backend_flex
from hf_creative_sparse.ops.backend_flex import BACKEND, PV_EXACT_THRESHOLD, flex_block_sparse, kernel_options
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
