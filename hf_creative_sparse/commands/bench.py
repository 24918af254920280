"""`hf-creative-sparse bench`: the attention benchmark (see hf_creative_sparse/bench.py)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..bench import DESIGN_SHAPES, BenchShape, cpu_shapes, format_table, run_benchmark

HELP = "attention benchmark: sparse backends vs dense SDPA (time, TFLOP/s, kept fraction, rel. L1)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shape(text: str) -> BenchShape:
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"--shape wants B,H,N,D[,causal], got {text!r}")
    b, h, n, d = (int(x) for x in parts[:4])
    causal = len(parts) == 5 and parts[4].lower() in ("1", "true", "causal")
    return BenchShape(f"B{b}H{h}N{n}D{d}{'c' if causal else ''}", b, h, n, d, causal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shape", type=_shape, action="append",
                        help="B,H,N,D[,causal]; repeatable (default: DESIGN.md shapes, scaled down on CPU)")
    parser.add_argument("--kept", nargs="+", default=["1.0", "0.5", "0.25", "0.1", "auto"],
                        help="kept fractions (top-k masks) and/or 'auto' (default config and policy)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="sparse backends (default: cuda flex on CUDA; cpu reference on CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--given-mask", action="store_true", help="also time attention alone on a precomputed mask")


def run(args: argparse.Namespace) -> int:
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    shapes = args.shape or (list(DESIGN_SHAPES) if cuda else list(cpu_shapes()))
    backends = args.backends or (["cuda", "flex"] if cuda else ["cpu", "reference"])
    kept = [k if k == "auto" else float(k) for k in args.kept]
    rows = run_benchmark(shapes, kept=kept, backends=backends, device=args.device, dtype=dtype, reps=args.reps,
                         given_mask=args.given_mask, progress=lambda m: print(m, file=sys.stderr, flush=True))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {name}; torch {torch.__version__}; dtype {str(dtype).replace('torch.', '')}")
    print(format_table(rows))
    return 0
