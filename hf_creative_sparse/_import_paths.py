"""Import paths that no file on disk provides: ``hf_creative_sparse.patches`` from a source
checkout, and the module paths of release 0.1 (before the package was grouped by concern).

- ``patches/`` sits at the repository's top level (setup.py maps it to
  ``hf_creative_sparse.patches`` at install time), so a checkout that was not pip-installed
  needs a finder for it. It sits last on ``sys.meta_path``: an installed copy wins.
- The old flat paths (``hf_creative_sparse.generation``, ``hf_creative_sparse.config``, ...)
  keep working for one release: importing one warns (`DeprecationWarning`). An old module
  that now lives in one module is that module, the same object, so monkeypatching either
  name patches both. An old module whose names were split over several modules
  (``generation``: `creative.processor`, `creative.wrapper`, `creative.models`) is an alias:
  a new module object whose attributes are looked up in those modules, the first that has
  the name (setting an attribute on the alias patches nothing: patch the new module).

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

#: Release-0.1 module path (below the package) -> its path now, or the paths its names were
#: split over (looked up in this order). Removed in release 0.3.
MOVED_MODULES: dict[str, str | tuple[str, ...]] = {
    "config": "ops.config",
    "ops.backend_cpu": "ops.backends.cpu",
    "ops.backend_cuda": "ops.backends.cuda",
    "ops.backend_flex": "ops.backends.flex",
    "ops.backend_reference": "ops.backends.reference",
    "registry": "integrations.registry",
    "state": "integrations.state",
    "api": "integrations.enable",
    "_hf_hook": "integrations.transformers_hook",
    "diffusers_backend": ("integrations.diffusers_backend", "integrations.context_parallel"),
    "retention": "integrations.retention",
    "calibration_search": "calibration.search",
    "control": "creative.control",
    "generation": ("creative.processor", "creative.wrapper", "creative.models"),
    "constraints": "creative.constraints",
    "moe": "creative.moe",
    "model_cache": "creative.model_cache",
    "diffusion_dial": "creative.diffusion_dial",
    "quality": ("evaluation.quality", "evaluation.lexical", "evaluation.scorers", "creative.models"),
    "autotune": ("evaluation.sweep", "evaluation.power_laws", "evaluation.plots"),
    "bench": "evaluation.attention_benchmark",
    "commands": "cli",
    "commands._args": "cli._args",
    "commands.bench": "cli.bench",
    "commands.calibrate": ("cli.calibrate", "testing"),
    "commands.demo": "cli.demo",
    "commands.demo_text": "cli.demo_text",
    "commands.score": "cli.score",
    "commands.sweep": "cli.sweep",
}


#: Public names of release-0.1 modules that no module holds any more, with what replaces
#: them (the alias's AttributeError says it). Removed in release 0.3 with the aliases.
REMOVED_NAMES: dict[str, dict[str, str]] = {
    "quality": {"MeanPoolEmbedder": "evaluation.scorers.SentenceEmbedder (sentence-transformers does the "
                                    "mean pooling; creative.models.load_minilm_embedder builds one)"},
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


class _SplitModuleLoader(importlib.abc.Loader):
    """Makes the alias of an old module whose names now live in several modules: a new module
    whose ``__getattr__`` looks each name up in those modules, in order."""

    def __init__(self, new_names: tuple[str, ...]) -> None:
        self.new_names = new_names

    def create_module(self, spec: Any) -> Any:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        targets = [importlib.import_module(name) for name in self.new_names]
        module.__doc__ = f"Deprecated alias of {', '.join(self.new_names)}."

        removed = REMOVED_NAMES.get(module.__name__[len(PACKAGE) + 1:], {})

        def __getattr__(name: str) -> Any:
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            if name in removed:
                raise AttributeError(f"{module.__name__}.{name} was removed: use {removed[name]}")
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r} (looked in "
                                 f"{', '.join(self.new_names)})")

        def __dir__() -> list[str]:
            return sorted({n for target in targets for n in dir(target) if not n.startswith("__")})

        module.__getattr__ = __getattr__
        module.__dir__ = __dir__


def new_module_names(old: str) -> tuple[str, ...]:
    """The full names of the modules that hold the names of release-0.1 module ``old``
    (a path below the package, a key of `MOVED_MODULES`)."""
    new = MOVED_MODULES[old]
    return tuple(f"{PACKAGE}.{n}" for n in ((new,) if isinstance(new, str) else new))


class _MovedModules(importlib.abc.MetaPathFinder):
    """Resolves the release-0.1 module paths in `MOVED_MODULES`, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(PACKAGE + "."):
            return None
        old = fullname[len(PACKAGE) + 1:]
        if old not in MOVED_MODULES:
            return None
        new_names = new_module_names(old)
        warnings.warn(f"{fullname} is deprecated and will be removed in release 0.3; import "
                      f"{' or '.join(new_names)} instead", DeprecationWarning, stacklevel=3)
        loader = _MovedModuleLoader(new_names[0]) if len(new_names) == 1 else _SplitModuleLoader(new_names)
        return importlib.util.spec_from_loader(fullname, loader)


def install() -> None:
    """Put both finders on ``sys.meta_path`` (idempotent): the old paths' first (it answers
    only for `MOVED_MODULES`), the patches' last (an installed copy wins)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        # first: an old path below a moved package (``commands._args``, whose parent is now
        # the cli package) would otherwise be found again by the path finder, unwarned, as a
        # second copy of the module
        sys.meta_path.insert(0, _MovedModules())
    if not any(isinstance(f, _PatchesInSourceCheckout) for f in sys.meta_path):
        sys.meta_path.append(_PatchesInSourceCheckout())
