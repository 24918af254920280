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
        # The sources are C++17; torch adds its own (newer) -std for its headers.
        # -fopenmp: at::parallel_for's OpenMP pragmas are compiled into the extension.
        "cflags": ["-O3", "-fopenmp"],
        "ldflags": ["-fopenmp"],
    }


#: Default CUDA targets: Ampere SASS plus its PTX (newer GPUs JIT it), and Hopper's sm_90a.
DEFAULT_CUDA_ARCHS = ("80", "90a")


def cuda_gencode_flags(archs: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags for ``archs`` (e.g. "80;90a"; default `DEFAULT_CUDA_ARCHS`,
    overridable with ``HCS_CUDA_ARCHS``). sm_80 also embeds PTX so later GPUs can run it."""
    spec = archs if archs is not None else os.environ.get("HCS_CUDA_ARCHS", "")
    names = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()] or list(DEFAULT_CUDA_ARCHS)
    flags = []
    for arch in names:
        if not arch.rstrip("a").isdigit():
            raise ValueError(f"HCS_CUDA_ARCHS entries look like 80 or 90a, got {arch!r}")
        code = f"[sm_{arch},compute_{arch}]" if arch == "80" else f"sm_{arch}"
        flags.append(f"-gencode=arch=compute_{arch},code={code}")
    return flags


def cuda_spec(root: str | None = None) -> dict | None:
    """Sources and flags of the CUDA extension, or None when its sources are absent.

    The C++ standard is left to torch's build helpers (torch picks the one its headers need).
    """
    base = csrc_dir(root)
    sources = sorted(glob.glob(os.path.join(base, "cuda", "*.cu")) + glob.glob(os.path.join(base, "cuda", "*.cpp"))) \
        if base else []
    if not sources:
        return None
    return {
        "sources": sources,
        "include_dirs": [os.path.join(base, "cuda")],
        "cflags": ["-O3"],
        "cuda_cflags": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + cuda_gencode_flags(),
    }
