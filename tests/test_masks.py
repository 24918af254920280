"""Block-mask prediction against a per-block loop written from DESIGN.md's description."""

from __future__ import annotations

import math

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.masks import block_mask_to_lut
from reference_impl import structured_qkv


def naive_predict(q, k, *, simthreshd1, cdfthreshd=None, topk=None, is_causal=False, kpm=None, sink=False,
                  prefix=0, suffix=0):
    b, hq, nq, d = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    scale = d ** -0.5
    mq, mk = math.ceil(nq / 128), math.ceil(nk / 64)
    out = torch.zeros(b, hq, mq, mk, dtype=torch.bool)

    def pool(x, rows):
        x = x[rows].double()
        unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return x.mean(0), (unit @ unit.T).mean().item()

    for bi in range(b):
        for h in range(hq):
            qb = [pool(q[bi, h], torch.arange(i * 128, min(nq, (i + 1) * 128))) for i in range(mq)]
            kb, has = [], []
            for j in range(mk):
                cols = torch.arange(j * 64, min(nk, (j + 1) * 64))
                if kpm is not None:
                    cols = cols[kpm[bi, cols]]
                has.append(len(cols) > 0)
                kb.append(pool(k[bi, h // group], cols) if len(cols) else (torch.zeros(d, dtype=torch.float64), 0.0))
            if is_causal:  # strictly causal: block i is scored with block i - 1's pooled query
                qb = [(torch.zeros(d, dtype=torch.float64), 2.0)] + qb[:-1]
            for i in range(mq):
                last_row = min(nq - 1, i * 128 + 127)
                allowed = [has[j] and (not is_causal or j * 64 <= last_row) for j in range(mk)]
                cands = [j for j in range(mk) if allowed[j] and kb[j][1] > simthreshd1
                         and not (is_causal and min(nk - 1, j * 64 + 63) >= i * 128)]  # no future key ranked
                keep = set(j for j in range(mk) if kb[j][1] <= simthreshd1)
                if qb[i][1] <= simthreshd1:
                    keep |= set(range(mk))
                if cands:
                    scores = torch.tensor([float(qb[i][0] @ kb[j][0]) * scale for j in cands])
                    probs = torch.softmax(scores, 0)
                    order = [cands[t] for t in torch.argsort(probs, descending=True).tolist()]
                    sorted_p = probs.sort(descending=True).values
                    if topk is not None:
                        n = min(len(cands), max(1, math.ceil(topk * sum(allowed) - 1e-6)))
                    elif cdfthreshd >= 1.0:
                        n = len(cands)
                    else:
                        n, total = 0, 0.0
                        while n < len(cands) and total < cdfthreshd:
                            total += float(sorted_p[n])
                            n += 1
                    keep |= set(order[:n])
                if sink:
                    keep.add(0)
                if prefix and i * 128 < prefix:
                    keep |= set(range(mk))
                if suffix and last_row >= nq - suffix:
                    keep |= set(range(mk))
                keep |= set(j for j in range(mk) if j * 64 < prefix or (j + 1) * 64 > nk - suffix and suffix > 0)
                if is_causal:  # the diagonal and the recent window (the previous query block's keys)
                    keep |= set(j for j in range(mk) if j * 64 <= last_row and min(nk - 1, j * 64 + 63) >= (i - 1) * 128)
                for j in keep:
                    out[bi, h, i, j] = allowed[j]
    return out


@pytest.mark.parametrize("kwargs", [
    dict(simthreshd1=0.3, cdfthreshd=0.9),
    dict(simthreshd1=0.3, cdfthreshd=0.5, is_causal=True),
    dict(simthreshd1=-1.0, topk=0.3),
    dict(simthreshd1=-1.0, topk=0.2, is_causal=True, sink=True),
    dict(simthreshd1=0.3, cdfthreshd=0.7, prefix=70, suffix=90),
    dict(simthreshd1=0.95, cdfthreshd=0.8),  # some blocks not self-similar
    dict(simthreshd1=0.3, cdfthreshd=1.0),
])
def test_prediction_matches_block_loop(kwargs):
    n = 777
    q, k, _ = structured_qkv(2, 4, 2, n, 32, seed=11)
    kpm = torch.arange(n)[None, :] < torch.tensor([[n], [500]])
    kpm = kpm.reshape(2, n)
    mapping = dict(sink="attention_sink", prefix="dense_prefix", suffix="dense_suffix")
    api_kwargs = {mapping.get(key, key): value for key, value in kwargs.items()}
    got = hcs.predict_block_mask(q, k, key_padding_mask=kpm, **api_kwargs)
    want = naive_predict(q, k, kpm=kpm, **kwargs)
    assert got.shape == (2, 4, 7, 13)
    assert torch.equal(got, want), f"{(got != want).sum().item()} blocks differ"


def test_prediction_properties():
    n = 1000
    q, k, _ = structured_qkv(1, 2, 2, n, 64, seed=5)
    full = hcs.predict_block_mask(q, k, cdfthreshd=1.0, simthreshd1=0.0)
    assert full.all(), "cdfthreshd=1 keeps every block"
    causal = hcs.predict_block_mask(q, k, is_causal=True, topk=0.1, simthreshd1=-1.0)
    rows = torch.arange(8)[:, None] * 128 + 127
    above = torch.arange(16)[None, :] * 64 > rows.clamp(max=n - 1)
    assert not causal[..., above].any(), "nothing above the causal diagonal"
    assert causal.sum(-1).min() >= 1, "every query block keeps at least one key block"
    sink = hcs.predict_block_mask(q, k, topk=0.1, simthreshd1=-1.0, attention_sink=True)
    assert sink[..., 0].all()
    text = hcs.predict_block_mask(q, k, topk=0.1, simthreshd1=-1.0, dense_prefix=200)
    assert text[:, :, :2, :].all() and text[..., :4].all(), "text rows and columns stay dense"
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, 640:] = False
    padded = hcs.predict_block_mask(q, k, cdfthreshd=1.0, simthreshd1=0.0, key_padding_mask=pad)
    assert not padded[..., 10:].any() and padded[..., :10].all(), "fully padded key blocks are never kept"
    per_head = hcs.predict_block_mask(q, k, topk=torch.tensor([0.1, 1.0]), simthreshd1=-1.0)
    assert per_head[0, 1].all() and per_head[0, 0].float().mean() < 0.3


def test_topk_counts():
    q, k, _ = structured_qkv(1, 1, 1, 1280, 16, seed=2)
    mask = hcs.predict_block_mask(q, k, topk=0.25, simthreshd1=-1.0)
    assert (mask.sum(-1) == 5).all()  # ceil(0.25 * 20)


def test_lut_lists_kept_blocks_in_order():
    mask = torch.rand(2, 3, 4, 9) < 0.4
    counts, idx = block_mask_to_lut(mask)
    assert counts.dtype == torch.int32 and idx.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            for i in range(4):
                want = torch.nonzero(mask[b, h, i]).flatten().to(torch.int32)
                assert counts[b, h, i] == len(want)
                assert torch.equal(idx[b, h, i, : len(want)], want)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cdfthreshd=1.5), ValueError, "cdfthreshd"),
    (dict(topk=0.0), ValueError, "topk"),
    (dict(simthreshd1=float("nan")), ValueError, "simthreshd1"),
    (dict(cdfthreshd=0.9, topk=0.3), ValueError, "not both"),
    (dict(simthreshd1=torch.tensor([0.5, 0.5, 0.5])), ValueError, "per q head"),
    (dict(dense_prefix=-1), ValueError, "dense_prefix"),
    (dict(layout="BNHD"), ValueError, "layout"),
    (dict(key_padding_mask=torch.ones(1, 300)), TypeError, "key_padding_mask"),
])
def test_predict_block_mask_names_bad_arguments(kwargs, exc, match):
    q = torch.randn(1, 2, 300, 16)
    with pytest.raises(exc, match=match):
        hcs.predict_block_mask(q, q, **kwargs)


def test_predict_block_mask_rejects_bad_tensors():
    with pytest.raises(ValueError, match="q must be 4-D"):
        hcs.predict_block_mask(torch.randn(2, 300, 16), torch.randn(1, 2, 300, 16))
    with pytest.raises(TypeError, match="float32"):
        hcs.predict_block_mask(torch.ones(1, 2, 300, 16, dtype=torch.int32), torch.ones(1, 2, 300, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple"):
        hcs.predict_block_mask(torch.randn(1, 3, 300, 16), torch.randn(1, 2, 300, 16))


@pytest.mark.parametrize("causal", [False, True])
def test_attendable_block_count_on_host_equals_the_mask(causal):
    from hf_creative_sparse.ops.inputs import attention_inputs
    from hf_creative_sparse.ops.masks import attendable_block_count, attendable_blocks

    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        nq = int(torch.randint(1, 1400, (1,), generator=gen))
        nk = nq if causal else int(torch.randint(1, 1400, (1,), generator=gen))
        q, k = torch.randn(2, 3, nq, 8), torch.randn(2, 3, nk, 8)
        inp = attention_inputs(q, k, k, is_causal=causal)
        assert attendable_block_count(inp) == int(attendable_blocks(inp).sum()) * 3
