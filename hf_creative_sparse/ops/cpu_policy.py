"""When block sparsity pays on a CPU: the ``backend="auto"`` policy of `sparse_attention`
on CPU tensors, from rates measured on this machine (mirrors ops/gpu_policy.py).

The CPU the package lands on decides which kernel instance runs (AVX-512, AVX2 or the
baseline, csrc/cpu) and how fast dense SDPA is next to it: on a 2-core AVX2 EPYC the AVX2
instance once ran at 0.67x of SDPA per block (issue 18) while on an AVX-512 Xeon it runs
at ~1.1x. A fixed constant cannot be right on both, so the first call measures:

* dense SDPA, the compiled kernel over every block (per kept block) and the mask
  prediction, on B1 H2 N1024 D64 float32, in interleaved rounds (~50 ms of CPU time), in one
  thread's CPU time (`time.thread_time`): other processes on the machine then slow
  nothing down, and the sparse/dense ratio is what the decisions use (both parallelise
  alike over (batch, head, query block));
* the sparse path's fixed cost (block lists, checks, output) from an all-skipped mask.

The rates are cached in ``cpu_policy_rates.json`` beside the built extension, keyed by
CPU model, ISA flags, kernel instance, torch version and the extension's build, so each
machine measures once. ``HCS_CPU_POLICY_CACHE`` names another file (``""`` keeps the
rates in memory only).

Decisions (times in one-thread CPU seconds):

* `skip_prediction_reason_cpu`: predicting a mask must cost at most
  ``PREDICTION_BUDGET`` of dense attention, so a call that predicts and then falls back
  to dense stays within 1/0.96 of SDPA.
* `max_useful_kept_fraction_cpu`: run sparse only below the break-even kept fraction
  ``MARGIN * (sparse_rate / dense_rate) * (1 - overhead / dense_time)``; ``MARGIN``
  leaves room for the rates' measurement noise, so a call judged near break-even runs
  dense (at worst the prediction's 4% slower) rather than sparse and slower.

Example:
    >>> import torch
    >>> from hf_creative_sparse.ops.inputs import attention_inputs
    >>> from hf_creative_sparse.ops.cpu_policy import max_useful_kept_fraction_cpu
    >>> q = torch.randn(1, 8, 4096, 64)
    >>> 0.0 <= max_useful_kept_fraction_cpu(attention_inputs(q, q, q)) <= 1.0
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from ._ext import load_extension
from .inputs import AttentionInputs

#: Shape of the micro-benchmark (B, H, N, D): long enough that SDPA and the kernel run at
#: their long-sequence rates, short enough that a round of the three takes ~25 ms.
BENCH_SHAPE = (1, 2, 1024, 64)
#: Interleaved rounds of (dense, sparse, prediction); the median of each is kept.
BENCH_ROUNDS = 3
#: Prediction may cost at most this fraction of dense attention (see the module doc).
PREDICTION_BUDGET = 0.04
#: Safety factor on the measured sparse/dense rate ratio (rates re-measured under load
#: scatter by a few percent).
MARGIN = 0.92
#: Version of the cached record's layout; bump when the measurement changes.
CACHE_VERSION = 1


@dataclass(frozen=True)
class CpuRates:
    """Rates of one machine, kernel instance and torch build (one thread, CPU time).

    Attributes:
        isa: the kernel instance that runs (``"avx512"``, ``"avx2"``, ``"generic"``).
        dense_flops: dense SDPA, FLOP/s (4*B*H*Nq*Nk*D per second; causal counts half).
        sparse_flops: the compiled kernel per kept block, dense-equivalent FLOP/s.
        predict_s_per_element: mask prediction, seconds per element of q and k.
        overhead_s: the sparse path's fixed cost per call, seconds.
    """

    isa: str
    dense_flops: float
    sparse_flops: float
    predict_s_per_element: float
    overhead_s: float

    def __post_init__(self) -> None:
        for name in ("dense_flops", "sparse_flops", "predict_s_per_element", "overhead_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CpuRates.{name} must be a finite number >= 0, got {value!r}")
        if self.dense_flops <= 0 or self.sparse_flops <= 0:
            raise ValueError("CpuRates.dense_flops and sparse_flops must be > 0")


_LOCK = threading.Lock()
_MEMO: dict[str, CpuRates] = {}


def _cpu_identity() -> str:
    """CPU model and ISA flags (the flags decide the instance and MKL's code paths)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} flags:{hashlib.sha1(flags.encode()).hexdigest()[:12]}"


def cache_key(isa: str) -> str:
    """The record's key: machine, kernel instance, torch version, extension build."""
    module = load_extension("cpu").module
    build = ""
    if module is not None and getattr(module, "__file__", None):
        build = str(int(os.path.getmtime(module.__file__)))
    return f"v{CACHE_VERSION}|{_cpu_identity()}|isa {isa}|torch {torch.__version__}|build {build}"


def cache_path() -> str | None:
    """The rates file: ``HCS_CPU_POLICY_CACHE`` if set (empty: none), else beside the
    built extension; None without a file."""
    env = os.environ.get("HCS_CPU_POLICY_CACHE")
    if env is not None:
        return env or None
    module = load_extension("cpu").module
    if module is None or not getattr(module, "__file__", None):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "cpu_policy_rates.json")


