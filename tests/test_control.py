"""The control manifold M(s), its clamps and constants, and the two-stage schedule."""

import asyncio
import contextvars
import math
import threading

import pytest

from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.creative.control import (ATTENTION_BUDGET_MIN, TEMPERATURE_MAX, TEMPERATURE_MIN, ControlPoint,
                                        SparsityConfig, SparsityController, TwoStageSchedule, current_sparsity,
                                        set_current_sparsity, use_sparsity)

#: The seed's manifold constants (the hand-computed values below use them).
SEED = dict(temperature_base=1.0, temperature_gain=0.5, nucleus_base=0.9, nucleus_gain=0.12, nucleus_scale=0.5)


# Hand-computed with the documented constants (T0=1, kT=0.5, p0=0.9, kp=0.12, sp=0.5,
# ka=2*0.5, d=-1, kK=0.5, tK=0.5) for a Mixtral-like E=8, K0=2:
#   s=0.3: T = e^(0.5*0.3*0.85) = e^0.1275 = 1.135985;  p = 0.9 + 0.036*tanh(0.6) = 0.919334
#          k_attn = 1 - 0.3*sqrt(0.91) = 0.713818;      K = 2 + 1.2*(1 - e^-0.6) = 2.5414 -> 3
#   s=0.7: T = e^(0.5*0.7*0.65) = e^0.2275 = 1.255457;  p = 0.9 + 0.084*tanh(1.4) = 0.974370
#          k_attn = 1 - 0.7*sqrt(0.51) = 0.500100;      K = 2 + 2.8*(1 - e^-1.4) = 4.1095 -> 4
HAND = {
    0.3: (1.135985, 0.919334, 3, 0.713818),
    0.7: (1.255457, 0.974370, 4, 0.500100),
}


@pytest.mark.parametrize("s", sorted(HAND))
def test_manifold_matches_hand_computed_values(s):
    cp = SparsityController(SparsityConfig(**SEED), num_experts=8, experts_per_token=2).get_sparsity_params(s)
    t, p, k, a = HAND[s]
    assert cp.s == s
    assert cp.temperature == pytest.approx(t, abs=1e-6)
    assert cp.top_p == pytest.approx(p, abs=1e-6)
    assert cp.num_experts == k
    assert cp.attention_budget == pytest.approx(a, abs=1e-6)


def test_s_zero_is_dense_with_default_experts():
    cp = SparsityController(num_experts=8, experts_per_token=2).get_sparsity_params(0.0)
    assert (cp.num_experts, cp.attention_budget) == (2, 1.0) and cp.is_dense
    assert cp.temperature == pytest.approx(0.138)  # T(0) = T0 (see the module docstring)
    seed = SparsityController(SparsityConfig(**SEED)).get_sparsity_params(0.0)
    assert (seed.temperature, seed.top_p) == (1.0, pytest.approx(0.9))  # p(0) = p0
    ident = SparsityController(SparsityConfig(nucleus_adaptation=False, **SEED)).get_sparsity_params(0.0)
    assert (ident.temperature, ident.top_p, ident.attention_budget) == (1.0, 1.0, 1.0)
    assert SparsityController(SparsityConfig(nucleus_base=1.0)).get_sparsity_params(0.0).top_p == 1.0


def test_default_stages_are_a_hot_opening_and_a_cool_refine():
    """The measured defaults (BENCHMARKS.md, "Creative decoding"): stage B (s = 0.3) samples
    cooler than plain T = 1 sampling, stage A (s = 0.7) hot, both under min-p 0.1, and the
    switch after 10% of the new tokens (6 of 60)."""
    ctl = SparsityController()
    b, a = ctl.get_sparsity_params(0.3), ctl.get_sparsity_params(0.7)
    assert b.temperature == pytest.approx(0.7, abs=2e-3) and a.temperature == pytest.approx(2.5, abs=1e-2)
    assert a.top_p == b.top_p == 1.0 and a.min_p == b.min_p == 0.1
    assert TwoStageSchedule().switch_step(60) == 6


