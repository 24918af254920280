"""Import paths that no file on disk provides: ``hf_creative_sparse.patches`` from a source
checkout, and the module paths of release 0.1 (before the package was grouped by concern).

- ``patches/`` sits at the repository's top level (setup.py maps it to
  ``hf_creative_sparse.patches`` at install time), so a checkout that was not pip-installed
  needs a finder for it. It sits last on ``sys.meta_path``: an installed copy wins.
- The old flat paths (``hf_creative_sparse.generation``, ``hf_creative_sparse.config``, ...)
  keep working for one release: importing one warns (`DeprecationWarning`) and returns the
  module at its new path, the same object, so monkeypatching either name patches both.

This module imports nothing of the package (the package's ``__init__`` installs it first).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings
from typing import Any

PACKAGE = "hf_creative_sparse"
PATCHES = f"{PACKAGE}.patches"

#: Release-0.1 module path (below the package) -> its path now. Removed in release 0.3.
MOVED_MODULES: dict[str, str] = {
    "config": "ops.config",
    "ops.backend_cpu": "ops.backends.cpu",
    "ops.backend_cuda": "ops.backends.cuda",
    "ops.backend_flex": "ops.backends.flex",
    "ops.backend_reference": "ops.backends.reference",
    "registry": "integrations.registry",
    "state": "integrations.state",
    "api": "integrations.enable",
    "_hf_hook": "integrations.transformers_hook",
    "diffusers_backend": "integrations.diffusers_backend",
    "retention": "integrations.retention",
    "calibration_search": "calibration.search",
    "control": "creative.control",
    "generation": "creative.generation",
    "constraints": "creative.constraints",
    "moe": "creative.moe",
    "model_cache": "creative.model_cache",
    "diffusion_dial": "creative.diffusion_dial",
    "quality": "evaluation.quality",
    "autotune": "evaluation.sweep",
    "bench": "evaluation.attention_benchmark",
    "commands": "cli",
    "commands._args": "cli._args",
    "commands.bench": "cli.bench",
    "commands.calibrate": "cli.calibrate",
    "commands.demo": "cli.demo",
    "commands.demo_text": "cli.demo_text",
    "commands.score": "cli.score",
    "commands.sweep": "cli.sweep",
}


def checkout_root() -> str:
    """The folder that holds the package folder (a source checkout's root)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PatchesInSourceCheckout(importlib.abc.MetaPathFinder):
    """Finds ``hf_creative_sparse.patches`` in a checkout's top-level ``patches/``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != PATCHES:
            return None
        folder = os.path.join(checkout_root(), "patches")
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


class _MovedModuleLoader(importlib.abc.Loader):
    """Returns the module at its new path; restores that module's own spec, which the import
    system overwrites with the alias's."""

    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(self.new_name)

    def exec_module(self, module: Any) -> None:
        module.__spec__ = importlib.util.find_spec(self.new_name) if module.__spec__.name != self.new_name \
            else module.__spec__


class _MovedModules(importlib.abc.MetaPathFinder):
    """Resolves the release-0.1 module paths in `MOVED_MODULES`, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(PACKAGE + "."):
            return None
        old = fullname[len(PACKAGE) + 1:]
        new = MOVED_MODULES.get(old)
        if new is None:
            return None
        new_name = f"{PACKAGE}.{new}"
        warnings.warn(f"{fullname} is deprecated and will be removed in release 0.3; import {new_name} instead",
                      DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    """Put both finders on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
    if not any(isinstance(f, _PatchesInSourceCheckout) for f in sys.meta_path):
        sys.meta_path.append(_PatchesInSourceCheckout())
