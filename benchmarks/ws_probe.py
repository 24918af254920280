"""Where the warp-specialized Hopper kernel spends its time (measurement only).

Times the warp-specialized Hopper kernel (and mma.sync for scale) at B1 H24 N32768 (D128
and D64, all blocks kept) with the probe bits of csrc/cuda (bit 0: no softmax, bit 1: no
K/V loads after the first ring), so GEMM-only, compute-only and full runs compare in one
process. Run on a Hopper GPU:
    PYTHONPATH=$PWD python3 benchmarks/ws_probe.py
"""

from __future__ import annotations

import math

import torch

from hf_creative_sparse.bench import device_timer
from hf_creative_sparse.ops._ext import load_extension
from hf_creative_sparse.ops.custom_ops import block_sparse_fwd
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.predict_cuda import mask_to_lut

KERNELS = {"mma": 1, "ws": 2}
PROBES = {0: "full", 1: "no softmax", 2: "no K/V loads", 3: "GEMMs only"}


def main() -> None:
    mod = load_extension("cuda").module
    timer = device_timer(torch.device("cuda"))
    for d in (128, 64):
        b, h, n = 1, 24, 32768
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        inp = attention_inputs(q, k, v)
        mask = torch.ones(b, h, inp.num_q_blocks, inp.num_k_blocks, dtype=torch.bool, device="cuda")
        counts, idx = mask_to_lut(mask)
        pv = torch.full((h,), math.inf, device="cuda")
        flops = 4.0 * b * h * n * n * d
        for name, pref in KERNELS.items():
            mod.set_kernel_preference(pref)
            for bits, label in PROBES.items():
                if name == "mma" and bits:
                    continue
                mod.set_probe(bits)
                ms = timer(lambda: block_sparse_fwd(q, k, v, counts, idx, None, False, inp.scale, pv), 2, 5)
                print(f"D{d} {name:9s} {label:13s} {ms:8.3f} ms  {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
        mod.set_probe(0)
        mod.set_kernel_preference(0)


if __name__ == "__main__":
    main()