def test_dense_models_have_no_expert_count():
    assert SparsityController().get_sparsity_params(0.5).num_experts is None


def test_stage_a_is_hotter_wider_more_experts_fewer_blocks_than_stage_b():
    ctl = SparsityController(num_experts=8, experts_per_token=2)
    grid_a = [0.6 + 0.02 * i for i in range(11)]
    grid_b = [0.2 + 0.02 * i for i in range(11)]
    for sa in grid_a:
        a = ctl.get_sparsity_params(min(sa, 0.8))
        for sb in grid_b:
            b = ctl.get_sparsity_params(min(sb, 0.4))
            assert a.temperature > b.temperature
            assert a.top_p >= b.top_p
            assert a.num_experts >= b.num_experts
            assert a.attention_budget < b.attention_budget


def test_attention_budget_is_not_monotonic_and_peaks_at_attention_sparsity():
    ctl = SparsityController(SparsityConfig(attention_sparsity=0.6))
    peak = ctl.get_sparsity_params(1 / math.sqrt(2)).attention_budget
    assert peak == pytest.approx(1 - 0.6, abs=1e-12)
    assert ctl.get_sparsity_params(1.0).attention_budget == pytest.approx(1.0)  # sqrt(1 - s^2) -> 0
    values = [ctl.get_sparsity_params(i / 100).attention_budget for i in range(101)]
    assert min(values) == pytest.approx(peak, abs=1e-3)


@pytest.mark.parametrize("s", [i / 20 for i in range(21)])
def test_every_value_is_clamped_to_its_range(s):
    extreme = SparsityConfig(attention_sparsity=0.999, temperature_gain=5.0, nucleus_gain=1.0, temperature_base=1.0,
                             moe_expert_entropy=1.0, expert_scale=0.01)
    low = SparsityConfig(temperature_gain=-5.0, temperature_base=0.01, nucleus_gain=-1.0, nucleus_base=0.01)
    for cfg in (extreme, low, SparsityConfig()):
        cp = SparsityController(cfg, num_experts=4, experts_per_token=1).get_sparsity_params(s)
        assert TEMPERATURE_MIN <= cp.temperature <= TEMPERATURE_MAX
        assert 0.0 < cp.top_p <= 1.0
        assert isinstance(cp.num_experts, int) and 1 <= cp.num_experts <= 4
        assert ATTENTION_BUDGET_MIN <= cp.attention_budget <= 1.0
    assert SparsityController(extreme).get_sparsity_params(1.0).temperature == TEMPERATURE_MAX  # e^2.5 clamps


def test_constant_temperature_schedule_and_no_nucleus_adaptation():
    ctl = SparsityController(SparsityConfig(temperature_schedule="constant", temperature_base=0.8,
                                            nucleus_adaptation=False))
    cp = ctl.get_sparsity_params(0.7)
    assert (cp.temperature, cp.top_p) == (0.8, 1.0)


def test_attention_config_follows_the_budget_and_is_dense_at_s0():
    ctl = SparsityController(SparsityConfig(simthreshd1=0.5, pvthreshd=20.0))
    dense = ctl.get_sparsity_params(0.0).attention_config()
    assert dense.topk is None and dense.cdfthreshd == 1.0 and dense.simthreshd1 == 1.0 and math.isinf(dense.pvthreshd)
    cfg = ctl.get_sparsity_params(0.7).attention_config(SparseAttentionConfig(min_seq_len=0, backend="reference"))
    assert cfg.topk == pytest.approx(0.5001, abs=1e-4) and cfg.cdfthreshd is None
    assert (cfg.simthreshd1, cfg.pvthreshd, cfg.min_seq_len, cfg.backend) == (0.5, 20.0, 0, "reference")
    with pytest.raises(TypeError, match="base"):
        ctl.get_sparsity_params(0.7).attention_config({"topk": 0.5})