def _read_cache(path: str | None) -> dict:
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written by another process: measure again


def _write_cache(path: str | None, key: str, rates: CpuRates) -> None:
    if path is None:
        return
    data = _read_cache(path)
    data[key] = asdict(rates)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError:
        pass  # read-only install: the rates stay in memory for this process


def _median_times(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median one-thread CPU seconds of each fn, interleaved round by round after a warm-up."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def measure_rates(shape: tuple[int, int, int, int] = BENCH_SHAPE, rounds: int = BENCH_ROUNDS) -> CpuRates:
    """Measure this machine's rates now (about 50 ms of CPU time; see the module doc).

    torch's intra-op thread count is set to 1 for the measurement and restored after it
    (it is process-wide: ops other threads launch meanwhile run single-threaded).

    Raises:
        RuntimeError: the compiled cpu kernel is unavailable.
    """
    from .backends.cpu import BACKEND
    from .inputs import attention_inputs
    from .masks import predict_from_inputs

    module = load_extension("cpu").module
    if module is None:
        raise RuntimeError(f"the cpu kernel is unavailable: {load_extension('cpu').error}")
    b, h, n, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device="cpu", dtype=torch.float32) for _ in range(3))
    inp = attention_inputs(q, k, v)
    full = torch.ones(b, h, inp.num_q_blocks, inp.num_k_blocks, dtype=torch.bool, device="cpu")
    pv = torch.full((h,), math.inf, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: CPU time is then this thread's time alone
    try:
        with torch.no_grad():
            t = _median_times({
                "dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                "sparse": lambda: BACKEND.run(inp, full, pv),
                "empty": lambda: BACKEND.run(inp, ~full, pv),
                "predict": lambda: predict_from_inputs(inp),
            }, rounds)
    finally:
        torch.set_num_threads(threads)
    flops = 4.0 * b * h * n * n * d
    overhead = t["empty"]
    return CpuRates(isa=module.selected_isa(), dense_flops=flops / t["dense"],
                    sparse_flops=flops / max(t["sparse"] - overhead, 1e-9),
                    predict_s_per_element=t["predict"] / (2 * b * h * n * d), overhead_s=overhead)


def cpu_rates(refresh: bool = False) -> CpuRates | None:
    """This machine's rates for the instance that will run: from memory, the cache file,
    or measured now (then cached). None when the compiled cpu kernel is unavailable.
    ``refresh=True`` measures again and overwrites the cached record."""
    module = load_extension("cpu").module
    if module is None:
        return None
    isa = module.selected_isa()
    with _LOCK:
        if not refresh and isa in _MEMO:
            return _MEMO[isa]
        key, path = cache_key(isa), cache_path()
        record = None if refresh else _read_cache(path).get(key)
        rates = None
        if isinstance(record, dict):
            try:
                rates = CpuRates(**record)
            except (TypeError, ValueError):
                rates = None  # a record of another layout: measure again
        if rates is None:
            rates = measure_rates()
            _write_cache(path, key, rates)
        _MEMO[isa] = rates
        return rates


def _flops(inp: AttentionInputs) -> float:
    flops = 4.0 * inp.batch * inp.heads_q * inp.len_q * inp.len_k * inp.head_dim
    return flops * 0.5 if inp.is_causal else flops


def dense_seconds_cpu(inp: AttentionInputs, rates: CpuRates) -> float:
    """Estimated dense SDPA time of ``inp`` (one-thread CPU seconds)."""
    return _flops(inp) / rates.dense_flops


def sparse_seconds_cpu(inp: AttentionInputs, kept: float, rates: CpuRates) -> float:
    """Estimated time of the compiled kernel at kept fraction ``kept`` (prediction excluded)."""
    return rates.overhead_s + kept * _flops(inp) / rates.sparse_flops


def prediction_seconds_cpu(inp: AttentionInputs, rates: CpuRates) -> float:
    """Estimated time of the mask prediction of ``inp`` (pooling q and k dominates)."""
    elements = inp.batch * (inp.heads_q * inp.len_q + inp.heads_kv * inp.len_k) * inp.head_dim
    return elements * rates.predict_s_per_element


def max_useful_kept_fraction_cpu(inp: AttentionInputs) -> float:
    """The kept fraction above which the compiled cpu kernel is not clearly faster than
    dense SDPA on this machine (0.0 when the kernel is unavailable: the reference backend
    is always slower than SDPA)."""
    rates = cpu_rates()
    if rates is None:
        return 0.0
    dense = dense_seconds_cpu(inp, rates)
    fraction = MARGIN * (rates.sparse_flops / rates.dense_flops) * (1.0 - rates.overhead_s / dense)
    return min(1.0, max(0.0, fraction))


def skip_prediction_reason_cpu(inp: AttentionInputs, mask_uses: int = 1) -> str | None:
    """Why a CPU call should run dense SDPA without predicting a mask, or None.

    ``mask_uses``: how many calls the predicted mask serves (its cost is shared).
    """
    if not isinstance(mask_uses, int) or mask_uses < 1:
        raise ValueError(f"mask_uses must be an int >= 1, got {mask_uses!r}")
    rates = cpu_rates()
    if rates is None:
        return (f"sparsity cannot pay on the CPU: the compiled cpu kernel is unavailable "
                f"({load_extension('cpu').error}) and the reference backend is slower than dense SDPA")
    dense = dense_seconds_cpu(inp, rates)
    predict = prediction_seconds_cpu(inp, rates) / mask_uses
    if predict > PREDICTION_BUDGET * dense:
        return (f"sparsity cannot pay on the CPU: predicting the mask (~{predict * 1e3:.2f} ms per use) would cost "
                f"more than {PREDICTION_BUDGET:.0%} of dense attention (~{dense * 1e3:.2f} ms, one-thread CPU time, "
                f"{rates.isa} kernel)")
    limit = max_useful_kept_fraction_cpu(inp)
    if limit <= 0.0:
        return (f"sparsity cannot pay on the CPU: the {rates.isa} kernel's fixed cost exceeds dense attention "
                f"(~{dense * 1e3:.2f} ms)")
    return None


def explicit_budget_reason_cpu(inp: AttentionInputs, budget: float, mask_uses: int = 1) -> str | None:
    """Why an explicit top-k ``budget`` (mean kept fraction) cannot pay on the CPU, or None
    (as `gpu_policy.explicit_budget_reason`): judged by what it will cost, prediction
    included, against dense, with the ``MARGIN`` on the kernel's rate."""
    if not isinstance(mask_uses, int) or mask_uses < 1:
        raise ValueError(f"mask_uses must be an int >= 1, got {mask_uses!r}")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a kept fraction in [0, 1], got {budget!r}")
    rates = cpu_rates()
    if rates is None:
        return skip_prediction_reason_cpu(inp, mask_uses)
    dense = dense_seconds_cpu(inp, rates)
    sparse = (prediction_seconds_cpu(inp, rates) / mask_uses + rates.overhead_s
              + budget * _flops(inp) / (MARGIN * rates.sparse_flops))
    if sparse >= dense:
        return (f"sparsity cannot pay on the CPU: top-k {budget:.3f} would take ~{sparse * 1e3:.2f} ms with its "
                f"prediction against ~{dense * 1e3:.2f} ms dense (one-thread CPU time, {rates.isa} kernel)")
    return None


__all__ = ["CpuRates", "cache_path", "cpu_rates", "dense_seconds_cpu", "explicit_budget_reason_cpu",
           "max_useful_kept_fraction_cpu",
           "measure_rates", "prediction_seconds_cpu", "skip_prediction_reason_cpu", "sparse_seconds_cpu"]
