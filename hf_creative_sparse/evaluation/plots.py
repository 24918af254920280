"""The figure of a Goldilocks sweep: Q(s) above its three components.

One concern: drawing, and the only module that imports matplotlib (an optional
dependency: ``pip install hf_creative_sparse[plot]``), inside the function that draws,
so the sweep itself runs without it.

Example:
    >>> from hf_creative_sparse.evaluation.sweep import load_sweep
    >>> plot_sweep(load_sweep("sweep_out/sweep.json"), "again.png")   # doctest: +SKIP
    'again.png'
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .power_laws import fitted_quality

if TYPE_CHECKING:
    from .sweep import SweepResult

#: What to install when matplotlib is missing.
PLOT_EXTRA_HINT = "pip install hf_creative_sparse[plot]"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """Raise ImportError, naming the ``[plot]`` extra, when matplotlib is missing (checked
    before a sweep generates, not after)."""
    if not matplotlib_available():
        raise ImportError(f"plotting a sweep needs matplotlib: {PLOT_EXTRA_HINT} (or pass plot=False)")


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> str:
    """Write a PNG of ``result`` to ``path`` and return the path: Q(s) (measured, fitted, s*,
    bounds, infeasible region) above the three components (measured points and fitted
    power laws). Uses matplotlib's Agg canvas directly, so it never changes the caller's
    matplotlib backend.

    Raises:
        ImportError: matplotlib is not installed (the message names the ``[plot]`` extra).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_q, ax_c = fig.subplots(2, 1, sharex=True)
    s = np.array(result.s_values)
    grid = np.linspace(max(min(s.min(), result.s_min), 1e-3), 1.0, 400)
    ax_q.plot(s, result.quality_curve, "o-", color="black", label="Q measured")
    sem = np.array([lv.quality_sem for lv in result.levels])
    if np.all(np.isfinite(sem)):
        ax_q.fill_between(s, np.array(result.quality_curve) - sem, np.array(result.quality_curve) + sem,
                          color="black", alpha=0.1, label="Q ± 1 s.e. of the mean")
    have_fit = all(k in result.fits for k in ("novelty", "diversity", "incoherence"))
    if have_fit:
        ax_q.plot(grid, fitted_quality(grid, result.fits, result.weights), "--", color="tab:purple", label="Q fitted")
    if result.bounds is not None:
        lo, hi = min(result.bounds.s_lo, 1.0), min(result.bounds.s_hi, 1.0)
        if hi > lo:
            ax_q.axvspan(lo, hi, ymin=0.94, ymax=1.0, color="tab:green", alpha=0.5,
                         label=f"Corollary-1 bracket [{result.bounds.s_lo:.3g}, {result.bounds.s_hi:.3g}]")
    for ax in (ax_q, ax_c):  # the levels whose attention would exceed the compute budget
        if result.s_min > 0:
            ax.axvspan(0, result.s_min, color="grey", alpha=0.15)
        if result.s_max < 1:
            ax.axvspan(result.s_max, 1, color="grey", alpha=0.15)
    ax_q.axvline(result.s_star, color="tab:red", label=f"s* = {result.s_star:.3f}")
    ax_q.set_ylabel("Q(s)")
    ax_q.set_title(f"{result.task_type}: Q = {result.weights.novelty:g} N + {result.weights.diversity:g} D "
                   f"- {result.weights.coherence:g} I")
    ax_q.legend(fontsize=8, loc="best")
    for key, color in (("novelty", "tab:blue"), ("diversity", "tab:orange"), ("incoherence", "tab:red")):
        ax_c.plot(s, [getattr(lv, key) for lv in result.levels], "o-", color=color, label=key)
        if key in result.fits:
            f = result.fits[key]
            ax_c.plot(grid, f(grid), "--", color=color, alpha=0.7,
                      label=f"{f.coefficient:.3g} s^{f.exponent:.3g} (R² {f.r2:.2f})")
    ax_c.axvline(result.s_star, color="tab:red")
    over = result.s_min > 0 or result.s_max < 1
    ax_c.set_xlabel("sparsity s" + (f" (grey: k_attn(s) > budget {result.compute_budget:g})" if over else ""))
    ax_c.set_ylabel("component (0..1)")
    ax_c.set_xlim(0, 1)
    ax_c.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return os.fspath(path)