def test_attention_config_keeps_the_users_thresholds():
    """Issue 16: a dial point must not replace the user's simthreshd1 / pvthreshd (before the
    fix pvthreshd=inf silently became 50 and simthreshd1 0.6)."""
    user = SparseAttentionConfig(simthreshd1=0.3, pvthreshd=math.inf, min_seq_len=0)
    for s in (0.3, 0.7):
        cfg = SparsityController().get_sparsity_params(s).attention_config(user)
        assert cfg.simthreshd1 == 0.3 and math.isinf(cfg.pvthreshd)
        assert cfg.topk == pytest.approx(SparsityController().attention_budget(s))


def test_cdfthreshd_selects_by_mass_scaled_by_the_dial():
    """Issue 16: SparsityConfig.cdfthreshd has an effect: blocks are chosen by softmax mass,
    1 - (1 - c) (1 - k_attn(s)) / attention_sparsity, i.e. c at the sparsest point."""
    ctl = SparsityController(SparsityConfig(cdfthreshd=0.9, attention_sparsity=0.5))
    peak = ctl.get_sparsity_params(1 / math.sqrt(2)).attention_config()
    assert peak.topk is None and peak.selection == "cdf" and peak.cdfthreshd == pytest.approx(0.9, abs=1e-12)
    k = ctl.attention_budget(0.3)  # 1 - 0.3 sqrt(0.91)
    expected = 1 - 0.1 * (1 - k) / 0.5
    assert ctl.get_sparsity_params(0.3).attention_config().cdfthreshd == pytest.approx(expected, abs=1e-12)
    assert ctl.get_sparsity_params(0.0).attention_config().cdfthreshd == 1.0  # dense at s = 0
    without = SparsityController().get_sparsity_params(0.3).attention_config()
    assert without.selection == "topk"


def test_from_stages_passes_through_both_targets():
    cfg = SparsityConfig.from_stages((0.6, 1.8, 1.0), (0.2, 0.75, 0.85), min_p=0.05)
    ctl = SparsityController(cfg)
    assert ctl.temperature(0.6) == pytest.approx(1.8, abs=1e-12)
    assert ctl.temperature(0.2) == pytest.approx(0.75, abs=1e-12)
    assert ctl.top_p(0.6) == pytest.approx(1.0, abs=1e-12) and ctl.top_p(0.2) == pytest.approx(0.85, abs=1e-12)
    assert ctl.get_sparsity_params(0.2).min_p == 0.05
    flat = SparsityConfig.from_stages((0.7, 1.0, 0.9), (0.3, 1.0, 0.9))
    assert (flat.temperature_gain, flat.nucleus_gain) == (0.0, 0.0)
    with pytest.raises(ValueError, match="diverge temperature"):
        SparsityConfig.from_stages((0.7, 0.0, 1.0), (0.3, 1.0, 0.9))


def test_for_model_reads_expert_layout():
    class Cfg:
        num_local_experts = 8
        num_experts_per_tok = 2

    class Model:
        config = Cfg()

    ctl = SparsityController.for_model(Model())
    assert (ctl.num_experts, ctl.experts_per_token) == (8, 2)
    assert SparsityController.for_model(object()).num_experts is None

    class Outer:  # a multimodal config: the MoE layout lives in text_config (issue 16)
        text_config = Cfg()

    class Wrapped:
        config = Outer()

    ctl = SparsityController.for_model(Wrapped())
    assert (ctl.num_experts, ctl.experts_per_token) == (8, 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"attention_sparsity": 1.0}, "attention_sparsity"),
    ({"attention_sparsity": -0.1}, "attention_sparsity"),
    ({"token_pruning_rate": 1.0}, "token_pruning_rate"),
    ({"moe_expert_entropy": 1.5}, "moe_expert_entropy"),
    ({"kv_reuse_ratio": 1.0}, "kv_reuse_ratio"),
    ({"temperature_schedule": "cosine"}, "temperature_schedule"),
    ({"cdfthreshd": 1.2}, "cdfthreshd"),
    ({"min_p": 1.0}, "min_p"),
    ({"nucleus_base": 0.0}, "nucleus_base"),
    ({"temperature_base": 4.0}, "temperature_base"),
    ({"attention_sparsity": float("nan")}, "attention_sparsity"),
])
def test_sparsity_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_sparsity_config_type_errors():
    with pytest.raises(TypeError, match="attention_sparsity"):
        SparsityConfig(attention_sparsity="0.5")
    with pytest.raises(TypeError, match="nucleus_adaptation"):
        SparsityConfig(nucleus_adaptation=1)


