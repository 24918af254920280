"""The CPU policy (ops/cpu_policy.py): rates measured once per machine and cached beside
the extension, and the decisions that follow from them (checked against hand-computed
values from given rates)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_creative_sparse.ops import cpu_policy as cp
from hf_creative_sparse.ops._ext import ExtensionStatus, load_extension
from hf_creative_sparse.ops.inputs import attention_inputs


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch, tmp_path):
    """Each test starts without remembered rates and with its own cache file."""
    monkeypatch.setattr(cp, "_MEMO", {})
    monkeypatch.setenv("HCS_CPU_POLICY_CACHE", str(tmp_path / "rates.json"))


@pytest.fixture(scope="module")
def ext():
    status = load_extension("cpu")
    assert status.module is not None, f"the cpu extension must build in CI: {status.error}"
    return status.module


def _inp(b=1, h=8, n=4096, d=64, causal=False, hkv=None):
    q = torch.empty(b, h, n, d, device="meta")
    k = torch.empty(b, hkv or h, n, d, device="meta")
    return attention_inputs(q, k, k, is_causal=causal)


RATES = cp.CpuRates(isa="avx2", dense_flops=100e9, sparse_flops=90e9, predict_s_per_element=0.5e-9,
                    overhead_s=0.3e-3)


def test_rates_validate_themselves():
    with pytest.raises(ValueError, match="dense_flops"):
        cp.CpuRates(isa="avx2", dense_flops=math.nan, sparse_flops=1.0, predict_s_per_element=0.0, overhead_s=0.0)
    with pytest.raises(ValueError, match="overhead_s"):
        cp.CpuRates(isa="avx2", dense_flops=1.0, sparse_flops=1.0, predict_s_per_element=0.0, overhead_s=-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        cp.CpuRates(isa="avx2", dense_flops=1.0, sparse_flops=0.0, predict_s_per_element=0.0, overhead_s=0.0)


def test_decisions_follow_the_rates(monkeypatch):
    monkeypatch.setattr(cp, "cpu_rates", lambda refresh=False: RATES)
    inp = _inp()  # B1 H8 N4096 D64: 4*8*4096^2*64 = 34.36 GFLOP -> 0.3436 s dense at 100 GFLOP/s
    dense = 4 * 8 * 4096 ** 2 * 64 / 100e9
    assert cp.dense_seconds_cpu(inp, RATES) == pytest.approx(dense)
    assert cp.sparse_seconds_cpu(inp, 0.25, RATES) == pytest.approx(0.3e-3 + 0.25 * dense * 100 / 90)
    assert cp.max_useful_kept_fraction_cpu(inp) == pytest.approx(cp.MARGIN * 0.9 * (1 - 0.3e-3 / dense))
    # causal counts half the work: dense halves, the fixed overhead weighs twice as much
    causal = _inp(causal=True)
    assert cp.dense_seconds_cpu(causal, RATES) == pytest.approx(dense / 2)
    assert cp.max_useful_kept_fraction_cpu(causal) == pytest.approx(cp.MARGIN * 0.9 * (1 - 0.6e-3 / dense))
    # prediction: 2 * 8 * 4096 * 64 elements * 0.5 ns = 2.1 ms = 0.61% of dense: predict
    assert cp.prediction_seconds_cpu(inp, RATES) == pytest.approx(2 * 8 * 4096 * 64 * 0.5e-9)
    assert cp.skip_prediction_reason_cpu(inp) is None
    # GQA: k and v have fewer heads, so less to pool
    assert cp.prediction_seconds_cpu(_inp(hkv=2), RATES) == pytest.approx((8 + 2) * 4096 * 64 * 0.5e-9)


def test_expensive_prediction_is_skipped_unless_the_mask_is_reused(monkeypatch):
    slow = cp.CpuRates(isa="avx512", dense_flops=100e9, sparse_flops=120e9, predict_s_per_element=2e-9,
                       overhead_s=0.0)
    monkeypatch.setattr(cp, "cpu_rates", lambda refresh=False: slow)
    inp = _inp(b=8, h=12, n=1024, causal=True)  # GPT-2: prediction 25.2 ms against 128.8 ms dense
    reason = cp.skip_prediction_reason_cpu(inp)
    assert reason is not None and "predicting the mask" in reason and "avx512" in reason
    # shared by 5 calls it costs 3.9% of dense per call (4 calls: 4.9%)
    assert cp.skip_prediction_reason_cpu(inp, mask_uses=5) is None
    assert cp.skip_prediction_reason_cpu(inp, mask_uses=4) is not None
    with pytest.raises(ValueError, match="mask_uses"):
        cp.skip_prediction_reason_cpu(inp, mask_uses=0)


def test_slow_kernel_and_fixed_cost_bounds(monkeypatch):
    tiny = _inp(n=128, h=1)  # 4.2 MFLOP: 42 us dense, below the 0.3 ms fixed cost
    free_prediction = cp.CpuRates(isa="avx2", dense_flops=100e9, sparse_flops=90e9, predict_s_per_element=0.0,
                                  overhead_s=0.3e-3)
    monkeypatch.setattr(cp, "cpu_rates", lambda refresh=False: free_prediction)
    assert cp.max_useful_kept_fraction_cpu(tiny) == 0.0
    assert "fixed cost" in cp.skip_prediction_reason_cpu(tiny)
    fast = cp.CpuRates(isa="avx512", dense_flops=10e9, sparse_flops=100e9, predict_s_per_element=0.0, overhead_s=0.0)
    monkeypatch.setattr(cp, "cpu_rates", lambda refresh=False: fast)
    assert cp.max_useful_kept_fraction_cpu(_inp()) == 1.0  # clamped


def test_without_the_kernel_sparse_never_pays(monkeypatch):
    monkeypatch.setattr(cp, "load_extension", lambda kind: ExtensionStatus(error="disabled by HCS_DISABLE_EXT=cpu"))
    assert cp.cpu_rates() is None
    assert cp.max_useful_kept_fraction_cpu(_inp()) == 0.0
    assert "HCS_DISABLE_EXT" in cp.skip_prediction_reason_cpu(_inp())


def test_measured_once_then_read_from_the_cache(ext, monkeypatch, tmp_path):
    """The first call measures (the instance that runs, positive rates) and writes the
    record under this machine's key; a fresh process (empty memo) reads it back without
    measuring, and a record's numbers are what the decisions use."""
    rates = cp.cpu_rates()
    assert rates.isa == ext.selected_isa()
    assert rates.dense_flops > 1e8 and rates.sparse_flops > 1e8 and rates.overhead_s > 0
    assert rates.predict_s_per_element > 0
    path = tmp_path / "rates.json"
    record = json.loads(path.read_text())
    key = cp.cache_key(rates.isa)
    assert record[key]["sparse_flops"] == rates.sparse_flops

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached record must be used")

    monkeypatch.setattr(cp, "measure_rates", no_measuring)
    monkeypatch.setattr(cp, "_MEMO", {})
    record[key].update(dense_flops=50e9, sparse_flops=25e9, overhead_s=0.0)
    path.write_text(json.dumps(record))
    assert cp.cpu_rates() == cp.CpuRates(**record[key])
    assert cp.max_useful_kept_fraction_cpu(_inp()) == pytest.approx(cp.MARGIN * 0.5)
    # another torch version or build is another key: measured afresh
    monkeypatch.setattr(cp, "_MEMO", {})
    monkeypatch.setattr(cp.torch, "__version__", "0.0-other")
    with pytest.raises(AssertionError, match="cached record"):
        cp.cpu_rates()


