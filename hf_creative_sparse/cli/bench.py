"""`hf-creative-sparse bench`: the attention benchmark (see hf_creative_sparse/evaluation/attention_benchmark.py)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..evaluation.attention_benchmark import DESIGN_SHAPES, BenchShape, cpu_shapes, format_table, run_benchmark
from ..ops.dispatch import AUTO_ORDER
from ._args import add_threads_argument, apply_threads, int_at_least, kept_value

HELP = "attention benchmark: sparse backends vs dense SDPA (time, TFLOP/s, kept fraction, rel. L1)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Backends `bench --backends` accepts (sparse ones; dense SDPA is always timed).
SPARSE_BACKENDS = AUTO_ORDER


def _shape(text: str) -> BenchShape:
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"--shape takes B,H,N,D[,causal], got {text!r}")
    b, h, n, d = (int_at_least(1)(x) for x in parts[:4])
    causal = len(parts) == 5 and parts[4].lower() in ("1", "true", "causal")
    return BenchShape(f"B{b}H{h}N{n}D{d}{'c' if causal else ''}", b, h, n, d, causal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shape", type=_shape, action="append",
                        help="B,H,N,D[,causal]; repeatable (default: DESIGN.md shapes, scaled down on CPU)")
    parser.add_argument("--kept", nargs="+", type=kept_value, default=[1.0, 0.5, 0.25, 0.1, "auto"],
                        help="kept fractions in (0, 1] (top-k masks, prediction included) and/or 'auto' (the "
                             "default config and its dense-fallback policy)")
    parser.add_argument("--backends", nargs="+", choices=SPARSE_BACKENDS, default=None,
                        help="sparse backends (default: cuda flex on CUDA; cpu reference on CPU)")
    parser.add_argument("--reps", type=int_at_least(1), default=3, help="timed repetitions (median)")
    parser.add_argument("--given-mask", action="store_true", help="also time attention alone on a precomputed mask")
    add_threads_argument(parser)


class OnceProgress:
    """Prints the benchmark's progress to stderr; a backend that cannot run is reported
    once, not for every shape."""

    def __init__(self) -> None:
        self.skipped: set[str] = set()

    def __call__(self, message: str) -> None:
        if ": skipping " in message:
            what = message.split(": skipping ", 1)[1]
            backend = what.split(":", 1)[0]
            if backend in self.skipped:
                return
            self.skipped.add(backend)
            message = f"skipping {what}"
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    threads = apply_threads(args.threads)
    print(threads, file=sys.stderr, flush=True)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    shapes = args.shape or (list(DESIGN_SHAPES) if cuda else list(cpu_shapes()))
    backends = args.backends or (["cuda", "flex"] if cuda else ["cpu", "reference"])
    rows = run_benchmark(shapes, kept=args.kept, backends=backends, device=device, dtype=dtype, reps=args.reps,
                         given_mask=args.given_mask, progress=None if args.no_progress else OnceProgress())
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {name}; torch {torch.__version__}; dtype {str(dtype).replace('torch.', '')}")
    print(format_table(rows))
    if not cuda:
        print(threads)
    return 0
