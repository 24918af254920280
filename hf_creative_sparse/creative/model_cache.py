"""A cache of GGUF models converted to safetensors, so only the first load pays.

transformers loads a ``.gguf`` file by de-quantising every tensor to float32 in Python:
about 26 s for SmolLM2-135M (Q4_1) on a 2-core CPU, on every load. `load_gguf` does that
once, saves the converted model (safetensors) and tokenizer into
the user's cache folder, and loads them from there afterwards (a few seconds).

- Where: ``$HCS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/hf_creative_sparse`` (default
  ``~/.cache/hf_creative_sparse``), then ``gguf/<sha256 of the .gguf file>``. The key is
  the file's content, so a new version of the package's file is converted afresh.
- A folder is complete only once renamed into place (written under a temporary name
  first), so an interrupted conversion is never loaded. A cache folder that cannot be
  written costs the conversion on every load, with one warning; ``HCS_CACHE_DIR=off``
  turns the cache off.
- ``progress=False`` hides the de-quantisation's progress bar (the CLI's
  ``--no-progress``).

Example:
    >>> from hf_creative_sparse.creative.model_cache import load_gguf
    >>> model, tokenizer = load_gguf(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
import warnings
from typing import Any, Callable, Iterator

#: Environment variable naming the cache folder ("off" disables the cache).
CACHE_ENV = "HCS_CACHE_DIR"
#: Marker written last into a converted folder: its presence means the folder is complete.
COMPLETE_MARKER = "converted_from.txt"


def cache_root() -> str | None:
    """The cache folder (see the module docstring), or None when turned off."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit is not None:
        return None if explicit.strip().lower() in ("", "off", "0", "none") else os.path.expanduser(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hf_creative_sparse")


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content (streamed, 4 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _gguf_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' de-quantisation bar (a module-level ``tqdm`` that its logging
    switches do not reach) while converting, when ``enabled`` is False."""
    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert_gguf(folder: str, gguf_file: str, progress: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    return model.eval(), tokenizer


def _load_converted(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _save_weights(model: Any, folder: str) -> None:
    """Config and float weights as a plain safetensors checkpoint. ``save_pretrained``
    refuses a model loaded from GGUF (it is marked quantized although its tensors are
    already de-quantised), so the config is written without its quantization entry and
    the weights with safetensors (tied weights stored once)."""
    import json

    from safetensors.torch import save_model

    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _save_converted(model: Any, tokenizer: Any, target: str, source: str) -> None:
    """Save into a temporary sibling of ``target``, then rename it into place."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        _save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as fh:
            fh.write(source + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, COMPLETE_MARKER)):  # not another process's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def progress_bars_enabled() -> bool:
    """False when the user turned Hugging Face progress bars off (the CLI's
    ``--no-progress`` sets ``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() not in ("1", "true", "yes", "on")


def load_gguf(folder: str, gguf_file: str, *, progress: bool | None = None,
              convert: Callable[[str, str, bool], tuple[Any, Any]] | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of ``folder/gguf_file``, converted once and cached.

    Args:
        folder: the folder holding the ``.gguf`` file (and nothing else needed).
        gguf_file: the file's name inside ``folder``.
        progress: show the de-quantisation progress bar of the first (converting) load
            (None: unless Hugging Face progress bars are turned off, `progress_bars_enabled`).
        convert: ``(folder, gguf_file, progress) -> (model, tokenizer)``, the slow load
            whose result is cached (default: transformers' GGUF loader).

    Raises:
        FileNotFoundError: no such file.
    """
    source = os.path.join(folder, gguf_file)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no GGUF file at {source}")
    convert = convert or _convert_gguf
    progress = progress_bars_enabled() if progress is None else bool(progress)
    root = cache_root()
    if root is None:
        return convert(folder, gguf_file, progress)
    target = os.path.join(root, "gguf", file_sha256(source))
    if os.path.isfile(os.path.join(target, COMPLETE_MARKER)):
        return _load_converted(target)
    model, tokenizer = convert(folder, gguf_file, progress)
    try:
        _save_converted(model, tokenizer, target, os.path.abspath(source))
    except OSError as err:
        warnings.warn(f"could not cache the converted {gguf_file} in {target} ({err}); every load will convert it "
                      f"again (set {CACHE_ENV} to a writable folder)", stacklevel=2)
    return model, tokenizer


def load_gguf_model(folder: str, gguf_file: str, tokenizer: Any = None) -> tuple[Any, Any]:
    """`load_gguf`, keeping a tokenizer the caller already has (for ``load_model``)."""
    model, own = load_gguf(folder, gguf_file)
    return model, own if tokenizer is None else tokenizer
