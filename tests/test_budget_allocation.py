"""How an error target shares its error among heads (ops/estimate.py, `allocate`): "call"
bounds the whole call's relative L1 with the fewest kept blocks, "head" bounds each head's;
checked against hand-computed cases, a brute-force optimum, and measured float64 errors."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.ops.estimate import allocate, sample_rows
from hf_creative_sparse.ops.inputs import attention_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.realistic_inputs import make_inputs  # noqa: E402


def test_hand_computed_allocation():
    # head 0 is easy (error 0.01 at 10% kept), head 1 hard; target 0.06 of the summed |o|.
    fractions = torch.tensor([0.1, 0.5, 1.0])
    err = torch.tensor([[0.01, 0.5], [0.0, 0.1], [0.0, 0.0]])[:, None, :]  # [F, G=1, H=2]
    ref = torch.ones(1, 2)
    assert allocate(fractions, err, ref, 0.06, "head").tolist() == [[0, 2]]  # 0.5 > 0.06 and 0.1 > 0.06
    # the call may err 0.12 in all: 0.01 + 0.1 fits with 0.1 + 0.5 of the blocks
    assert allocate(fractions, err, ref, 0.06, "call").tolist() == [[0, 1]]
    valid = torch.tensor([[True, False]])
    assert allocate(fractions, err, ref, 0.06, "call", valid).tolist() == [[0, 2]]  # an invalid head keeps all
    with pytest.raises(ValueError, match="allocation"):
        allocate(fractions, err, ref, 0.06, "mean")


def test_call_allocation_fits_and_is_near_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    fractions = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    for _ in range(40):
        heads = 4
        scale = torch.rand(heads, generator=g) ** 3  # easy and hard heads
        err = (scale[None, :] * (1 - fractions[:, None]) ** 2)[:, None, :]  # convex, decreasing, 0 at 1.0
        ref = torch.ones(1, heads)
        target = float(torch.rand(1, generator=g)) * 0.2 + 0.01
        call = allocate(fractions, err, ref, target, "call")[0]
        head = allocate(fractions, err, ref, target, "head")[0]
        cost = float(fractions[call].sum())
        assert float(err[call, 0, torch.arange(heads)].sum()) <= target * heads + 1e-6
        assert cost <= float(fractions[head].sum()) + 1e-6
        best = min(float(fractions[list(c)].sum()) for c in itertools.product(range(6), repeat=heads)
                   if float(err[list(c), 0, torch.arange(heads)].sum()) <= target * heads + 1e-6)
        assert cost <= best + 0.2 + 1e-6  # the Lagrangian's corner is at most one grid step from the optimum
        # and the slack is spent: no head can step one grid point down and still fit
        total = float(err[call, 0, torch.arange(heads)].sum())
        for h in range(heads):
            if call[h] > 0:
                step = float(err[call[h] - 1, 0, h] - err[call[h], 0, h])
                assert total + step > target * heads + 1e-9, (h, call.tolist())


def test_sample_rows_cover_block_positions():
    inp = attention_inputs(*(torch.randn(1, 1, 8192, 16) for _ in range(3)))
    rows = sample_rows(inp, 64)
    assert rows.numel() >= 60 and bool((rows[1:] > rows[:-1]).all())
    eighths = torch.bincount((rows % 128) // 16, minlength=8)
    assert int(eighths.min()) >= 5, eighths  # every part of a block is measured (edges err most)
    halves = torch.bincount(rows // 4096, minlength=2)
    assert int(halves.min()) >= 30  # and every part of the sequence


def test_config_allocation_defaults_and_validation():
    cfg = SparseAttentionConfig(target_l1=0.03)
    assert cfg.allocation_for(False) == "call" and cfg.allocation_for(True) == "head"
    assert SparseAttentionConfig(budget_allocation="call").allocation_for(True) == "call"
    with pytest.raises(ValueError, match="budget_allocation"):
        SparseAttentionConfig(budget_allocation="layer")


def _measure(family, causal, allocation, target, kw):
    q, k, v = make_inputs(family, 1, 4, 4096, 64, **kw)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    out, stats = hcs.sparse_attention(q, k, v, is_causal=causal, target_l1=target, min_seq_len=0, backend="reference",
                                      budget_allocation=allocation, return_stats=True)
    diff = (out.double() - ref).abs().sum((0, 2, 3))
    return stats, float(diff.sum() / ref.abs().sum()), diff / ref.abs().sum((0, 2, 3))


@pytest.mark.parametrize("family,kw", [("video", dict(grid=(4, 16, 28), text_len=4096 - 4 * 16 * 28)), ("local", {})])
def test_call_allocation_keeps_fewer_blocks_at_the_call_target(family, kw):
    target = 0.03
    call, call_l1, _ = _measure(family, False, "call", target, kw)
    head, head_l1, per_head = _measure(family, False, "head", target, kw)
    assert call_l1 <= 1.2 * target and call_l1 >= 0.5 * target, call_l1
    assert abs(call.estimated_l1 - call_l1) <= 0.25 * target
    assert bool((per_head <= 1.2 * target).all()), per_head  # "head" bounds every head
    assert call.kept_fraction < 0.85 * head.kept_fraction, (call.kept_fraction, head.kept_fraction)


def test_explicit_call_allocation_is_honoured_on_causal_calls():
    call, _, _ = _measure("causal_text", True, "call", 0.03, {})
    head, _, _ = _measure("causal_text", True, None, 0.03, {})
    assert not torch.equal(call.budgets, head.budgets)


def test_scalar_keywords_are_validated_and_honoured_per_call():
    """`sparse_attention` validates scalar keywords once per distinct set, yet a bad value
    still raises every time, a bool never stands in for an int, and each value is used."""
    q, k, v = make_inputs("local", 1, 2, 1024, 32)
    for _ in range(2):
        with pytest.raises(ValueError, match="budget_allocation"):
            hcs.sparse_attention(q, k, v, target_l1=0.03, budget_allocation="layer", min_seq_len=0)
    hcs.sparse_attention(q, k, v, topk=0.5, attention_sink=True, min_seq_len=0)
    with pytest.raises(TypeError, match="attention_sink"):
        hcs.sparse_attention(q, k, v, topk=0.5, attention_sink=1, min_seq_len=0)
    kept = [hcs.sparse_attention(q, k, v, topk=t, min_seq_len=0, backend="reference", return_stats=True)[1].kept_fraction
            for t in (0.25, 0.75)]
    assert kept[0] < kept[1]
