"""The GPU cost model of the auto policy (ops/gpu_policy.py): hand-computed values and the
properties the policy relies on. Runs anywhere (the model only reads shapes)."""

from __future__ import annotations

import pytest
import torch

from hf_creative_sparse.ops import gpu_policy
from hf_creative_sparse.ops.inputs import attention_inputs


def _inp(b, h, n, d, causal=False, dtype=torch.bfloat16):
    q = torch.empty(b, h, n, d, device="meta", dtype=dtype)
    return attention_inputs(q, q, q, is_causal=causal)


def test_dense_seconds_by_hand():
    # 4 * B * H * N^2 * D flops at 580 TFLOP/s (D128) and 430 (D64); causal halves the work
    assert gpu_policy.dense_seconds(_inp(1, 24, 32768, 128)) == pytest.approx(4 * 24 * 32768**2 * 128 / 580e12)
    assert gpu_policy.dense_seconds(_inp(8, 12, 1024, 64, causal=True)) == pytest.approx(
        0.5 * 4 * 8 * 12 * 1024**2 * 64 / 430e12)


def test_prediction_cost_model_matches_the_profile():
    # 32k (B1 H24 D128, bf16): fixed 0.18 ms + reading Q and K + 10 ns a row (warp selection)
    t = gpu_policy.prediction_seconds(_inp(1, 24, 32768, 128, dtype=torch.bfloat16))
    assert t == pytest.approx(0.18e-3 + 2 * 24 * 32768 * 128 * 2 / 2.6e12 + 24 * 256 * 10e-9)
    # beyond 1024 key blocks the bitonic-sort selection: 38 ns a row at 512, m log^2 m
    long = _inp(1, 2, 80000, 64)
    m = 2048  # 1250 key blocks padded
    t = gpu_policy.prediction_seconds(long)
    rows = 2 * 625
    assert t == pytest.approx(0.18e-3 + 2 * 2 * 80000 * 64 * 2 / 2.6e12 + rows * 38e-9 * m * 11**2 / (512 * 81))


def test_short_problems_skip_prediction_long_ones_do_not():
    assert "cannot pay" in gpu_policy.skip_prediction_reason(_inp(1, 24, 4608, 128))  # Flux 1024px: 0.45 ms
    assert "cannot pay" in gpu_policy.skip_prediction_reason(_inp(8, 12, 1024, 64, causal=True))  # GPT-2
    assert gpu_policy.skip_prediction_reason(_inp(1, 24, 32768, 128)) is None


def test_break_even_fraction_grows_with_size_and_stays_below_efficiency():
    small, large = _inp(1, 30, 17776, 64), _inp(1, 24, 32768, 128)
    f_small, f_large = gpu_policy.max_useful_kept_fraction(small), gpu_policy.max_useful_kept_fraction(large)
    assert 0 < f_small < f_large < gpu_policy.SPARSE_EFFICIENCY
    t = gpu_policy.dense_seconds(large)
    assert f_large == pytest.approx(gpu_policy.SPARSE_EFFICIENCY * (1 - gpu_policy.OVERHEAD_S / t))


def test_a_reused_mask_shares_its_prediction_cost():
    flux = _inp(1, 24, 4608, 128)  # Flux 1024px
    ratio = gpu_policy.prediction_seconds(flux) / gpu_policy.dense_seconds(flux)
    assert ratio > gpu_policy.PREDICTION_BUDGET  # one call: prediction would not pay
    uses = int(ratio / gpu_policy.PREDICTION_BUDGET) + 1
    assert gpu_policy.skip_prediction_reason(flux, mask_uses=uses - 1) is not None
    assert gpu_policy.skip_prediction_reason(flux, mask_uses=uses) is None  # mask_refresh=uses: it does


def test_target_path_stages_are_charged_to_the_sparse_side():
    """The error-target path's ranking and compensation cost time the policy must count
    (H200 profile: CogVideoX 2.1 ms of a 5.6 ms dense call): a budget that pays for the
    plain kernel stops paying with them, and each stage's cost follows its own argument."""
    cog, wan = _inp(1, 30, 17776, 64), _inp(1, 12, 32760, 128)
    both = gpu_policy.path_seconds(cog, True, True)
    assert 1.2e-3 < both < 3.0e-3  # measured 2.1 ms
    assert gpu_policy.path_seconds(cog, True, False) < both and gpu_policy.path_seconds(cog, False, True) < both
    assert gpu_policy.path_seconds(cog, False, False) == 0.0
    assert 2.0e-3 < gpu_policy.path_seconds(wan, True, True) < 4.0e-3  # measured 3.1 ms
    assert gpu_policy.max_useful_kept_fraction(cog, both) < gpu_policy.max_useful_kept_fraction(cog)
    assert gpu_policy.explicit_budget_reason(cog, 0.47) is None  # the plain kernel would pay
    assert gpu_policy.explicit_budget_reason(cog, 0.47, 1, both) is not None  # measured 0.69x with the stages
    assert gpu_policy.explicit_budget_reason(wan, 0.2, 1, gpu_policy.path_seconds(wan, True, True)) is None


def test_causal_torch_ranking_is_charged():
    """The strictly causal path ranks in PyTorch; at the 32k causal text shape an error
    target at 0.47 kept ran 0.64-0.82x of cuDNN (H200), so that budget must not pay."""
    text = _inp(1, 24, 32768, 128, causal=True)
    plain = gpu_policy.path_seconds(text, False, True)
    charged = gpu_policy.path_seconds(text, False, True, torch_ranking=True)
    assert charged == pytest.approx(plain + gpu_policy.TORCH_RANKING_SHARE * gpu_policy.dense_seconds(text))
    assert gpu_policy.explicit_budget_reason(text, 0.47, 1, plain) is None
    assert gpu_policy.explicit_budget_reason(text, 0.47, 1, charged) is not None
