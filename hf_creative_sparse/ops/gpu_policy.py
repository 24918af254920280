"""When block sparsity pays on a GPU: a small cost model for `sparse_attention`'s
``backend="auto"`` policy on CUDA tensors.

Dense attention (SDPA, cuDNN on Hopper) runs at a high rate; the sparse path pays a fixed
cost (mask prediction, index lists, dispatch) plus the kept fraction of the work at a
lower rate. Measured on an H100 (benchmarks/gpu_check.py, BENCHMARKS.md):

* cuDNN dense: ~430 TFLOP/s at head dim 64 and ~580 at 128 on long sequences.
* the best sparse kernel (FlexAttention on the block mask) reaches 0.6-0.8 of that rate
  per kept block on sequences of 16k and more (0.4-0.6 at 4k).
* prediction + index lists + dispatch: well under 1 ms.

So sparsity pays only when the dense time is large against the fixed cost and the kept
fraction is below ``SPARSE_EFFICIENCY * (1 - OVERHEAD_S / dense_time)``. Below
``MIN_DENSE_SECONDS`` of estimated dense time the prediction itself would cost more than
5% of the call, so the policy runs dense without predicting.
"""

from __future__ import annotations

from .inputs import AttentionInputs

#: cuDNN dense rate (FLOP/s) on an H100 by head-dim bound.
DENSE_RATE = ((64, 430e12), (256, 580e12))
#: Sparse kernel rate per kept block relative to dense, measured on >= 16k tokens.
SPARSE_EFFICIENCY = 0.6
#: Fixed cost of the sparse path (prediction, index lists, dispatch), seconds.
OVERHEAD_S = 0.8e-3
#: Below this estimated dense time, prediction alone would exceed ~5% of the call.
MIN_DENSE_SECONDS = 4e-3


def dense_seconds(inp: AttentionInputs) -> float:
    """Estimated dense SDPA time of ``inp`` on an H100-class GPU."""
    flops = 4.0 * inp.batch * inp.heads_q * inp.len_q * inp.len_k * inp.head_dim
    if inp.is_causal:
        flops *= 0.5
    rate = next((r for bound, r in DENSE_RATE if inp.head_dim <= bound), DENSE_RATE[-1][1])
    return flops / rate


def skip_prediction_reason(inp: AttentionInputs) -> str | None:
    """Why a CUDA call should run dense without predicting a mask, or None."""
    t = dense_seconds(inp)
    if t < MIN_DENSE_SECONDS:
        return (f"sparsity cannot pay on the GPU: estimated dense time {t * 1e3:.2f} ms < "
                f"{MIN_DENSE_SECONDS * 1e3:.0f} ms (prediction would cost more than it saves)")
    return None


def max_useful_kept_fraction(inp: AttentionInputs) -> float:
    """The kept fraction above which the sparse path is slower than dense SDPA."""
    return max(0.0, SPARSE_EFFICIENCY * (1.0 - OVERHEAD_S / dense_seconds(inp)))
