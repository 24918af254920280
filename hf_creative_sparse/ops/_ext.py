"""Loading the compiled extensions: the ahead-of-time build if installed, else a JIT build
on first use through `torch.utils.cpp_extension.load` (ninja, cached in the torch
extensions dir). A missing compiler or a failed build gives one warning naming the cause;
callers then report that cause as the backend's unavailable reason.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType

from . import _ext_sources


@dataclass
class ExtensionStatus:
    """A loaded module, or the reason it could not be loaded."""

    module: ModuleType | None = None
    error: str | None = None


_CACHE: dict[str, ExtensionStatus] = {}
_LOCK = threading.Lock()


def _needs_build(name: str, sources: list[str]) -> bool:
    """Whether the cached build of ``name`` is missing or older than its sources (so the
    build notice is printed only when something is compiled)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lib = os.path.join(_get_build_directory(name, False), name + ".so")
        folders = {os.path.dirname(src) for src in sources}
        headers = [os.path.join(f, h) for f in folders for h in os.listdir(f) if h.endswith((".h", ".cuh"))]
        inputs = list(sources) + headers
        return not os.path.exists(lib) or os.path.getmtime(lib) < max(os.path.getmtime(src) for src in inputs)
    except Exception:  # private torch helper moved: err on the side of the notice
        return True


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    spec = _ext_sources.cpu_spec() if kind == "cpu" else _ext_sources.cuda_spec()
    if spec is None:
        raise RuntimeError(f"no {kind} kernel sources found (csrc/{kind}/ is missing from this install)")
    if kind == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}); install g++ "
                           "or set CXX")
    name = f"hf_creative_sparse_{kind}_v1"
    if _needs_build(name, spec["sources"]):
        print(f"hf_creative_sparse: building the {kind} kernels (first use only; cached afterwards)...",
              file=sys.stderr, flush=True)
    kwargs = dict(name=name, sources=spec["sources"], extra_cflags=spec["cflags"], verbose=False)
    if kind == "cpu":
        kwargs["extra_ldflags"] = spec["ldflags"]
    else:
        kwargs["extra_cuda_cflags"] = spec["cuda_cflags"]
        kwargs["extra_include_paths"] = spec["include_dirs"]
    return cpp_extension.load(**kwargs)


def load_extension(kind: str) -> ExtensionStatus:
    """The ``cpu`` or ``cuda`` extension, built on first use; never raises.

    ``HCS_DISABLE_EXT=1`` (or ``=cpu`` / ``=cuda``) turns the compiled kernels off.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _LOCK:
        if kind in _CACHE:
            return _CACHE[kind]
        disabled = os.environ.get("HCS_DISABLE_EXT", "")
        if disabled in ("1", kind):
            status = ExtensionStatus(error=f"disabled by HCS_DISABLE_EXT={disabled}")
        else:
            try:
                status = ExtensionStatus(module=importlib.import_module(f"hf_creative_sparse._C_{kind}"))
            except ImportError:
                try:
                    status = ExtensionStatus(module=_jit_build(kind))
                except Exception as exc:  # compiler missing, build error, ...
                    reason = f"building the {kind} extension failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
                    warnings.warn(f"hf_creative_sparse: {reason}; falling back to the reference backend",
                                  RuntimeWarning, stacklevel=2)
                    status = ExtensionStatus(error=reason)
        _CACHE[kind] = status
        return status
