"""CPU benchmark of the compiled block-sparse kernel against dense SDPA, the reference
backend, a plain PyTorch loop that gathers the kept key blocks and calls matmul, and the
default ``backend="auto"`` policy (`sparse_attention` with a top-k budget).

Every method runs on the same inputs and masks, interleaved round by round so that load
from other processes hits them alike; times are medians over the rounds and every ratio
is taken within this one run. Masks keep an exact fraction of each query block's
attendable key blocks (random choice), so "kept 25%" is 25% of the work of dense.

    python benchmarks/bench_cpu.py                 # the table (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --repeats 9 --out benchmarks/RESULTS_CPU.md
    python benchmarks/bench_cpu.py --isa avx2      # an AVX2-only machine, emulated (see below)
    python benchmarks/bench_cpu.py --clock cpu     # one thread, thread CPU time: robust to load

``--isa avx2`` runs the kernel's AVX2 instance (``HCS_CPU_ISA=avx2``) and limits torch's
own kernels to AVX2 as well (``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``,
``ONEDNN_MAX_CPU_ISA=AVX2``), so that SDPA is the one an AVX2-only machine runs; these must
be set before torch loads, which is why the option is read before the imports.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

#: Environment that makes this process behave like a CPU of the given ISA (torch's ATen
#: dispatch, MKL and oneDNN included), for ``--isa``.
ISA_ENV = {
    "avx2": {"HCS_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"HCS_CPU_ISA": "avx512"},
    "generic": {"HCS_CPU_ISA": "generic", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def _apply_isa_env(argv: list[str]) -> None:
    """Set ``ISA_ENV[--isa]`` before torch is imported (torch reads it at load time)."""
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[1] if arg.startswith("--isa=") else (argv[i + 1] if arg == "--isa" and
                                                                       i + 1 < len(argv) else None)
        if name is not None:
            if name not in ISA_ENV:
                raise SystemExit(f"--isa must be one of {sorted(ISA_ENV)}, got {name!r}")
            os.environ.update(ISA_ENV[name])


if __name__ == "__main__":
    _apply_isa_env(sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_creative_sparse.ops.config import BLOCK_M, BLOCK_N  # noqa: E402
from hf_creative_sparse.ops._ext import load_extension  # noqa: E402
import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.ops.attention import block_sparse_attention  # noqa: E402
from hf_creative_sparse.ops.inputs import attention_inputs  # noqa: E402
from hf_creative_sparse.ops.masks import attendable_blocks, kept_fraction  # noqa: E402


@dataclass
class Shape:
    label: str
    b: int
    h: int
    n: int
    d: int
    causal: bool
    kept: float


KEPT = (0.25, 0.5, 0.9, 1.0)
SHAPES = [Shape("B1 H8 N4096 D64", 1, 8, 4096, 64, False, kept) for kept in KEPT] + [
    Shape("GPT-2 B8 H12 N1024 D64 causal", 8, 12, 1024, 64, True, kept) for kept in KEPT]


def fixed_fraction_mask(b: int, h: int, n: int, causal: bool, kept: float, seed: int = 0) -> torch.Tensor:
    """bool [B, H, Mq, Mk]: each query block keeps round(kept * attendable) key blocks (at
    least one), chosen at random among its attendable blocks."""
    g = torch.Generator().manual_seed(seed)
    mq, mk = math.ceil(n / BLOCK_M), math.ceil(n / BLOCK_N)
    mask = torch.zeros(b, h, mq, mk, dtype=torch.bool)
    for i in range(mq):
        attendable = min(mk, math.ceil(min(n, (i + 1) * BLOCK_M) / BLOCK_N)) if causal else mk
        keep = max(1, round(kept * attendable))
        scores = torch.rand(b, h, attendable, generator=g)
        chosen = scores.argsort(-1)[..., :keep]
        mask[:, :, i].scatter_(-1, chosen, True)
    return mask


def gather_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            causal: bool) -> torch.Tensor:
    """The plain PyTorch baseline: per query block, gather the kept key blocks of every
    head (the same count in each head) and run matmul, softmax, matmul (MKL does the
    matmuls; the mask is applied only where a block holds unusable keys)."""
    b, h, n, d = q.shape
    mq, mk = mask.shape[2], mask.shape[3]
    pad = mk * BLOCK_N - n
    kb = F.pad(k, (0, 0, 0, pad)).view(b, h, mk, BLOCK_N, d)
    vb = F.pad(v, (0, 0, 0, pad)).view(b, h, mk, BLOCK_N, d)
    key_pos = torch.arange(mk * BLOCK_N).view(mk, BLOCK_N)
    out = torch.empty_like(q)
    qs = q * d ** -0.5
    bi, hi = torch.arange(b)[:, None, None], torch.arange(h)[None, :, None]
    for i in range(mq):
        r0, r1 = i * BLOCK_M, min(n, (i + 1) * BLOCK_M)
        idx = mask[:, :, i].nonzero()[:, 2].view(b, h, -1)  # same count per head by construction
        kg = kb[bi, hi, idx].flatten(2, 3)  # [B, H, kept * 64, D]
        vg = vb[bi, hi, idx].flatten(2, 3)
        s = qs[:, :, r0:r1] @ kg.transpose(-1, -2)
        cols = key_pos[idx].flatten(2)[:, :, None, :]  # [B, H, 1, kept * 64] key positions
        if causal and int(cols.max()) > r0 or int(cols.max()) >= n:
            invalid = (cols > torch.arange(r0, r1)[None, None, :, None]) if causal else cols >= n
            s.masked_fill_(invalid | (cols >= n), float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows with no usable key -> 0
        else:
            p = torch.softmax(s, dim=-1)
        out[:, :, r0:r1] = p @ vg
    return out


#: Clock of the timings: wall time (``perf_counter``), or this thread's CPU time with one
#: torch thread (``thread_time``: time other processes take from the core is not counted).
CLOCK: Callable[[], float] = time.perf_counter


def time_interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per method, and the median of each method's per-round ratio to
    the first ("<name>/ratio"); one warm-up call each, then `repeats` rounds."""
    for fn in methods.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = CLOCK()
            fn()
            samples[name].append(CLOCK() - t0)
    first = next(iter(methods))
    out = {name: statistics.median(ts) for name, ts in samples.items()}
    for name, ts in samples.items():
        ratios = [a / b for a, b in zip(samples[first], ts)]
        out[f"{name}/ratio"] = statistics.median(ratios)
        out[f"{name}/spread"] = (max(ratios) - min(ratios)) / out[f"{name}/ratio"] if len(ratios) > 1 else 0.0
    return out


