"""Attention benchmark on CPU or CUDA: sparse backends against dense SDPA in one run.

    python benchmarks/bench_attention.py                       # CPU, DESIGN shapes scaled down
    python benchmarks/bench_attention.py --device cuda --backends cuda flex --given-mask
    python benchmarks/bench_attention.py --shape 1,8,4096,64 --kept 0.25 1.0

Prints one row per (shape, method, kept fraction): median ms, dense-equivalent TFLOP/s,
kept fraction, speedup over SDPA measured in the same run, relative L1 against dense.
The same as `hf-creative-sparse bench` (hf_creative_sparse/cli/bench.py).
"""

from __future__ import annotations

import argparse
import sys

from hf_creative_sparse.commands import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
