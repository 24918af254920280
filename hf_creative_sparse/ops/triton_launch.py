"""Issue a Triton kernel through its compiled launcher instead of the JIT's per-call dispatch.

Why: a decode step is four small kernels, and ``kernel[grid](...)`` spends ~28 us of host
time per launch binding and specializing every argument (H200, Triton 3.6, measured by
`benchmarks/gpu_decode.py`), more than the GPU spends on three of the four kernels; at 32k
keys the step is host-bound. The first call with a given specialization goes through the JIT
(which compiles or finds the kernel) and keeps the compiled kernel; later calls with the
same specialization launch it directly.

The key mirrors what Triton specializes on: the launch options and constexpr values, each
tensor's dtype and 16-byte alignment, each int's equality to 1, divisibility by 16 and
32-bit range (kept for ``do_not_specialize`` ints too: a finer key only costs an extra
JIT call). The direct path is off under ``TRITON_INTERPRET=1``, when the environment sets
``HCS_TRITON_DIRECT_LAUNCH=0``, while Triton launch hooks are installed (profilers such as
proton see the JIT path), and for Triton versions whose compiled kernels lack the launcher
fields; the JIT path is always correct.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # optional: CPU-only installs have no triton
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def direct_launch_enabled() -> bool:
    """Whether `DirectLauncher` may skip the JIT (see the module docstring)."""
    return (triton is not None and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("HCS_TRITON_DIRECT_LAUNCH", "1") != "0")


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg)
    return arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31)


def _hooks_installed() -> bool:
    hook = getattr(getattr(triton, "knobs", None), "runtime", None)
    hook = getattr(hook, "launch_enter_hook", None)
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectLauncher:
    """A ``@triton.jit`` kernel launched as ``launcher(grid, *args, **constexprs_and_options)``,
    exactly as ``kernel[grid](*args, **meta)``, with the JIT's dispatch skipped once a call of
    the same specialization has compiled it. Positional ``args`` must be the kernel's leading
    runtime parameters; constexprs and launch options go by keyword.

    Example (on a CUDA machine):
        >>> launch = DirectLauncher(my_kernel)  # doctest: +SKIP
        >>> launch((n_programs,), x, y, n, BLOCK=128, num_warps=4)  # doctest: +SKIP
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, tuple[Any, tuple[str, ...]]] = {}
        self.direct_launches = 0

    def __call__(self, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        if not direct_launch_enabled():
            self.kernel[grid](*args, **meta)
            return
        key = (len(args), tuple(meta.items()), tuple(map(_arg_key, args)))
        entry = self._compiled.get(key)
        if entry is None or _hooks_installed():
            compiled = self.kernel[grid](*args, **meta)
            tail = tuple(self.kernel.arg_names[len(args):])
            if entry is None and all(name in meta for name in tail) \
                    and all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
                self._compiled[key] = (compiled, tail)
            return
        compiled, tail = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(driver.get_current_device())
        # the launcher takes every parameter in signature order (it skips the constexprs)
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *(meta[name] for name in tail))
        self.direct_launches += 1
