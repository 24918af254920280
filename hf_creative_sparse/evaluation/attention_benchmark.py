"""Attention benchmark: sparse backends against dense SDPA, measured in one run on the same
inputs (DESIGN.md, "How speed is judged").

Every row reports the median time, the dense-equivalent TFLOP/s (4*B*H*N*N*D over the
time, for causal shapes too, as DESIGN.md fixes it), the kept-block fraction, the relative
L1 error against dense SDPA (sum |out - dense| / sum |dense|) and the speedup over dense
SDPA timed in the same process. Sparse rows include mask prediction unless marked
"given mask".

Example:
    >>> from hf_creative_sparse.evaluation.attention_benchmark import BenchShape, run_benchmark, format_table
    >>> rows = run_benchmark([BenchShape("tiny", 1, 2, 512, 32)], kept=[0.5], backends=["reference"], reps=1)
    >>> "tiny" in format_table(rows)
    True
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..ops.config import BLOCK_M, BLOCK_N
from ..ops import block_sparse_attention, sparse_attention
from ..ops.dispatch import why_not
from ..ops.inputs import attention_inputs


@dataclass(frozen=True)
class BenchShape:
    """One attention problem: batch, heads, sequence length, head dim, causal."""

    name: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool = False

    def flops(self) -> float:
        """Dense-equivalent FLOPs: 4 * B * H * N * N * D."""
        return 4.0 * self.batch * self.heads * self.seq_len ** 2 * self.head_dim

    def scaled(self, max_heads: int, len_divisor: int, max_batch: int) -> "BenchShape":
        return BenchShape(self.name, min(self.batch, max_batch), min(self.heads, max_heads),
                          max(BLOCK_M, self.seq_len // len_divisor), self.head_dim, self.causal)


#: The shapes of DESIGN.md.
DESIGN_SHAPES = (
    BenchShape("flux-1024px", 1, 24, 4608, 128),
    BenchShape("cogvideox-2b-49f", 1, 30, 17776, 64),
    BenchShape("wan-1.3b-480p", 1, 12, 32760, 128),
    BenchShape("32k", 1, 24, 32768, 128),
    BenchShape("gpt2-causal", 8, 12, 1024, 64, causal=True),
)


def cpu_shapes() -> tuple[BenchShape, ...]:
    """DESIGN.md shapes scaled for a 2-core CPU (at most 4 heads, a quarter of the length)."""
    return tuple(s.scaled(max_heads=4, len_divisor=4, max_batch=2) for s in DESIGN_SHAPES)


@dataclass
class BenchRow:
    shape: BenchShape
    method: str
    kept: float
    ms: float
    sdpa_ms: float
    rel_l1: float
    note: str = ""

    @property
    def tflops(self) -> float:
        return self.shape.flops() / (self.ms * 1e-3) / 1e12

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.ms


def structured_inputs(shape: BenchShape, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """q/k/v with smooth structure along the sequence (as real video/image tokens have),
    so that predicted masks are sparse, plus noise so they are not trivial."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d = shape.seq_len, shape.head_dim
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.rand(1, d, generator=g) * 0.02
    phase = torch.rand(shape.heads, 1, d, generator=g) * 6.28
    base = torch.sin(pos * freqs + phase)  # [H, N, D]
    q = (base[None] * 2.0 + 0.5 * torch.randn(shape.batch, shape.heads, n, d, generator=g))
    k = (torch.sin(pos * freqs + phase + 0.3)[None] * 2.0 + 0.5 * torch.randn(shape.batch, shape.heads, n, d, generator=g))
    v = torch.randn(shape.batch, shape.heads, n, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def fixed_fraction_mask(shape: BenchShape, kept: float, device: str | torch.device, seed: int = 0) -> torch.Tensor:
    """A random block mask keeping ceil(kept * attendable) key blocks per query block
    (the diagonal block always among them when causal)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mq, mk = math.ceil(shape.seq_len / BLOCK_M), math.ceil(shape.seq_len / BLOCK_N)
    scores = torch.rand(shape.batch, shape.heads, mq, mk, generator=g)
    if shape.causal:
        last_row = torch.clamp(torch.arange(mq) * BLOCK_M + BLOCK_M - 1, max=shape.seq_len - 1)
        allowed = torch.arange(mk)[None, :] * BLOCK_N <= last_row[:, None]
        diag = (torch.arange(mk)[None, :] * BLOCK_N >= torch.arange(mq)[:, None] * BLOCK_M) & allowed
        scores = scores.masked_fill(~allowed, -1.0) + diag.float() * 2.0
        n_keep = torch.ceil(kept * allowed.sum(-1).float()).clamp(min=1).long()[None, None, :, None]
    else:
        n_keep = torch.full((1, 1, mq, 1), max(1, math.ceil(kept * mk)))
    ranks = scores.argsort(-1, descending=True).argsort(-1)
    return (ranks < n_keep).to(device)


def device_timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """``run(fn, warmup, reps) -> median ms``: CUDA events on CUDA, a host clock elsewhere."""
    if device.type == "cuda":
        def run(fn, warmup, reps):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        return run

    def run(fn, warmup, reps):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def _rel_l1(out: torch.Tensor, dense: torch.Tensor) -> float:
    return float((out.float() - dense.float()).abs().sum() / dense.float().abs().sum().clamp(min=1e-30))


def _sdpa_variants(device: torch.device) -> list[tuple[str, object]]:
    """Dense baselines: cuDNN and flash on CUDA (the fastest dense paths on Hopper), the
    default dispatcher on CPU."""
    if device.type != "cuda":
        return [("sdpa", None)]
    from torch.nn.attention import SDPBackend

    return [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)]


def _run_sdpa(q, k, v, causal: bool, backend) -> torch.Tensor:
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def run_benchmark(
    shapes: Iterable[BenchShape],
    *,
    kept: Iterable[float | str] = (1.0, 0.5, 0.25, 0.1, "auto"),
    backends: Iterable[str] = ("cpu", "reference"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 1,
    reps: int = 5,
    given_mask: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time dense SDPA and each sparse backend on every shape and kept fraction.

    A float ``kept`` predicts a top-k mask of that fraction (``topk=kept``, every block
    self-similar) and times prediction plus attention; ``"auto"`` runs the default
    config and policy (which may fall back to dense: the row's note says so). With
    ``given_mask`` each backend is also timed on a precomputed random mask of that
    fraction (attention alone). Unavailable backends are skipped with a note.
    """
    device = torch.device(device)
    timer = device_timer(device)
    rows: list[BenchRow] = []
    for shape in shapes:
        q, k, v = structured_inputs(shape, dtype=dtype, device=device)
        dense = _run_sdpa(q, k, v, shape.causal, None if device.type != "cuda" else _sdpa_variants(device)[0][1])
        sdpa_times = {}
        for name, backend in _sdpa_variants(device):
            try:
                sdpa_times[name] = timer(lambda: _run_sdpa(q, k, v, shape.causal, backend), warmup, reps)
            except RuntimeError as exc:  # e.g. cuDNN unavailable for this shape
                if progress:
                    progress(f"{shape.name}: {name} failed: {exc}")
        sdpa_ms = next(iter(sdpa_times.values()))
        for name, ms in sdpa_times.items():
            rows.append(BenchRow(shape, name, 1.0, ms, sdpa_ms, 0.0))
        inp = attention_inputs(q, k, v, is_causal=shape.causal)
        for fraction in kept:
            for backend in backends:
                reason = why_not(backend, inp)
                if reason is not None:
                    if progress:
                        progress(f"{shape.name}: skipping {backend}: {reason}")
                    continue
                if progress:
                    progress(f"{shape.name}: {backend} kept={fraction}")
                if fraction == "auto":
                    def call():
                        return sparse_attention(q, k, v, is_causal=shape.causal, return_stats=True,
                                                backend="auto" if backend == "auto" else backend)
                else:
                    def call():
                        return sparse_attention(q, k, v, is_causal=shape.causal, topk=float(fraction),
                                                simthreshd1=-1.0, min_seq_len=0, max_kept_fraction=1.0,
                                                backend=backend, return_stats=True)
                out, stats = call()
                ms = timer(call, warmup, reps)
                note = f"dense: {stats.fallback_reason}" if stats.fallback_reason else ""
                label = f"{backend}" if fraction != "auto" else f"{backend} (default policy)"
                rows.append(BenchRow(shape, label, stats.kept_fraction, ms, sdpa_ms, _rel_l1(out, dense), note))
                if given_mask and fraction != "auto":
                    mask = fixed_fraction_mask(shape, float(fraction), device)
                    out_m, stats_m = block_sparse_attention(q, k, v, mask, is_causal=shape.causal, backend=backend,
                                                            return_stats=True)
                    ms_m = timer(lambda: block_sparse_attention(q, k, v, mask, is_causal=shape.causal,
                                                                backend=backend), warmup, reps)
                    rows.append(BenchRow(shape, f"{backend} (given mask)", stats_m.kept_fraction, ms_m, sdpa_ms,
                                         float("nan"), "attention only"))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """A fixed-width table of benchmark rows."""
    header = (f"{'shape':<18} {'B':>2} {'H':>3} {'N':>6} {'D':>4} {'causal':>6}  {'method':<28} {'kept':>5} "
              f"{'ms':>9} {'TFLOP/s':>8} {'vs SDPA':>8} {'rel L1':>8}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        s = r.shape
        l1 = "-" if math.isnan(r.rel_l1) else f"{r.rel_l1:.4f}"
        lines.append(f"{s.name:<18} {s.batch:>2} {s.heads:>3} {s.seq_len:>6} {s.head_dim:>4} {str(s.causal):>6}  "
                     f"{r.method:<28} {r.kept:>5.2f} {r.ms:>9.2f} {r.tflops:>8.3f} {r.speedup:>7.2f}x {l1:>8}  {r.note}")
    return "\n".join(lines)
