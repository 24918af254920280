"""The power laws of the Goldilocks sweep and where their Q peaks.

One concern: the mathematics of the fitted curve, with no model and no generation (the
sweep that measures the points is `sweep`; its figure is `plots`).

The paper models the components of Q = alpha N + beta D - gamma I as power laws of s:

    N(s) = a1 s^mu,    I(s) = a2 s^nu,    D(s) = a3 s^kappa.

`fit_power_law` fits each by least squares on (ln s, ln y). With
A = alpha a1 mu, B = beta a3 kappa, C = gamma a2 nu the fitted Q has

    Q'(s) = s^(nu - 1) g(s),   g(s) = A s^(mu - nu) + B s^(kappa - nu) - C.

Corollary 1 (as implemented in `corollary1_bounds`): if C > 0, A >= 0, B >= 0, A + B > 0
and nu exceeds the exponent of every positive gain term (nu > mu where A > 0, nu > kappa
where B > 0), g falls strictly from +inf to -C, so Q has exactly one stationary point s*,
its global maximum on s > 0, and

    s_NI = (A / C)^(1 / (nu - mu))          (the optimum of alpha N - gamma I alone)
    s_DI = (B / C)^(1 / (nu - kappa))       (the optimum of beta D - gamma I alone)
    s_lo = max(s_NI, s_DI)                                 (terms with A or B = 0 omitted)
    s_hi = max(m^(1/(nu - mu)) s_NI, m^(1/(nu - kappa)) s_DI),  m = number of positive terms
    s_lo <= s* <= s_hi.

Why: at s_NI the N term alone equals C, so g(s_NI) = B s_NI^(kappa - nu) >= 0 and s* >= s_NI
(likewise s_DI): each two-term optimum is a LOWER bound, because the other gain term only
pushes the balance point further out. At s_hi each positive term is at most C / m, so
g(s_hi) <= 0 and s* <= s_hi. With one gain term (m = 1) the bracket closes: s* = s_NI.
s* itself is the root of g on [s_lo, s_hi] (scipy's ``brentq``, in log s). The bounds may
exceed 1 (the dial's range); the sweep then keeps s* inside its feasible range.

Example:
    >>> fit = fit_power_law([0.2, 0.4, 0.8], [0.3 * x ** 1.5 for x in (0.2, 0.4, 0.8)])
    >>> round(fit.coefficient, 6), round(fit.exponent, 6)
    (0.3, 1.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .quality import QualityWeights


@dataclass(frozen=True)
class PowerLawFit:
    """y = coefficient * s^exponent, fitted on ``n_points`` levels; ``r2`` in log space."""

    coefficient: float
    exponent: float
    r2: float
    n_points: int

    def __call__(self, s: Any) -> Any:
        return self.coefficient * np.power(s, self.exponent)

    def to_dict(self) -> dict[str, float]:
        return {"coefficient": self.coefficient, "exponent": self.exponent, "r2": self.r2, "n_points": self.n_points}


def fit_power_law(s: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of ln y = ln a + b ln s over the points with s > 0 and y > 0.

    Raises ValueError with fewer than two such points at distinct s.

    Example:
        >>> fit = fit_power_law([0.2, 0.4, 0.8], [0.3 * x ** 1.5 for x in (0.2, 0.4, 0.8)])
        >>> round(fit.coefficient, 6), round(fit.exponent, 6)
        (0.3, 1.5)
    """
    s_arr, y_arr = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if s_arr.shape != y_arr.shape or s_arr.ndim != 1:
        raise ValueError(f"s and y must be 1-D of equal length, got shapes {s_arr.shape} and {y_arr.shape}")
    keep = np.isfinite(s_arr) & np.isfinite(y_arr) & (s_arr > 0) & (y_arr > 0)
    x, z = np.log(s_arr[keep]), np.log(y_arr[keep])
    if len(np.unique(x)) < 2:
        raise ValueError("fit_power_law needs at least two points with s > 0 and y > 0 at distinct s")
    slope, intercept = np.polyfit(x, z, 1)
    residual = z - (intercept + slope * x)
    total = float(((z - z.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return PowerLawFit(float(math.exp(intercept)), float(slope), r2, int(keep.sum()))


@dataclass(frozen=True)
class OptimumBounds:
    """Corollary 1: s_lo <= s* <= s_hi for the fitted Q (module docstring for the formulas).

    ``s_ni`` / ``s_di`` are the two-term optima (None when that gain term is absent).
    """

    s_lo: float
    s_hi: float
    s_star: float
    s_ni: float | None
    s_di: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"s_lo": self.s_lo, "s_hi": self.s_hi, "s_star": self.s_star, "s_ni": self.s_ni, "s_di": self.s_di}


def corollary1_bounds(novelty: PowerLawFit, diversity: PowerLawFit, incoherence: PowerLawFit,
                      weights: Any = None) -> tuple[OptimumBounds | None, str]:
    """Bracket and locate the interior optimum of the fitted Q (module docstring).

    Returns ``(bounds, "")`` when Corollary 1 applies, else ``(None, reason)``.

    Example:
        >>> n, d, i = PowerLawFit(1, 0.5, 1, 3), PowerLawFit(1, 1.0, 1, 3), PowerLawFit(1, 2.0, 1, 3)
        >>> b, _ = corollary1_bounds(n, d, i, (1, 0, 1))     # N vs I only: s* = (0.5/2)^(1/1.5)
        >>> round(b.s_star, 6) == round(0.25 ** (1 / 1.5), 6) == round(b.s_lo, 6) == round(b.s_hi, 6)
        True
    """
    w = QualityWeights.coerce(weights)
    a = w.novelty * novelty.coefficient * novelty.exponent
    b = w.diversity * diversity.coefficient * diversity.exponent
    c = w.coherence * incoherence.coefficient * incoherence.exponent
    nu = incoherence.exponent
    if not c > 0:
        return None, "no interior optimum: gamma * a2 * nu <= 0 (incoherence does not grow with s)"
    if a < 0 or b < 0:
        return None, "Corollary 1 needs non-negative gains: alpha*a1*mu and beta*a3*kappa >= 0"
    terms = [(x, nu - e) for x, e in ((a, novelty.exponent), (b, diversity.exponent)) if x > 0]
    if not terms:
        return None, "no interior optimum: neither novelty nor diversity grows with s"
    if any(p <= 0 for _, p in terms):
        return None, "no interior optimum: nu must exceed the exponents of the growing gain terms"
    m = len(terms)
    roots = [(x / c) ** (1.0 / p) for x, p in terms]
    s_lo = max(roots)
    s_hi = max(m ** (1.0 / p) * r for (_, p), r in zip(terms, roots))

    def g(s: float) -> float:
        return sum(x * s ** (-p) for x, p in terms) - c

    s_star = s_lo
    if m > 1 and g(s_lo) > 0 > g(s_hi):  # g is strictly decreasing: one root, found in log space
        from scipy.optimize import brentq

        s_star = math.exp(brentq(lambda x: g(math.exp(x)), math.log(s_lo), math.log(s_hi), xtol=1e-15))
    elif m > 1 and g(s_hi) == 0:
        s_star = s_hi
    s_ni = (a / c) ** (1.0 / (nu - novelty.exponent)) if a > 0 else None
    s_di = (b / c) ** (1.0 / (nu - diversity.exponent)) if b > 0 else None
    return OptimumBounds(s_lo, s_hi, s_star, s_ni, s_di), ""


def fitted_quality(s: Any, fits: dict[str, PowerLawFit], weights: Any = None) -> Any:
    """alpha a1 s^mu + beta a3 s^kappa - gamma a2 s^nu from the three fits."""
    w = QualityWeights.coerce(weights)
    return (w.novelty * fits["novelty"](s) + w.diversity * fits["diversity"](s)
            - w.coherence * fits["incoherence"](s))


def argmax_on(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """Maximiser of a smooth f on [lo, hi]: a 2001-point grid (so the global peak is
    bracketed), then scipy's bounded scalar minimisation of -f between the grid neighbours
    of the best point."""
    from scipy.optimize import minimize_scalar

    if hi <= lo:
        return lo
    grid = np.linspace(lo, hi, 2001)
    k = int(np.nanargmax(f(grid)))
    a, b = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    res = minimize_scalar(lambda x: -float(f(np.array([x]))[0]), bounds=(a, b), method="bounded",
                          options={"xatol": 1e-12 * max(1.0, abs(b))})
    best = float(res.x)
    # the bounded method never returns an end point: keep the grid's best where it is higher
    return best if f(np.array([best]))[0] >= f(np.array([grid[k]]))[0] else float(grid[k])
