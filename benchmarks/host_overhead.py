#!/usr/bin/env python3
"""Host time per call of the dense-fallback path against SDPA (measurement only).

A short attention (GPT-2: B8 H12 N1024 D64 causal, ~70 us of kernel on an H200) runs
dense, so whatever Python runs before the launch shows up in its per-call time. This
prints host microseconds per call (``time.perf_counter`` over batches of calls, median of
the batches) for SDPA, the direct ATen cuDNN op, `dense_attention`, `sparse_attention_inputs`
with the default config and the public `sparse_attention`; on CUDA also the per-call
CUDA-event time (as `hf_creative_sparse.evaluation.attention_benchmark.device_timer`) and the speed ratio to cuDNN
SDPA. On CUDA each batch is synchronized and kept short (200 calls) so the launch queue
never fills and what is measured is host time.

    PYTHONPATH=$PWD python3 benchmarks/host_overhead.py            # CUDA if present, else CPU
    PYTHONPATH=$PWD python3 benchmarks/host_overhead.py --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_creative_sparse as hcs
from hf_creative_sparse.evaluation.attention_benchmark import device_timer
from hf_creative_sparse.ops.config import SparseAttentionConfig, SparseStats
from hf_creative_sparse.ops.attention import early_fallback, sparse_attention_inputs
from hf_creative_sparse.ops.dense import dense_attention
from hf_creative_sparse.ops.inputs import attention_inputs

Fn = Callable[[], object]


def host_us(fn: Fn, calls: int, batches: int, sync: Fn, ctx: Callable = contextlib.nullcontext) -> float:
    """Median over ``batches`` of the host microseconds per call of ``fn`` (``calls`` a batch)."""
    with ctx():
        for _ in range(max(20, calls // 4)):
            fn()
        sync()
        per_call = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls * 1e6)
            sync()  # outside the timed span: the next batch starts on an empty queue
    return statistics.median(per_call)


def event_us(fns: dict[str, tuple[Fn, Callable]], device: torch.device, rounds: int) -> list[dict[str, float]]:
    """Per round, each fn's median per-call time in microseconds (CUDA events around each
    call, 200 calls); the fns alternate round by round so host and clock drifts hit all alike."""
    timer = device_timer(device)
    out = []
    for _ in range(rounds):
        row = {}
        for name, (fn, ctx) in fns.items():
            with ctx():
                row[name] = timer(fn, 20, 200) * 1e3
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=None, help="calls a batch (CUDA 200, CPU 400)")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved CUDA-event rounds")
    parser.add_argument("--layer", action="store_true",
                        help="Flux shape (B1 H24 N4608 D128, 512 text tokens) through a patched layer's "
                             "`LayerState.attend` (default config and target 0.03, a denoising loop past its "
                             "warm-up), with a cProfile of its calls")
    args = parser.parse_args()
    if args.layer:
        layer_main(args)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    calls = args.calls or (200 if cuda else 400)
    # GPT-2 on CUDA; on CPU a tiny causal shape, so the host time is mostly Python
    b, h, n, d, dtype = (8, 12, 1024, 64, torch.bfloat16) if cuda else (1, 1, 16, 8, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    inp = attention_inputs(q, k, v, is_causal=True)
    cfg = SparseAttentionConfig()
    sync: Fn = torch.cuda.synchronize if cuda else (lambda: None)
    cudnn_ctx: Callable = (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) if cuda else contextlib.nullcontext

    out, stats = sparse_attention_inputs(inp, cfg)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'host'}), torch {torch.__version__}, "
          f"B{b} H{h} N{n} D{d} causal {str(dtype).removeprefix('torch.')}, {calls} calls x {args.batches} batches")
    print(f"sparse_attention_inputs: backend={stats.backend!r} reason={stats.fallback_reason!r} "
          f"max|out - sdpa|={(out.float() - ref.float()).abs().max().item():.2e}")

    rows: list[tuple[str, Fn, Callable]] = [
        ("F.sdpa" + (" (cuDNN)" if cuda else ""), lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         cudnn_ctx),
    ]
    if cuda:
        packet, scale = torch.ops.aten._scaled_dot_product_cudnn_attention, inp.scale
        ops = (("torch.ops.aten cuDNN op (packet)", packet), ("torch.ops.aten cuDNN op .default", packet.default),
               ("torch._scaled_dot_product_cudnn_attention", torch._scaled_dot_product_cudnn_attention))
        for name, op in ops:
            rows.append((name, lambda op=op: op(q, k, v, None, False, 0.0, True, False, scale=scale),
                         contextlib.nullcontext))
    rows += [
        ("dense_attention(inp)", lambda: dense_attention(inp), contextlib.nullcontext),
        ("sparse_attention_inputs(inp, cfg)", lambda: sparse_attention_inputs(inp, cfg), contextlib.nullcontext),
        ("hcs.sparse_attention(causal)", lambda: hcs.sparse_attention(q, k, v, is_causal=True),
         contextlib.nullcontext),
    ]
    # the policy's pieces on GPT-2-sized meta tensors: runs anywhere, no kernel
    mq = torch.empty(8, 12, 1024, 64, device="meta", dtype=torch.bfloat16)
    meta = attention_inputs(mq, mq, mq, is_causal=True)
    pieces: list[tuple[str, Fn]] = [
        ("  piece: attention_inputs(q, k, v)", lambda: attention_inputs(q, k, v, is_causal=True)),
        ("  piece: SparseAttentionConfig()", SparseAttentionConfig),
        ("  piece: early_fallback(gpt2 shape) memo hit", lambda: early_fallback(meta, cfg)),
        ("  piece: SparseStats(dense)", lambda: SparseStats(kept_fraction=1.0, backend="sdpa", fallback_reason="x")),
    ]
    print(f"\n{'call':44s} {'host us/call':>13s}")
    host = {}
    for name, fn, ctx in rows:
        host[name] = host_us(fn, calls, args.batches, sync, ctx)
        print(f"{name:44s} {host[name]:13.2f}")
    for name, fn in pieces:
        print(f"{name:44s} {host_us(fn, calls, args.batches, lambda: None):13.2f}")
    if not cuda:
        print("\n(CPU: the direct aten cuDNN op, CUDA-event times and the ratio to cuDNN are CUDA-only; skipped)")
        return
    fns = {"cuDNN SDPA": (rows[0][1], cudnn_ctx), "direct binding": (rows[3][1], contextlib.nullcontext),
           "sparse_attention_inputs": (lambda: sparse_attention_inputs(inp, cfg), contextlib.nullcontext)}
    per_round = event_us(fns, device, args.rounds)
    print(f"\nCUDA events, per call (median of {args.rounds} interleaved rounds of 200 calls):")
    for name in fns:
        ratio = statistics.median(r["cuDNN SDPA"] / r[name] for r in per_round)
        median = statistics.median(r[name] for r in per_round)
        print(f"  {name:24s} {median:7.1f} us   speed {ratio:.3f}x of cuDNN SDPA")


def layer_main(args: argparse.Namespace) -> None:
    """Host and CUDA-event time per call of `LayerState.attend` at the Flux shape against
    cuDNN SDPA and `dense_attention`, then where the layer's host time goes (cProfile)."""
    import cProfile
    import pstats

    from hf_creative_sparse.integrations.state import LayerState, PatchOptions, StepClock

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    b, h, n, d, text = 1, 24, 4608, 128, 512
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    inp = attention_inputs(q, k, v)
    sync: Fn = torch.cuda.synchronize if cuda else (lambda: None)
    cudnn_ctx: Callable = (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) if cuda else contextlib.nullcontext
    layers = {}
    for name, cfg in (("default", SparseAttentionConfig()), ("target 0.03", SparseAttentionConfig(target_l1=0.03))):
        clock = StepClock(10_000, source="scheduler")
        layer = LayerState(f"flux.{name}", cfg, clock=clock, options=PatchOptions())
        clock.begin(10_000)

        def call(layer: LayerState = layer, clock: StepClock = clock) -> object:
            clock.on_forward()
            out = layer.attend(q, k, v, dense_prefix=text)
            clock.advance()
            return out

        for _ in range(3):  # past the dense warm-up step and its measurement
            call()
        sync()
        layers[name] = (layer, call)
        st = layer.last_stats
        print(f"layer {name}: backend={st.backend!r} kept={float(st.kept_fraction):.3f} reason={st.fallback_reason!r}")
    rows = [("F.sdpa (cuDNN)", lambda: F.scaled_dot_product_attention(q, k, v), cudnn_ctx),
            ("dense_attention(inp)", lambda: dense_attention(inp), contextlib.nullcontext)]
    rows += [(f"LayerState.attend ({name})", call, contextlib.nullcontext) for name, (_, call) in layers.items()]
    calls = args.calls or 100
    print(f"\n{'call':44s} {'host us/call':>13s}")
    for name, fn, ctx in rows:
        print(f"{name:44s} {host_us(fn, calls, args.batches, sync, ctx):13.2f}")
    if cuda:
        fns = {name: (fn, ctx) for name, fn, ctx in rows}
        per_round = event_us(fns, device, args.rounds)
        print(f"\nCUDA events, per call (median of {args.rounds} interleaved rounds of 200 calls):")
        for name in fns:
            ratio = statistics.median(r["F.sdpa (cuDNN)"] / r[name] for r in per_round)
            print(f"  {name:40s} {statistics.median(r[name] for r in per_round):8.1f} us   "
                  f"speed {ratio:.3f}x of cuDNN SDPA")
    for name, (_, call) in layers.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            call()
        sync()
        prof.disable()
        print(f"\ncProfile of {calls} calls of LayerState.attend ({name}), by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
