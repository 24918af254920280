#!/usr/bin/env python3
"""Where the time of an error-target call goes on the GPU (issue 13): each stage of
`sparse_attention(..., target_l1=...)` timed alone with CUDA events on one shape.

    python3 benchmarks/target_profile.py [--shape wan|cogvideox] [--topk 0.2]

Stages: dense cuDNN SDPA; the fused top-k prediction (what an explicit top-k runs); the
torch block scores + selection (what the target and compensated paths run), with the
"sample" ranking and its Triton statistics kernel alone; the budget estimate (64 sampled
rows); the block-sparse kernel alone on the mask; compensation's pooled keys/values, bias
and pooled attention (memory-efficient SDPA with a bias), the merge, and the fused Triton
compensation that replaces the last two; the whole target call at a warm call site. Medians of 10 after 3 warm-ups, bf16, realistic video inputs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.realistic_inputs import make_inputs  # noqa: E402
from hf_creative_sparse.ops.compensation import (compensation_bias, pooled_attention,  # noqa: E402
                                                 pooled_kv)
from hf_creative_sparse.ops.dispatch import get_backend  # noqa: E402
from hf_creative_sparse.ops.estimate import estimate_budgets  # noqa: E402
from hf_creative_sparse.ops.inputs import attention_inputs, per_head  # noqa: E402
from hf_creative_sparse.ops.attention import sparse_attention  # noqa: E402
from hf_creative_sparse.ops.compensation_triton import compensate_triton  # noqa: E402
from hf_creative_sparse.ops.masks import block_scores, predict_from_inputs, select_blocks  # noqa: E402
from hf_creative_sparse.ops.sampled_scores import ranking_rows  # noqa: E402
from hf_creative_sparse.ops.sampled_scores_triton import sampled_block_stats_triton  # noqa: E402

SHAPES = {"wan": (12, 32760, 128, (21, 30, 52), 0), "cogvideox": (30, 17776, 64, (13, 30, 45), 226)}


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def report_syncs(name: str, fn) -> None:
    """Each place in our code where ``fn`` makes the host wait for the GPU (after a warm-up)."""
    import warnings

    fn()
    torch.cuda.synchronize()
    places: dict[str, int] = {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        for w in caught:
            if "synchroniz" in str(w.message):
                places[f"{w.filename}:{w.lineno}"] = places.get(f"{w.filename}:{w.lineno}", 0) + 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"\n### {name}: {sum(places.values())} host waits\n")
    for place, count in places.items():
        print(f"- {place} x{count}")


def profile_ops(name: str, fn, reps: int = 3) -> None:
    """torch.profiler's ops of ``fn`` by total GPU time (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"\n### {name}: top ops over {reps} calls\n")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="wan", choices=sorted(SHAPES))
    ap.add_argument("--topk", type=float, default=0.2)
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top GPU ops of the budget estimate and of a warm target call")
    ap.add_argument("--sync-debug", action="store_true",
                    help="list where a warm target call waits for the GPU (torch's sync debug mode)")
    args = ap.parse_args()
    h, n, d, grid, text = SHAPES[args.shape]
    q, k, v = make_inputs("video", 1, h, n, d, grid=grid, text_len=text, dtype=torch.bfloat16, device="cuda")
    inp = attention_inputs(q, k, v)
    rows = []
    with torch.no_grad():
        rows.append(("dense cuDNN SDPA", timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))))
        rows.append((f"fused prediction, top-k {args.topk}",
                     timed(lambda: predict_from_inputs(inp, simthreshd1=-1.0, cdfthreshd=None, topk=args.topk))))
        scores = block_scores(inp, simthreshd1=-1.0)
        rows.append(("block scores (torch path)", timed(lambda: block_scores(inp, simthreshd1=-1.0))))
        flat = ranking_rows(n, device=q.device).flatten()
        rows.append(("sampled-row statistics (triton kernel)", timed(lambda: sampled_block_stats_triton(inp, flat))))
        rows.append(("block scores, sample ranking", timed(lambda: block_scores(inp, simthreshd1=-1.0, ranking="sample"))))
        rows.append(("selection from scores", timed(lambda: select_blocks(scores, inp, topk=args.topk))))
        rows.append(("budget estimate (target 0.03)",
                     timed(lambda: estimate_budgets(inp, scores, target_l1=0.03), reps=5)))
        mask = select_blocks(scores, inp, topk=args.topk)
        pv = per_head("pvthreshd", 50.0, h, q.device)
        cuda = get_backend("cuda")
        result = cuda.run(inp, mask, pv)
        rows.append((f"block-sparse kernel (kept {float(mask.float().mean()):.2f})", timed(lambda: cuda.run(inp, mask, pv))))
        rows.append(("pooled k/v", timed(lambda: pooled_kv(inp, scores.pooled_k, scores.count_k))))
        pk, pvv, count = pooled_kv(inp, scores.pooled_k, scores.count_k)
        bias = compensation_bias(mask, inp, count)
        rows.append(("compensation bias", timed(lambda: compensation_bias(mask, inp, count))))
        rows.append(("pooled attention (mem-efficient SDPA + bias)", timed(lambda: pooled_attention(inp, pk, pvv, bias))))
        rows.append(("fused compensation + merge (triton)",
                     timed(lambda: compensate_triton(inp, result.out, result.lse, bias, pk, pvv))))
        comp_out, comp_lse = pooled_attention(inp, pk, pvv, bias)
        w = torch.sigmoid(comp_lse - result.lse).nan_to_num_(0.0)
        rows.append(("merge (lerp)", timed(lambda: torch.lerp(result.out, comp_out.to(q.dtype),
                                                              w.unsqueeze(-1).to(q.dtype)))))
        for target in (0.01, 0.03):
            rows.append((f"sparse_attention(target_l1={target}), call site warm",
                         timed(lambda: sparse_attention(q, k, v, target_l1=target), reps=16)))
        if args.sync_debug:
            report_syncs("sparse_attention(target_l1=0.03), call site warm", lambda: sparse_attention(q, k, v, target_l1=0.03))
        if args.profile:
            profile_ops("budget estimate", lambda: estimate_budgets(inp, scores, target_l1=0.03))
            profile_ops("sparse_attention(target_l1=0.03), call site warm", lambda: sparse_attention(q, k, v, target_l1=0.03))
    dense = rows[0][1]
    print(f"\n{torch.cuda.get_device_name()} {args.shape} (B1 H{h} N{n} D{d}), bf16, video inputs\n")
    print("| stage | ms | % of dense |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {100 * ms / dense:.1f} |")
    assert math.isfinite(dense)


if __name__ == "__main__":
    main()
