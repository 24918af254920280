"""Where the compiled kernels' sources live and how they are compiled.

Plain module without a torch import, so setup.py can read it before torch's build
helpers load. Used by `_ext.py` (JIT on first use) and setup.py (HCS_BUILD_EXT=1).
"""

from __future__ import annotations

import glob
import os


def csrc_dir(root: str | None = None) -> str | None:
    """The csrc folder: the repo's top-level one (editable/dev) or the installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(root, "csrc")] if root else []
    candidates += [os.path.join(here, "..", "..", "csrc"), os.path.join(here, "..", "csrc")]
    for path in candidates:
        if os.path.isdir(os.path.join(path, "cpu")) or os.path.isdir(os.path.join(path, "cuda")):
            return os.path.normpath(path)
    return None


def cpu_spec(root: str | None = None) -> dict | None:
    """Sources and flags of the CPU extension, or None when its sources are absent."""
    base = csrc_dir(root)
    sources = sorted(glob.glob(os.path.join(base, "cpu", "*.cpp"))) if base else []
    if not sources:
        return None
    return {
        "sources": sources,
        # no -ffast-math: the kernel's exp2 relies on exact rounding tricks and IEEE inf/NaN;
        # its AVX2/AVX-512 instances are compiled per function (target pragmas) and picked at
        # run time, so the build needs no -march flag and the binary runs on any x86-64.
        "cflags": ["-O3", "-std=c++17", "-fopenmp"],
        "ldflags": ["-fopenmp"],
    }


def cuda_spec(root: str | None = None) -> dict | None:
    """Sources and flags of the CUDA extension, or None when its sources are absent."""
    base = csrc_dir(root)
    sources = sorted(glob.glob(os.path.join(base, "cuda", "*.cu")) + glob.glob(os.path.join(base, "cuda", "*.cpp"))) \
        if base else []
    if not sources:
        return None
    return {
        "sources": sources,
        "include_dirs": [os.path.join(base, "cuda")],
        "cflags": ["-O3", "-std=c++17"],
        "cuda_cflags": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                        "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90a,code=sm_90a"],
    }
