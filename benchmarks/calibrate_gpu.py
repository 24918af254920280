"""Calibration time at Wan 2.1 1.3B's attention shapes (issue 8's speed check).

    python benchmarks/calibrate_gpu.py            # 30 layers, 12 heads, N=32760, D=128, 2 calls, bf16, CUDA
    python benchmarks/calibrate_gpu.py --small    # a CPU-sized version of the same run (seconds)

SpargeAttn tunes per head by bisection with a kernel call per candidate; its users report
6 hours to 1.5 days per model. This script times `calibrate_calls` (the vectorised search
plus the verification with real `sparse_attention` calls) on synthetic q/k/v with Wan
1.3B's self-attention shapes: 30 layers x 2 recorded calls of B1 H12 N32760 D128
(480p, 81 frames: 21 x 30 x 52 latent tokens).

The q/k/v are structured like a video DiT's: every token carries a feature vector that
varies smoothly over the (frame, row, column) grid (coarse random fields, trilinearly
upsampled, normalised per token), q = k = that field times a per-head sharpness, plus
noise; v is a smooth field of its own. Sharp heads attend locally and can be sparse;
the flattest heads attend almost uniformly and must stay dense. The inputs are made
before the clock starts (about 300 MB per call in bf16, 18 GB in all on the GPU).

Prints the backend the verification used, the total calibration time (the number the
issue asks for), time per layer, mean kept fraction, dense heads, and the largest
measured relative L1 error. Needs only torch and this repository.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_creative_sparse.calibration import RecordedCall, calibrate_calls  # noqa: E402
from hf_creative_sparse.calibration.search import PV_GRID, SearchGrid  # noqa: E402
from hf_creative_sparse.ops.config import SparseAttentionConfig  # noqa: E402
from hf_creative_sparse.ops import sparse_attention  # noqa: E402

#: Wan 2.1 480p x 81 frames: latent grid (frames, rows, cols) after the 1x2x2 patchify.
WAN_GRID = (21, 30, 52)


def smooth_field(grid: tuple[int, int, int], channels: int, coarse: tuple[int, int, int], *, heads: int,
                 generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[heads, F*H*W, channels] float32: coarse random fields upsampled over the grid."""
    low = torch.randn(1, heads * channels, *coarse, generator=generator, device=device)
    up = torch.nn.functional.interpolate(low, size=grid, mode="trilinear", align_corners=False)
    return up.view(heads, channels, -1).transpose(1, 2)


def synthetic_call(grid: tuple[int, int, int], heads: int, dim: int, *, seed: int, dtype: torch.dtype,
                   device: torch.device) -> RecordedCall:
    """One self-attention call with smooth, per-head sharpened q = k (HND, B=1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    coarse = tuple(max(2, n // 6) for n in grid)
    field = smooth_field(grid, dim, coarse, heads=heads, generator=g, device=device)
    field = field / field.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    # softmax temperature per head: from nearly flat (1) to sharp (24) attention
    sharp = torch.linspace(1.0, 24.0, heads, device=device).view(heads, 1, 1)
    amp = (sharp * math.sqrt(dim)).sqrt()  # with the default scale 1/sqrt(D): q.k * scale = sharp * cos(q, k)
    noise = 0.05 * torch.randn(field.shape, generator=g, device=device)
    q = (field + noise) * amp
    k = field * amp
    v = smooth_field(grid, dim, coarse, heads=heads, generator=g, device=device)
    v = v + 0.3 * torch.randn(v.shape, generator=g, device=device)
    # contiguous HND, as a model's (B, H, N, D) views after the head split (SDPA's fused kernels need stride 1 in D)
    return RecordedCall(*(t[None].to(dtype).contiguous() for t in (q, k, v)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized run: 2 layers, 2 heads, 2 x 8 x 64 grid, D32")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--grid", type=int, nargs=3, default=list(WAN_GRID), metavar=("F", "H", "W"))
    parser.add_argument("--target-l1", type=float, default=0.05)
    parser.add_argument("--method", choices=("cdf", "topk"), default="cdf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--backend", default="auto",
                        help="verification backend (SparseAttentionConfig.backend). 'auto' is what users get: its GPU "
                             "cost model may run dense SDPA (measured L1 0); 'flex' or 'cuda' force a sparse kernel "
                             "(with 'flex' the pvthreshd candidates stop at 20, below which FlexAttention refuses)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.layers, args.heads, args.dim, args.grid = min(args.layers, 2), 2, 32, [2, 8, 64]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = tuple(args.grid)
    n = shape[0] * shape[1] * shape[2]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"{args.layers} layers x {args.calls} calls of B1 H{args.heads} N{n} D{args.dim}, target L1 {args.target_l1}",
          flush=True)

    t0 = time.perf_counter()
    layers = {f"blocks.{i}.attn1": [synthetic_call(shape, args.heads, args.dim, seed=1000 * i + c, dtype=dtype,
                                                   device=device) for c in range(args.calls)]
              for i in range(args.layers)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"inputs made in {time.perf_counter() - t0:.1f} s", flush=True)

    backend = args.backend
    config = SparseAttentionConfig(min_seq_len=0 if args.small else 1024, backend=backend)
    grid = SearchGrid(method=args.method)
    if backend == "flex":
        grid = SearchGrid(method=args.method, pvthreshd=tuple(p for p in PV_GRID if p >= 20.0))
    # warm-up outside the clock: builds/loads the kernels the verification will use
    first = layers["blocks.0.attn1"][0]
    _, stats = sparse_attention(first.q, first.k, first.v, config=config.replace(max_kept_fraction=1.0), topk=0.1,
                                return_stats=True)
    print(f"warm-up call ran on: {stats.backend} (verification backend setting: {backend!r})", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    cal = calibrate_calls(layers, args.target_l1, config=config, grid=grid, progress=not args.no_progress,
                          model_class="synthetic Wan 1.3B self-attention", family="wan")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    dense_heads = sum(int(layer.dense.sum()) for layer in cal.layers.values())
    total_heads = sum(layer.heads for layer in cal.layers.values())
    result = {"seconds": seconds, "per_layer_s": seconds / args.layers, "mean_kept_fraction": cal.mean_kept_fraction,
              "dense_heads": dense_heads, "heads": total_heads, "max_measured_l1": cal.max_measured_l1,
              "verify_rounds": cal.info.get("verify_rounds"), "pass_seconds": cal.info.get("pass_seconds")}
    print(cal.table() if args.small or args.layers <= 4 else "\n".join(cal.table().splitlines()[:6]) + "\n...")
    peak = ""
    if device.type == "cuda":
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(f"\nCALIBRATION TIME: {seconds:.1f} s total ({result['per_layer_s']:.2f} s per layer){peak}")
    print(f"mean kept fraction {result['mean_kept_fraction']:.3f}; dense heads {dense_heads}/{total_heads}; "
          f"max measured L1 {result['max_measured_l1']:.4f} (target {args.target_l1}); "
          f"verification rounds {result['verify_rounds']}")
    print(f"verification calls by backend: {cal.info.get('verify_backends')}")
    print("seconds per pass: " + ", ".join(f"{k} {v:.1f}" for k, v in (result["pass_seconds"] or {}).items()))
    return result


if __name__ == "__main__":
    main()
