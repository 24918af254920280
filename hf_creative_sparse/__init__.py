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

from . import _import_paths

# The old module paths (deprecated) and `patches/` from a source checkout.
_import_paths.install()

__version__ = "0.1.0"

# Public name -> module that defines it. Imported lazily so `import hf_creative_sparse`
# stays fast and optional dependencies (diffusers, transformers, matplotlib) load on use.
_EXPORTS: dict[str, str] = {
    "SparseAttentionConfig": "ops.config",
    "SparseStats": "ops.config",
    "sparse_attention": "ops",
    "block_sparse_attention": "ops",
    "predict_block_mask": "ops",
    "block_mask_to_lut": "ops",
    "available_backends": "ops",
    "spas_sage2_attn_meansim_cuda": "ops",
    "spas_sage_attn_meansim_cuda": "ops",
    "block_sparse_sage2_attn_cuda": "ops",
    "entmax_attention": "ops",
    "enable_creative_sparse": "integrations.enable",
    "disable_creative_sparse": "integrations.enable",
    "sparsity_report": "integrations.enable",
    "register_patch": "integrations.registry",
    "ModelPatch": "integrations.registry",
    "PatchOptions": "integrations.state",
    "SparsityConfig": "creative.control",
    "SparsityController": "creative.control",
    "TwoStageSchedule": "creative.control",
    "CreativeSparseLogitsProcessor": "creative.processor",
    "CreativeSparseWrapper": "creative.wrapper",
    "Constraints": "creative.constraints",
    "QualityWeights": "evaluation.quality",
    "QualityFunctional": "evaluation.quality",
    "compute_quality_score": "evaluation.quality",
    "find_optimal_sparsity": "evaluation.sweep",
    "calibrate": "calibration",
    "load_calibration": "calibration",
    "Calibration": "calibration",
    "register_diffusers_backend": "integrations.diffusers_backend", "enable_diffusers_backend": "integrations.diffusers_backend",
    "RetentionConfig": "integrations.retention",
    "DiffusionDialProcessor": "creative.diffusion_dial",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _import_paths.MOVED_MODULES:  # a release-0.1 submodule: warns, then the module at its new path
        return importlib.import_module(f"{__name__}.{name}")
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
from .integrations import transformers_hook as _transformers_hook  # noqa: E402

_transformers_hook.install()
