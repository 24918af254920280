"""Layout mix-ups that used to pass silently (issue 17): q and k/v in different layouts are
refused; an implausible shape (hundreds of heads over a handful of tokens) warns once."""

import warnings

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops import inputs


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch):
    monkeypatch.setattr(inputs, "_warned_implausible", False)


def test_q_and_kv_in_different_layouts_are_refused():
    hnd = torch.randn(1, 4, 2048, 16)
    nhd = hnd.transpose(1, 2).contiguous()
    # q HND, k/v NHD under layout="NHD": would run as GQA with 512 groups over 4 queries
    with pytest.raises(ValueError, match=r"different layouts.*2048 heads over 4 tokens.*512 q heads per k/v head"):
        hcs.sparse_attention(hnd, nhd, nhd, layout="NHD")
    # q NHD, k/v HND under the default layout: the same, read the other way round
    with pytest.raises(ValueError, match="different layouts"):
        hcs.sparse_attention(nhd, hnd, hnd)
    # q HND, k/v NHD under the default layout: heads do not divide; the message says why
    with pytest.raises(ValueError, match=r"multiple of the number of k/v heads \(2048\).*different layouts"):
        hcs.sparse_attention(hnd, nhd, nhd)
    with pytest.raises(ValueError, match="different layouts"):
        hcs.block_sparse_attention(hnd, nhd, nhd, torch.ones(1, 2048, 1, 1, dtype=torch.bool), layout="NHD")


def test_an_implausible_shape_warns_once():
    nhd = torch.randn(1, 2048, 4, 16)  # (batch, seq, heads, head_dim) passed as the default HND
    with pytest.warns(UserWarning, match=r"2048 q heads over 4 tokens.*layout='NHD'"):
        out = hcs.sparse_attention(nhd, nhd, nhd)
    ref = torch.nn.functional.scaled_dot_product_attention(nhd, nhd, nhd)
    torch.testing.assert_close(out, ref)  # still computed as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hcs.sparse_attention(nhd, nhd, nhd)  # once, not per call
        torch.testing.assert_close(hcs.sparse_attention(nhd, nhd, nhd, layout="NHD"),
                                   torch.nn.functional.scaled_dot_product_attention(
                                       *(t.transpose(1, 2) for t in (nhd, nhd, nhd))).transpose(1, 2))


@pytest.mark.parametrize("q_shape,kv_shape", [
    ((1, 32, 1, 16), (1, 1, 32, 16)),       # MQA decode step: 32 heads, 32 cached keys
    ((2, 32, 40, 16), (2, 8, 40, 16)),      # GQA, 4 groups
    ((1, 300, 64, 8), (1, 300, 64, 8)),     # many heads over a real sequence
    ((1, 300, 20, 8), (1, 1, 300, 8)),      # MQA with as many heads as keys, 20 queries
])
def test_plausible_shapes_pass_silently(q_shape, kv_shape):
    q, k = torch.randn(*q_shape), torch.randn(*kv_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hcs.sparse_attention(q, k, k)
    assert out.shape == q.shape
