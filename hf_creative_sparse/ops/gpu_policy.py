"""When block sparsity pays on a GPU: a small cost model for `sparse_attention`'s
``backend="auto"`` policy on CUDA tensors.

Dense attention (SDPA, cuDNN on Hopper) runs at a high rate; the sparse path pays a fixed
cost (mask prediction, index lists, dispatch) plus the kept fraction of the work at a
lower rate. Measured on an H100 (benchmarks/gpu_check.py, BENCHMARKS.md):

* cuDNN dense: ~430 TFLOP/s at head dim 64 and ~580 at 128 on long sequences.
* the best sparse kernel (on Hopper the warp-specialized one, else FlexAttention on the
  block mask) reaches 0.7-0.99 of that rate per kept block on sequences of 16k and more
  (0.5-0.85 at 4.6k).
* mask prediction (ops/predict_cuda.py): 0.1-0.2 ms of host time, launches and the host
  sync of the kept count, plus one read of Q and K (~2.8-3.1 TB/s), plus the selection
  kernel (~10 ns per query-block row for 512 key blocks with the sort-free warp kernel).
* the rest of the sparse path (index lists, dispatch): ~0.1 ms.

So the policy predicts only when the prediction costs at most ``PREDICTION_BUDGET`` of
the dense time (a fallback after predicting then stays within ~5% of dense SDPA), and
runs sparse only when the kept fraction is below
``SPARSE_EFFICIENCY * (1 - OVERHEAD_S / dense_time)``.
"""

from __future__ import annotations

import math

from .inputs import AttentionInputs
from .predict_cuda import WARP_SELECT_MAX_KEY_BLOCKS

#: cuDNN dense rate (FLOP/s) on an H100 by head-dim bound.
DENSE_RATE = ((64, 430e12), (256, 580e12))
#: Sparse kernel rate per kept block relative to dense, measured on >= 16k tokens (H200:
#: the warp-specialized kernel 0.87-0.99 of cuDNN at D128 and 0.72-0.88 at D64, the lower
#: ends at 10% kept); kept below the measured range so that a misjudged call stays dense.
SPARSE_EFFICIENCY = 0.7
#: Fixed cost of the sparse path (prediction, index lists, dispatch), seconds (H200:
#: prediction 0.16-0.32 ms with its host sync, index lists and launch ~0.1 ms).
OVERHEAD_S = 0.5e-3
#: Prediction may cost at most this fraction of the estimated dense time, so a call that
#: then falls back to dense stays within DESIGN.md's 1.05x of cuDNN. Measured on an H200:
#: 5% let Wan 480p predict (3.5% measured) and then fall back at 1.064x, over the bound.
PREDICTION_BUDGET = 0.04
#: Prediction cost model: fixed host/launch time, Q+K read rate, selection cost per
#: query-block row at 512 padded key blocks: ~10 ns for the warp-per-row kernel (<= 1024
#: key blocks), 38 ns for the bitonic-sort kernel beyond (H100/H200). The prediction alone
#: measures 0.11-0.14 ms on small shapes, but the fixed part is 0.18 ms because a call that
#: predicts and then falls back also pays the idle GPU between the kept count's host sync
#: and the dense launch: on random inputs such a CogVideoX call measured 0.35 ms over dense
#: (0.93x cuDNN, H200) with a prediction of 0.14 ms. At 0.18 ms CogVideoX (0.27 ms
#: estimated) skips prediction and stays within 1.05x of cuDNN.
PREDICT_FIXED_S = 0.18e-3
#: Rate of the Triton kernels of the error-target path (sampled statistics, fused
#: compensation) by head-dim bound, FLOP/s (H200, `path_seconds`).
TRITON_RATE = ((64, 105e12), (256, 160e12))
#: Fixed cost of the "sample" ranking besides its statistics kernel (pooling, the mass
#: reduction, selection) and of compensation besides its kernel (the bias), seconds (H200).
SAMPLE_RANKING_FIXED_S = 1.0e-3
COMPENSATION_FIXED_S = 0.15e-3
#: The PyTorch ranking path (strictly causal scores, per-query-block budgets, the "bound"
#: ranking) as a share of dense: at the 32k causal text shape an error-target call at 0.47
#: kept took 11.8 ms against 9.7 ms dense, 3.4 ms over what the other terms model (H200,
#: BENCHMARKS.md session 5); session 4 measured causal top-k calls at 0.86-0.87x.
TORCH_RANKING_SHARE = 0.35
PREDICT_READ_RATE = 2.6e12
PREDICT_ROW_S_AT_512 = 10e-9
PREDICT_ROW_S_AT_512_SORTED = 38e-9


