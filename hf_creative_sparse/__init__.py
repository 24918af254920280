"""hf_creative_sparse: controllable sparsity for Hugging Face models.

Compiled block-sparse attention kernels swapped into diffusers and transformers models by
one call, and a two-stage "diverge, then refine" schedule driven by one sparsity dial.

Example:
    >>> import torch, hf_creative_sparse as hcs
    >>> q, k, v = (torch.randn(1, 2, 1024, 64) for _ in range(3))
    >>> out = hcs.sparse_attention(q, k, v, topk=0.25)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Imported lazily so `import hf_creative_sparse`
# stays fast and optional dependencies (diffusers, transformers, matplotlib) load on use.
_EXPORTS: dict[str, str] = {
    "SparseAttentionConfig": "config",
    "SparseStats": "config",
    "sparse_attention": "ops",
    "block_sparse_attention": "ops",
    "predict_block_mask": "ops",
    "block_mask_to_lut": "ops",
    "available_backends": "ops",
    "spas_sage2_attn_meansim_cuda": "ops",
    "spas_sage_attn_meansim_cuda": "ops",
    "block_sparse_sage2_attn_cuda": "ops",
    "entmax_attention": "ops",
    "enable_creative_sparse": "api",
    "disable_creative_sparse": "api",
    "sparsity_report": "api",
    "register_patch": "registry",
    "ModelPatch": "registry",
    "PatchOptions": "state",
    "SparsityConfig": "control",
    "SparsityController": "control",
    "TwoStageSchedule": "control",
    "CreativeSparseLogitsProcessor": "generation",
    "CreativeSparseWrapper": "generation",
    "Constraints": "constraints",
    "QualityWeights": "quality",
    "QualityFunctional": "quality",
    "compute_quality_score": "quality",
    "find_optimal_sparsity": "autotune",
    "calibrate": "calibration",
    "load_calibration": "calibration",
    "Calibration": "calibration",
    "register_diffusers_backend": "diffusers_backend", "enable_diffusers_backend": "diffusers_backend",
    "RetentionConfig": "retention",
    "DiffusionDialProcessor": "diffusion_dial",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_creative_sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# `attn_implementation="creative_sparse"` works in transformers once this package is
# imported; the hook registers it when transformers loads (nothing is imported now).
from . import _hf_hook as _hf_hook  # noqa: E402

_hf_hook.install()