def run_shape(shape: Shape, repeats: int, reference_repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape.b, shape.h, shape.n, shape.d) for _ in range(3))
    mask = fixed_fraction_mask(shape.b, shape.h, shape.n, shape.causal, shape.kept)
    inp = attention_inputs(q, k, v, is_causal=shape.causal)
    kept, _ = kept_fraction(mask & attendable_blocks(inp), inp)

    def cpu() -> torch.Tensor:
        return block_sparse_attention(q, k, v, mask, is_causal=shape.causal, backend="cpu")

    auto_stats = []

    def auto() -> torch.Tensor:
        # the default policy with a top-k budget of the same kept fraction (every block
        # counted similar, so top-k selects exactly that fraction): prediction included
        out, stats = hcs.sparse_attention(q, k, v, is_causal=shape.causal, topk=shape.kept, simthreshd1=-1.0,
                                          return_stats=True)
        auto_stats.append(stats)
        return out

    methods = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal),
        "cpu": cpu,
        "gather": lambda: gather_matmul_attention(q, k, v, mask, shape.causal),
        "auto": auto,
    }
    times = time_interleaved(methods, repeats)
    last = auto_stats[-1]
    auto_ran = last.backend if not last.fallback_reason else "sdpa"
    auto_reason = last.fallback_reason or f"kept {last.kept_fraction:.2f}"
    ref = lambda: block_sparse_attention(q, k, v, mask, is_causal=shape.causal, backend="reference")  # noqa: E731
    # the reference is slow: time it against the kernel in rounds of its own
    ref_times = time_interleaved({"cpu": cpu, "reference": ref}, reference_repeats) if reference_repeats else {}
    err = (cpu() - ref()).abs().max().item()
    err_gather = (cpu() - gather_matmul_attention(q, k, v, mask, shape.causal)).abs().max().item()
    rows = torch.full((mask.shape[2],), BLOCK_M).index_fill_(0, torch.tensor([mask.shape[2] - 1]),
                                                              shape.n - (mask.shape[2] - 1) * BLOCK_M)
    cols = torch.full((mask.shape[3],), BLOCK_N).index_fill_(0, torch.tensor([mask.shape[3] - 1]),
                                                             shape.n - (mask.shape[3] - 1) * BLOCK_N)
    flops = 4 * shape.d * (mask.float() * rows[:, None] * cols[None, :]).sum().item()  # over kept blocks
    return {
        "shape": shape, "kept": kept, "times": times, "ref_times": ref_times,
        "err": max(err, err_gather), "gflops": flops / times["cpu"] / 1e9, "auto_ran": auto_ran,
        "auto_reason": auto_reason,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    ext = load_extension("cpu").module
    isa = ext.selected_isa() if ext is not None else "unavailable"
    return (f"{cpu}; ISA flags: {', '.join(isa_flags()) or 'none found'}; {torch.get_num_threads()} threads; "
            f"torch {torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}); "
            f"kernel instance that ran: **{isa}** (compiled-in and usable here: "
            f"{', '.join(ext.available_isas()) if ext is not None else 'none'})")


def isa_flags() -> list[str]:
    """The vector ISA flags of this CPU that decide the kernel instance and torch's paths."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_fp16", "amx_tile", "neon", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| shape | kept | SDPA ms | cpu kernel ms | gather+matmul ms | reference ms | cpu vs SDPA (spread) | "
        "cpu vs gather | cpu vs reference | auto vs SDPA | auto ran | kernel GFLOP/s | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, rt, s = r["times"], r["ref_times"], r["shape"]
        ref = f"{rt['reference'] * 1e3:.1f}" if rt else "-"
        ref_ratio = f"{rt['reference'] / rt['cpu']:.1f}x" if rt else "-"
        lines.append(
            f"| {s.label} | {r['kept']:.0%} | {t['sdpa'] * 1e3:.1f} | {t['cpu'] * 1e3:.1f} | "
            f"{t['gather'] * 1e3:.1f} | {ref} | {t['cpu/ratio']:.2f}x ({t['cpu/spread']:.0%}) | "
            f"{t['gather'] / t['cpu']:.2f}x | {ref_ratio} | {t['auto/ratio']:.2f}x | {r['auto_ran']} | "
            f"{r['gflops']:.0f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per method (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=3, help="rounds for the slow reference (0: not timed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), help="pin the kernel instance and torch's ISA (see above)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or one thread's CPU time (forces --threads 1)")
    parser.add_argument("--kept", type=float, nargs="*", help="only these kept fractions (default: all)")
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    status = load_extension("cpu")
    if status.module is None:
        print(f"the cpu kernel is unavailable: {status.error}", file=sys.stderr)
        return 1
    rows = []
    for shape in SHAPES:
        if args.kept and not any(abs(shape.kept - k) < 1e-9 for k in args.kept):
            continue
        rows.append(run_shape(shape, args.repeats, args.reference_repeats))
        print(table(rows[-1:]).splitlines()[-1], f"[auto: {rows[-1]['auto_reason']}]", file=sys.stderr, flush=True)
    clock = "one thread's CPU time" if args.clock == "cpu" else "wall time"
    text = (f"Machine: {machine()}.\n\nMedians of {args.repeats} interleaved rounds "
            f"({args.reference_repeats} for the reference), {clock}; float32; ratios are medians of per-round "
            f"ratios from this one run (spread: (max - min) / median of the kernel's).\n\n{table(rows)}\n")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