def test_refresh_and_unwritable_cache(ext, monkeypatch, tmp_path):
    calls = []
    fixed = RATES

    def fake_measure(*args, **kwargs):
        calls.append(1)
        return fixed

    monkeypatch.setattr(cp, "measure_rates", fake_measure)
    assert cp.cpu_rates() is fixed and cp.cpu_rates() is fixed and len(calls) == 1  # memoized
    assert cp.cpu_rates(refresh=True) is fixed and len(calls) == 2
    monkeypatch.setenv("HCS_CPU_POLICY_CACHE", str(tmp_path / "no-such-dir" / "rates.json"))
    monkeypatch.setattr(cp, "_MEMO", {})
    assert cp.cpu_rates() is fixed  # the write fails quietly; the rates stay in memory
    monkeypatch.setenv("HCS_CPU_POLICY_CACHE", "")
    assert cp.cache_path() is None


def test_explicit_budget_judged_with_its_prediction(monkeypatch):
    monkeypatch.setattr(cp, "cpu_rates", lambda refresh=False: RATES)
    inp = _inp()  # dense 0.3436 s; prediction 2.1 ms; kernel at 90 GFLOP/s with the 0.92 margin
    dense = 4 * 8 * 4096 ** 2 * 64 / 100e9
    predict = 2 * 8 * 4096 * 64 * 0.5e-9
    pays = (dense - predict - 0.3e-3) * cp.MARGIN * 0.9 / dense  # the budget that just breaks even
    assert cp.explicit_budget_reason_cpu(inp, pays - 0.01) is None
    reason = cp.explicit_budget_reason_cpu(inp, pays + 0.01)
    assert reason is not None and "top-k" in reason
    with pytest.raises(ValueError, match="budget"):
        cp.explicit_budget_reason_cpu(inp, 1.5)
