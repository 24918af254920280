"""Attention per decode step on the CPU: decode-time KV-block sparsity vs SDPA, one run.

Llama-shaped GQA (32 query heads over 8 KV heads, head dim 128), batch 1, float32, a KV cache
of ``--context`` keys that grows by one key a step. The sparse step is everything a decode
step does (incremental block statistics of the new key, the block scores of ``--score``,
top-k, the compiled kernel over the kept blocks); SDPA reads the whole cache (GQA through enable_gqa). Steps
alternate between the two in rounds; medians.

    python benchmarks/cpu_decode.py --context 32768 --budgets 0.25 0.125
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_creative_sparse.ops import decode as dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, nargs="+", default=[32768])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    parser.add_argument("--block-size", type=int, default=dm.DecodeSparsityConfig().block_size)
    parser.add_argument("--score", choices=dm.DECODE_SCORES, default=dm.DecodeSparsityConfig().score)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    b, hq, hkv, d = 1, 32, 8, 128
    rows = []
    for context in args.context:
        grow = args.rounds * args.steps + 4
        g = torch.Generator().manual_seed(0)
        kbuf = torch.randn(b, hkv, context + grow, d, generator=g)
        vbuf = torch.randn(b, hkv, context + grow, d, generator=g)
        q = torch.randn(b, hq, 1, d, generator=g)
        states = {bud: dm.DecodeState(dm.DecodeSparsityConfig(budget=bud, block_size=args.block_size, min_context=0,
                                                              score=args.score, backend="cpu")) for bud in args.budgets}
        length = {bud: context for bud in args.budgets}
        for bud, st in states.items():
            st.attend(q, kbuf[:, :, :context], vbuf[:, :, :context])  # the first build of the statistics
        k, v = kbuf[:, :, :context].contiguous(), vbuf[:, :, :context].contiguous()
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        times: dict[str, list[float]] = {"sdpa": []} | {str(bud): [] for bud in args.budgets}
        for _ in range(args.rounds):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                times["sdpa"].append(time.perf_counter() - t0)
            for bud, st in states.items():
                for _ in range(args.steps):
                    length[bud] += 1
                    n = length[bud]
                    t0 = time.perf_counter()
                    st.attend(q, kbuf[:, :, :n], vbuf[:, :, :n])
                    times[str(bud)].append(time.perf_counter() - t0)
        sdpa = statistics.median(times["sdpa"]) * 1e3
        for bud, st in states.items():
            ms = statistics.median(times[str(bud)]) * 1e3
            rep = st.report()
            rows.append((context, bud, sdpa, ms, rep["mean_kept_fraction"], rep["stats_updates"], rep["stats_rebuilds"]))
            print(f"context {context} budget {bud}: sdpa {sdpa:.2f} ms, sparse {ms:.2f} ms ({sdpa / ms:.2f}x), {rep}",
                  flush=True)
    score, block = dm.DecodeSparsityConfig(score=args.score, block_size=args.block_size).layout("cpu")
    print(f"\nB{b} H{hq}/{hkv} (GQA) D{d} float32, {torch.get_num_threads()} threads, blocks of {block} keys, "
          f"score {score} (asked: {args.score})")
    print("\n| context | k_attn | SDPA ms | sparse step ms | speedup | kept fraction | incremental updates / rebuilds |")
    print("|---|---|---|---|---|---|---|")
    for context, bud, sdpa, ms, kept, upd, reb in rows:
        print(f"| {context // 1024}k | {bud * 100:g}% | {sdpa:.2f} | {ms:.2f} | {sdpa / ms:.2f}x | {kept:.3f} | {upd} / {reb} |")


if __name__ == "__main__":
    main()