def dense_seconds(inp: AttentionInputs) -> float:
    """Estimated dense SDPA time of ``inp`` on an H100-class GPU."""
    flops = 4.0 * inp.batch * inp.heads_q * inp.len_q * inp.len_k * inp.head_dim
    if inp.is_causal:
        flops *= 0.5
    rate = next((r for bound, r in DENSE_RATE if inp.head_dim <= bound), DENSE_RATE[-1][1])
    return flops / rate


def prediction_seconds(inp: AttentionInputs) -> float:
    """Estimated time of the fused GPU mask prediction of ``inp`` (H100)."""
    elem = inp.q.element_size()
    read = (inp.q.numel() + inp.k.numel()) * elem / PREDICT_READ_RATE
    m = 2 ** max(1, math.ceil(math.log2(max(inp.num_k_blocks, 2))))
    row_s = PREDICT_ROW_S_AT_512 if inp.num_k_blocks <= WARP_SELECT_MAX_KEY_BLOCKS else PREDICT_ROW_S_AT_512_SORTED
    per_row = row_s * (m * math.log2(m) ** 2) / (512 * 81)
    rows = inp.batch * inp.heads_q * inp.num_q_blocks
    return PREDICT_FIXED_S + read + rows * per_row


def skip_prediction_reason(inp: AttentionInputs, mask_uses: int = 1) -> str | None:
    """Why a CUDA call should run dense without predicting a mask, or None.

    ``mask_uses``: how many calls the predicted mask will serve (a patched layer with
    ``mask_refresh=k`` reuses it k times), so its cost is shared among them. The policy
    memoizes this per shape (`ops.attention.early_fallback`): the dense fallback of
    a short call must not pay the model's arithmetic.
    """
    t, p = dense_seconds(inp), prediction_seconds(inp) / max(1, mask_uses)
    if p > PREDICTION_BUDGET * t:
        return (f"sparsity cannot pay on the GPU: predicting the mask (~{p * 1e3:.2f} ms per use) would cost more than "
                f"{PREDICTION_BUDGET:.0%} of dense attention (~{t * 1e3:.2f} ms)")
    return None


def path_seconds(inp: AttentionInputs, sample_ranking: bool, compensate: bool, torch_ranking: bool = False) -> float:
    """Estimated cost of the error-target path's extra stages on an H200: the "sample"
    ranking (its statistics kernel reads 1/16 of the dense QK^T, plus pooling, the mass
    reduction and the selection) and the fused compensation (Nq x Mk x D twice). Measured
    (benchmarks/target_profile.py, BENCHMARKS.md): Wan 480p 2.0 + 0.3 + 0.77 ms, CogVideoX
    1.13 + 0.43 + 0.54 ms; these simple Triton kernels run at ~105 TFLOP/s at head dim 64
    and ~160 at 128. ``torch_ranking``: the block scores and selection run in PyTorch (causal
    calls, the "bound" ranking), charged `TORCH_RANKING_SHARE` of dense."""
    rate = next((r for bound, r in TRITON_RATE if inp.head_dim <= bound), TRITON_RATE[-1][1])
    bh = inp.batch * inp.heads_q
    seconds = 0.0
    if sample_ranking:
        seconds += 2.0 * bh * inp.len_q / 16 * inp.len_k * inp.head_dim / rate + SAMPLE_RANKING_FIXED_S
    if compensate:
        seconds += 4.0 * bh * inp.len_q * inp.num_k_blocks * inp.head_dim / rate + COMPENSATION_FIXED_S
    if torch_ranking:
        seconds += TORCH_RANKING_SHARE * dense_seconds(inp)
    return seconds


def max_useful_kept_fraction(inp: AttentionInputs, extra_s: float = 0.0) -> float:
    """The kept fraction above which the sparse path is slower than dense SDPA; ``extra_s``:
    the seconds of the path's extra stages (`path_seconds`)."""
    return max(0.0, SPARSE_EFFICIENCY * (1.0 - (OVERHEAD_S + extra_s) / dense_seconds(inp)))


def explicit_budget_reason(inp: AttentionInputs, budget: float, mask_uses: int = 1,
                           extra_s: float = 0.0) -> str | None:
    """Why an explicit top-k ``budget`` (mean kept fraction) cannot pay on the GPU, or None.

    An explicit budget is judged by what it will cost, prediction and the path's extra
    stages (``extra_s``, `path_seconds`) included, against dense: it is never refused for
    the prediction's cost alone when its kept fraction pays.
    """
    t = dense_seconds(inp)
    sparse = prediction_seconds(inp) / max(1, mask_uses) + OVERHEAD_S + extra_s + budget * t / SPARSE_EFFICIENCY
    if sparse >= t:
        return (f"sparsity cannot pay on the GPU: top-k {budget:.3f} would take ~{sparse * 1e3:.2f} ms with its "
                f"prediction against ~{t * 1e3:.2f} ms dense")
    return None
