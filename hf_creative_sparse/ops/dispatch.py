"""Backend dispatch in the manner of xformers' fmha: every backend says whether it is
available and whether it supports given inputs, and if not, why. A backend may also
define ``auto_skip_reason(inp, pvthreshd)``: inputs it can run but that ``auto`` should
give to the next backend (measured slower there).

Backends live in ``ops/backend_<name>.py`` modules that define ``BACKEND``; this module
discovers them, so adding a backend touches no other file. ``auto`` picks the first
backend in `AUTO_ORDER` that is available and supports the inputs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .inputs import AttentionInputs

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "flex", "sdpa")
#: Preference of ``backend="auto"`` (the fastest first; each backend refuses what it can't do).
AUTO_ORDER = ("cuda", "flex", "cpu", "reference")


@dataclass
class BackendResult:
    """Output of a sparse backend: out [B, Hq, Nq, D] (HND, q's dtype), stage-2 counts and
    the per-row log-sum-exp (float32 [B, Hq, Nq], natural log, -inf for rows that used no
    key; docs/DESIGN.md "Partial softmax"), None from a backend that cannot give it.
    ``pv_counts`` (int64 [2] on the device: skipped, visited) replaces the two ints where
    reading them would wait for the kernel; `pv_skipped_fraction` reads whichever is set."""

    out: torch.Tensor
    pv_skipped: int = 0
    pv_visited: int = 0
    lse: torch.Tensor | None = None
    pv_counts: torch.Tensor | None = None

    def pv_skipped_fraction(self) -> float | torch.Tensor:
        """Skipped over visited (row, block) pairs: a float, or a 0-d device tensor when the
        counts are still on the device (read when someone looks: no wait here)."""
        if self.pv_counts is not None:
            return self.pv_counts[0].double() / self.pv_counts[1].clamp(min=1).double()
        return self.pv_skipped / self.pv_visited if self.pv_visited else 0.0


class SparseBackend(Protocol):
    """What a block-sparse attention backend provides."""

    name: str

    def unavailable_reason(self) -> str | None:
        """None when the backend can run on this machine, else why not."""

    def unsupported_reason(self, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> str | None:
        """None when the backend supports these inputs (and per-head ``pvthreshd``, float32
        [Hq], when given), else why not."""

    def run(self, inp: AttentionInputs, block_mask: torch.Tensor, pvthreshd: torch.Tensor) -> BackendResult:
        """Attention over the kept blocks of ``block_mask`` (bool [B, Hq, Mq, Mk], already
        restricted to attendable blocks) with per-head ``pvthreshd`` (float32 [Hq])."""


@dataclass
class _Registry:
    backends: dict[str, SparseBackend] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    loaded: bool = False


_REGISTRY = _Registry()


def register_backend(backend: SparseBackend) -> None:
    """Add or replace a backend under ``backend.name``; a new name becomes valid for
    ``backend=`` everywhere (`backend_names`). ``auto`` keeps its own order (`AUTO_ORDER`):
    a new backend runs when asked for by name.

    Raises:
        TypeError: the object lacks the `SparseBackend` methods or a str ``name``.
        ValueError: the name is "auto" or "sdpa" (policy words, not backends).
    """
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend.name must be a non-empty str, got {name!r}")
    missing = [m for m in ("unavailable_reason", "unsupported_reason", "run") if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(f"backend {name!r} lacks the SparseBackend method(s) {missing}")
    if name in ("auto", "sdpa"):
        raise ValueError(f"backend name {name!r} is reserved for the dispatch policy")
    _REGISTRY.backends[name] = backend


def backend_names() -> tuple[str, ...]:
    """Every valid ``backend=`` value: the built-in names and any registered since."""
    _load()
    return BACKEND_NAMES + tuple(n for n in _REGISTRY.backends if n not in BACKEND_NAMES)


def _load() -> None:
    if _REGISTRY.loaded:
        return
    _REGISTRY.loaded = True
    for name in AUTO_ORDER:
        module_name = f"{__package__}.backend_{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                _REGISTRY.load_errors[name] = f"importing {module_name} failed: {exc}"
            else:
                _REGISTRY.load_errors[name] = f"this build has no {name} backend"
            continue
        except Exception as exc:  # a broken backend must not break the others
            _REGISTRY.load_errors[name] = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
            continue
        register_backend(module.BACKEND)


def get_backend(name: str) -> SparseBackend | None:
    _load()
    return _REGISTRY.backends.get(name)


def why_not(name: str, inp: AttentionInputs | None = None, pvthreshd: torch.Tensor | None = None) -> str | None:
    """None when backend ``name`` can run ``inp`` (or is available, without inputs), else why not."""
    _load()
    backend = _REGISTRY.backends.get(name)
    if backend is None:
        return _REGISTRY.load_errors.get(name, f"unknown backend {name!r}")
    reason = backend.unavailable_reason()
    if reason is None and inp is not None:
        reason = backend.unsupported_reason(inp, pvthreshd)
    return reason


def available_backends() -> dict[str, str | None]:
    """Each sparse backend and why it is unavailable (None = available)."""
    return {name: why_not(name) for name in AUTO_ORDER}


def choose_backend(name: str, inp: AttentionInputs, pvthreshd: torch.Tensor | None = None) -> SparseBackend:
    """The backend to run ``inp`` on: ``name`` itself, or the first capable one for "auto".

    Raises:
        ValueError: unknown name.
        RuntimeError: the named backend cannot run these inputs (with the reason).
    """
    names = backend_names()
    if name not in names or name == "sdpa":
        raise ValueError(f"backend must be one of {tuple(n for n in names if n != 'sdpa')} for sparse attention, "
                         f"got {name!r}")
    if name != "auto":
        reason = why_not(name, inp, pvthreshd)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run this call: {reason}")
        return _REGISTRY.backends[name]
    reasons = []
    for candidate in AUTO_ORDER:
        reason = why_not(candidate, inp, pvthreshd)
        backend = _REGISTRY.backends.get(candidate)
        if reason is None and hasattr(backend, "auto_skip_reason"):
            reason = backend.auto_skip_reason(inp, pvthreshd)  # capable, but measured slower than the next
        if reason is None:
            return _REGISTRY.backends[candidate]
        reasons.append(f"{candidate}: {reason}")
    raise RuntimeError("no backend can run this call: " + "; ".join(reasons))