def test_controller_validation():
    ctl = SparsityController()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="s must lie"):
            ctl.get_sparsity_params(bad)
    with pytest.raises(TypeError):
        ctl.get_sparsity_params("0.5")
    with pytest.raises(ValueError, match="experts_per_token"):
        SparsityController(num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="num_experts"):
        SparsityController(experts_per_token=2)
    with pytest.raises(TypeError, match="config"):
        SparsityController({"attention_sparsity": 0.5})


def test_mask_refresh_interval():
    assert [SparsityConfig(kv_reuse_ratio=r).mask_refresh_interval for r in (0.0, 0.5, 0.75, 0.8)] == [1, 2, 4, 5]


def test_two_stage_schedule():
    sched = TwoStageSchedule(0.7, 0.3, switch=0.3)
    assert [sched.stage_at(i / 10) for i in range(10)] == ["diverge"] * 3 + ["refine"] * 7
    assert sched.s_at(0.0) == 0.7 and sched.s_at(0.3) == 0.3 and sched.s_at(1.0) == 0.3
    for n in range(1, 40):
        for switch in (0.0, 0.3, 0.5, 0.7, 1.0):
            sch = TwoStageSchedule(0.7, 0.3, switch=switch)
            first_refine = next((i for i in range(n) if sch.stage_at(i / n) == "refine"), n)
            assert sch.switch_step(n) == first_refine


@pytest.mark.parametrize("kwargs, match", [
    ({"diverge": 0.3, "refine": 0.7}, "refine"),
    ({"switch": 1.2}, "switch"),
    ({"diverge": 1.5}, "diverge"),
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoStageSchedule(**kwargs)
    with pytest.raises(ValueError, match="progress"):
        TwoStageSchedule().s_at(1.5)


def test_current_sparsity_is_a_context_variable():
    """Issue 16: the dial lives in a ContextVar: other threads, copied contexts and asyncio
    tasks each see their own value."""
    set_current_sparsity(0.4)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(current_sparsity()))
    thread.start()
    thread.join()

    def inside_copy():
        set_current_sparsity(0.9)
        return current_sparsity()

    async def task(s):
        set_current_sparsity(s)
        await asyncio.sleep(0)
        return current_sparsity()

    async def both():
        return await asyncio.gather(task(0.1), task(0.2))

    try:
        assert current_sparsity() == 0.4 and seen == [None]
        assert contextvars.copy_context().run(inside_copy) == 0.9 and current_sparsity() == 0.4
        assert asyncio.run(both()) == [0.1, 0.2] and current_sparsity() == 0.4
        with use_sparsity(0.6):
            assert current_sparsity() == 0.6
        assert current_sparsity() == 0.4
        with pytest.raises(ValueError):
            set_current_sparsity(2.0)
    finally:
        set_current_sparsity(None)
    assert current_sparsity() is None


def test_control_point_is_frozen():
    cp = SparsityController().get_sparsity_params(0.5)
    assert isinstance(cp, ControlPoint)
    with pytest.raises(Exception):
        cp.temperature = 2.0
