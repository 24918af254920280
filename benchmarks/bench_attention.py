"""Attention benchmark on CPU or CUDA: sparse backends against dense SDPA in one run.

    python benchmarks/bench_attention.py                       # CPU, DESIGN shapes scaled down
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --backends cuda flex
    python benchmarks/bench_attention.py --shape 1,8,4096,64 --kept 0.25 1.0

Prints one row per (shape, method, kept fraction): median ms, dense-equivalent TFLOP/s,
kept fraction, speedup over SDPA measured in the same run, relative L1 against dense.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_creative_sparse.bench import DESIGN_SHAPES, BenchShape, cpu_shapes, format_table, run_benchmark

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_shape(text: str) -> BenchShape:
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"--shape wants B,H,N,D[,causal], got {text!r}")
    b, h, n, d = (int(x) for x in parts[:4])
    causal = len(parts) == 5 and parts[4].lower() in ("1", "true", "causal")
    return BenchShape(f"B{b}H{h}N{n}D{d}{'c' if causal else ''}", b, h, n, d, causal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shape", type=parse_shape, action="append",
                        help="B,H,N,D[,causal]; repeatable (default: DESIGN.md shapes, scaled down on CPU)")
    parser.add_argument("--kept", nargs="+", default=["1.0", "0.5", "0.25", "0.1", "auto"],
                        help="kept fractions (top-k masks) and/or 'auto' (default config and policy)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="sparse backends to time (default: cuda flex on CUDA, cpu reference on CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--given-mask", action="store_true", help="also time attention alone on a precomputed mask")


def main(args: argparse.Namespace) -> int:
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    shapes = args.shape or (list(DESIGN_SHAPES) if cuda else list(cpu_shapes()))
    backends = args.backends or (["cuda", "flex"] if cuda else ["cpu", "reference"])
    kept = [k if k == "auto" else float(k) for k in args.kept]
    rows = run_benchmark(shapes, kept=kept, backends=backends, device=args.device, dtype=dtype, reps=args.reps,
                         warmup=args.warmup, given_mask=args.given_mask,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {name}; torch {torch.__version__}; dtype {str(dtype).replace('torch.', '')}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
