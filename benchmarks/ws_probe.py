"""Where the warp-specialized Hopper kernel spends its time (measurement only).

Times the warp-specialized Hopper kernel (and mma.sync for scale) at B1 H24 N32768 (D128
and D64; kept fractions, random or contiguous kept blocks and persistent grid sizes as
asked) with the probe bits of csrc/cuda (bit 0: no softmax, bit 1: no
K/V loads after the first ring), so GEMM-only, compute-only and full runs compare in one
process. Run on a Hopper GPU:
    PYTHONPATH=$PWD python3 benchmarks/ws_probe.py --dims 64 --kept 1,0.1 --patterns random,contiguous
"""

from __future__ import annotations

import argparse
import math

import torch

from hf_creative_sparse.evaluation.attention_benchmark import device_timer
from hf_creative_sparse.ops._ext import load_extension
from hf_creative_sparse.ops.custom_ops import block_sparse_fwd
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.predict_cuda import mask_to_lut

KERNELS = {"mma": 1, "ws": 2}
PROBES = {0: "full", 1: "no softmax", 2: "no K/V loads", 3: "GEMMs only"}


def _mask(b: int, h: int, mq: int, mk: int, kept: float, pattern: str) -> torch.Tensor:
    """Block mask keeping ``kept`` of each row: random blocks, or the first ones in a run."""
    n_keep = max(1, math.ceil(kept * mk))
    if pattern == "contiguous":
        return (torch.arange(mk, device="cuda") < n_keep).expand(b, h, mq, mk).contiguous()
    ranks = torch.rand(b, h, mq, mk, device="cuda").argsort(-1).argsort(-1)
    return ranks < n_keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--kept", default="1.0", help="kept fractions, comma-separated")
    ap.add_argument("--patterns", default="random", help="random and/or contiguous kept blocks")
    ap.add_argument("--max-ctas", default="0", help="persistent grid caps to compare (0 = one CTA per SM)")
    ap.add_argument("--probes", default="0,1,2,3", help="probe bit sets to time (0: the kernel as shipped)")
    ap.add_argument("--pv", type=float, default=math.inf, help="pvthreshd (inf: no pv skip; the default config's: 50)")
    args = ap.parse_args()
    mod = load_extension("cuda").module
    timer = device_timer(torch.device("cuda"))
    for d in (int(x) for x in args.dims.split(",")):
        b, h, n = 1, 24, 32768
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        inp = attention_inputs(q, k, v)
        pv = torch.full((h,), args.pv, device="cuda")
        for kept in (float(x) for x in args.kept.split(",")):
            for pattern in args.patterns.split(","):
                mask = _mask(b, h, inp.num_q_blocks, inp.num_k_blocks, kept, pattern)
                counts, idx = mask_to_lut(mask)
                flops = 4.0 * b * h * n * n * d * mask.float().mean().item()
                for name, pref in KERNELS.items():
                    mod.set_kernel_preference(pref)
                    for cap in (int(x) for x in args.max_ctas.split(",")):
                        mod.set_max_ctas(cap)
                        for bits in (int(x) for x in args.probes.split(",")):
                            label = PROBES[bits]
                            if name == "mma" and (bits or cap):
                                continue
                            mod.set_probe(bits)
                            ms = timer(lambda: block_sparse_fwd(q, k, v, counts, idx, None, False, inp.scale, pv), 2, 5)
                            print(f"D{d} kept {kept:.2f} {pattern:10s} {name:3s} ctas {cap or 'SMs':>4} {label:13s} "
                                  f"{ms:8.3f} ms  {flops / ms / 1e9:5.0f} TFLOP/s per kept block", flush=True)
        mod.set_probe(0)
        mod.set_max_ctas(0)
        mod.set_kernel_preference(0)


if __name__ == "__main__":
    main()
