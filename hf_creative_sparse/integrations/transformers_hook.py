"""Register ``attn_implementation="creative_sparse"`` with transformers, for free.

``import hf_creative_sparse`` must stay light and must not import transformers. Yet a
user who writes ``AutoModelForCausalLM.from_pretrained(..., attn_implementation=
"creative_sparse")`` after importing the package expects the name to exist. So
`install` does one of two things:

- transformers' ``modeling_utils`` is already imported: register now;
- otherwise: put a finder on ``sys.meta_path`` that, when ``transformers.modeling_utils``
  has finished executing, imports ``hf_creative_sparse.patches.transformers_attention``
  and registers. Nothing else is touched; without transformers installed it never fires.

Registration can always be triggered explicitly too:
``hf_creative_sparse.patches.transformers_attention.register()`` (or
``enable_creative_sparse(model)``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_TARGET = "transformers.modeling_utils"


def _register() -> None:
    importlib.import_module("hf_creative_sparse.patches.transformers_attention").register()
    importlib.import_module("hf_creative_sparse.patches.transformers_entmax").register()  # creative_sparse_entmax


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.modeling_utils`` to register after it executes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            try:
                _register()
            except Exception as err:  # never break the user's transformers import
                import warnings

                warnings.warn(f"hf_creative_sparse: could not register attn_implementation='creative_sparse' "
                              f"({type(err).__name__}: {err}); call enable_creative_sparse(model) instead")

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers is loaded, else as soon as it is (idempotent)."""
    if _TARGET in sys.modules:
        try:
            _register()
        except Exception:
            pass  # a half-imported transformers; enable_creative_sparse registers later
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterImport())
