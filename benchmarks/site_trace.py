#!/usr/bin/env python3
"""Per-call trace of an error-target call site on the GPU: each call's time, whether it
measured its budgets, its kept fraction and backend (diagnoses the call-site cache).

    python3 benchmarks/site_trace.py [--shape wan] [--family local] [--target 0.02] [--calls 12]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_creative_sparse as hcs  # noqa: E402
from benchmarks.realistic_inputs import make_inputs  # noqa: E402
from benchmarks.target_profile import SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="wan", choices=sorted(SHAPES))
    ap.add_argument("--family", default="local")
    ap.add_argument("--target", type=float, default=0.02)
    ap.add_argument("--calls", type=int, default=12)
    args = ap.parse_args()
    h, n, d, grid, text = SHAPES[args.shape]
    kw = dict(grid=grid, text_len=text) if args.family == "video" else {}
    q, k, v = make_inputs(args.family, 1, h, n, d, dtype=torch.bfloat16, device="cuda", **kw)
    for i in range(args.calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        _, st = hcs.sparse_attention(q, k, v, target_l1=args.target, return_stats=True)
        b.record()
        b.synchronize()
        a2, b2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a2.record()
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        b2.record()
        b2.synchronize()
        print(f"call {i:2d}: {a.elapsed_time(b):7.3f} ms (cuDNN {a2.elapsed_time(b2):6.3f}) kept {st.kept_fraction:.3f} "
              f"{st.backend} measured={st.head_budgets is not None} {st.fallback_reason or ''}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            hcs.sparse_attention(q, k, v, target_l1=args.target)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
