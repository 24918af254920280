"""The calibration result and its file format: `Calibration` (per-layer `LayerCalibration`
thresholds and measured errors), `Calibration.save` (``creative_sparse_config.json`` and
``sparse_params.safetensors``, written atomically) and `load_calibration` (reads and checks
them). How the thresholds are found: `calibration.runner`.

Example:
    >>> import hf_creative_sparse as hcs
    >>> cal = hcs.load_calibration("calibrated/")   # doctest: +SKIP
    >>> cal.layers["blocks.0.attn1"].measured_l1    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.config import SparseAttentionConfig
from .search import SearchGrid

CONFIG_NAME = "creative_sparse_config.json"
TENSORS_NAME = "sparse_params.safetensors"
FORMAT = "hf_creative_sparse.calibration"
FORMAT_VERSION = 1
#: Per-layer tensors in the safetensors file (each [heads]); the level is saved under the
#: method's name ("cdfthreshd" or "topk").
_FLOAT_FIELDS = ("simthreshd1", "pvthreshd", "estimated_l1", "measured_l1", "worst_call_l1", "kept_fraction",
                 "runtime_kept_fraction")


# -- the result --------------------------------------------------------------------------


@dataclass
class LayerCalibration:
    """Calibrated thresholds of one attention layer (all tensors [heads], on the CPU).

    Attributes:
        heads: q heads of the layer (0 when the layer saw no call and its head count is
            unknown; it then runs dense).
        calls: recorded calls the thresholds were fitted on (over all processes).
        simthreshd1, level, pvthreshd: float32 thresholds; ``level`` is cdfthreshd or topk
            (the calibration's ``method``).
        dense: bool, the head keeps every block and skips nothing.
        estimated_l1: relative L1 estimated by the search (of the worst call with
            ``per_call``); measured_l1: measured with `sparse_attention` over the recorded
            calls, SpargeAttn's metric (NaN when not measured); worst_call_l1: the same for
            the worst single call.
        kept_fraction: kept blocks / attendable blocks of the chosen mask;
            runtime_kept_fraction: the same as the verification calls ran it (1.0 where
            the dense-fallback policy ran the call dense).
    """

    heads: int
    calls: int
    simthreshd1: torch.Tensor
    level: torch.Tensor
    pvthreshd: torch.Tensor
    dense: torch.Tensor
    estimated_l1: torch.Tensor
    measured_l1: torch.Tensor
    worst_call_l1: torch.Tensor
    kept_fraction: torch.Tensor
    runtime_kept_fraction: torch.Tensor

    def config(self, base: SparseAttentionConfig, method: str) -> SparseAttentionConfig:
        """``base`` with this layer's per-head thresholds."""
        if self.heads == 0:  # never observed: no evidence that any block can go
            level = {"topk": 1.0} if method == "topk" else {"cdfthreshd": 1.0, "topk": None}
            return base.replace(pvthreshd=math.inf, **level)
        level = {"topk": self.level.clone()} if method == "topk" else {"cdfthreshd": self.level.clone(), "topk": None}
        return base.replace(simthreshd1=self.simthreshd1.clone(), pvthreshd=self.pvthreshd.clone(), **level)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in (*_FLOAT_FIELDS, "level", "dense")}


class ComponentView:
    """A calibration seen from one pipeline component (layer names without its prefix)."""

    def __init__(self, calibration: "Calibration", prefix: str) -> None:
        self.calibration, self.prefix = calibration, prefix

    def config_for(self, name: str, base: SparseAttentionConfig) -> SparseAttentionConfig:
        return self.calibration.config_for(self.prefix + name, base)


@dataclass
class Calibration:
    """Per-layer, per-head thresholds fitted to an error budget (see the module docstring).

    Attributes:
        model_class: class name(s) of the calibrated model ("A+B" for two components).
        family: the patch family ("wan", "flux", ...), or "" for recorded calls.
        method: "cdf" or "topk" (what ``LayerCalibration.level`` holds).
        target_l1, pv_target_l1: the budgets (pv_target_l1 None = target_l1).
        config: the base config (policy fields; thresholds are replaced per layer).
        grid: the candidates that were searched.
        layers: layer name -> `LayerCalibration` (names as `CreativeSparseHandle.layer_states`).
        library_version: hf_creative_sparse version that made it.
        info: run facts (seconds, processes, calls, verification rounds).

    Example:
        >>> cal = Calibration.dense_for({"blocks.0.attn1": 2}, model_class="WanTransformer3DModel")
        >>> cal.config_for("blocks.0.attn1", SparseAttentionConfig()).cdfthreshd.tolist()
        [1.0, 1.0]
    """

    model_class: str
    family: str
    method: str
    target_l1: float
    pv_target_l1: float | None
    config: SparseAttentionConfig
    grid: SearchGrid
    layers: dict[str, LayerCalibration]
    library_version: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.library_version:
            from .. import __version__

            self.library_version = __version__

    # -- use ----------------------------------------------------------------------------

    def config_for(self, name: str, base: SparseAttentionConfig) -> SparseAttentionConfig:
        """The thresholds of layer ``name``: ``base`` (its policy fields: min_seq_len,
        max_kept_fraction, backend, attention_sink) with the layer's per-head thresholds;
        ``base`` itself for a layer the calibration does not know (`check_fits` refuses
        such models when enabling)."""
        layer = self.layers.get(name)
        return base if layer is None else layer.config(base, self.method)

    def for_component(self, component: str, prefixed: bool) -> Any:
        """The view a pipeline component's patch uses (names carry ``component.`` when
        more than one component is patched, as in `CreativeSparseHandle.layer_states`)."""
        return ComponentView(self, f"{component}." if prefixed and component else "")

    def check_model(self, handle: Any) -> None:
        """Raise ValueError unless every patched model of ``handle`` is of the class and
        family this calibration was made for (a subclass of that class counts). Layer
        names and head counts can match across families (Flux and HunyuanVideo blocks,
        say) while the attention they calibrate differs. A calibration from
        `calibrate_calls` names no class or family and is not checked here."""
        classes = [c for c in self.model_class.split("+") if c]
        families = [f for f in self.family.split("+") if f]
        wrong = []
        for patch in handle.patches.values():
            lineage = {klass.__name__ for klass in type(patch.model).__mro__}
            if (classes and not lineage.intersection(classes)) or (families and patch.family not in families):
                wrong.append(f"{type(patch.model).__name__} (family {patch.family})")
        if wrong:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(f"this calibration{where} does not fit {', '.join(wrong)}: it was made for "
                             f"{self.model_class or '?'} (family {self.family or '?'}). Calibrate this model with "
                             "hf_creative_sparse.calibrate(...), or pass allow_other_model=True to "
                             "enable_creative_sparse if the models share their attention layers (a fine-tune "
                             "defined as another class, say)")

    def check_fits(self, handle: Any, *, allow_other_model: bool = False, allow_uncalibrated: bool = False) -> None:
        """Raise ValueError unless this calibration was made for the handle's model class
        and family (`check_model`; skipped with ``allow_other_model``) and has exactly its
        patched layers with the same head counts (read from the layer modules where they
        say). ``allow_uncalibrated``: patched layers it does not name are fine (the
        diffusers backend serves cross-attention too, which the processor patches do not
        calibrate); every layer it names must still exist with the same heads."""
        if not allow_other_model:
            self.check_model(handle)
        model_heads = handle_layer_heads(handle)
        missing = [] if allow_uncalibrated else [n for n in model_heads if n not in self.layers]
        extra = [n for n in self.layers if n not in model_heads]
        heads = [f"{n} has {h} heads, the calibration {self.layers[n].heads}" for n, h in model_heads.items()
                 if n in self.layers and h is not None and self.layers[n].heads and h != self.layers[n].heads]
        if not (missing or extra or heads):
            return
        classes = "+".join(dict.fromkeys(type(p.model).__name__ for p in handle.patches.values()))
        parts = []
        if missing:
            parts.append(f"{len(missing)} patched layer(s) of this model are not in it ({_listing(missing)})")
        if extra:
            parts.append(f"{len(extra)} of its layer(s) are not in this model ({_listing(extra)})")
        if heads:
            parts.append("head counts differ: " + _listing(heads))
        where = f" ({self.source})" if self.source else ""
        raise ValueError(f"this calibration{where} does not fit {classes}: it was made for {self.model_class} with "
                         f"{len(self.layers)} layers; " + "; ".join(parts) + ". Calibrate this model with "
                         "hf_creative_sparse.calibrate(...) or load the calibration made for it.")

    # -- facts --------------------------------------------------------------------------

    @property
    def mean_kept_fraction(self) -> float:
        """Kept fraction of the chosen masks, averaged over layers and heads."""
        values = [layer.kept_fraction for layer in self.layers.values() if layer.heads]
        return float(torch.cat(values).mean()) if values else 1.0

    @property
    def max_measured_l1(self) -> float:
        """Largest measured relative L1 over layers and heads (NaN when none was measured)."""
        values = [layer.measured_l1 for layer in self.layers.values() if layer.heads]
        if not values:
            return math.nan
        return float(torch.cat(values).nan_to_num(nan=-math.inf).max().clamp(min=0.0))

    def table(self) -> str:
        """One line per layer: heads, dense heads, kept fraction (search / as run), L1."""
        rows = [("layer", "heads", "dense", "kept", "kept run", "L1 est max", "L1 measured max", "worst call")]
        for name, layer in self.layers.items():
            if not layer.heads:
                rows.append((name, "?", "all", "1.000", "-", "-", "-", "-"))
                continue
            rows.append((name, str(layer.heads), str(int(layer.dense.sum())),
                         f"{float(layer.kept_fraction.mean()):.3f}", f"{float(layer.runtime_kept_fraction.mean()):.3f}",
                         f"{float(layer.estimated_l1.max()):.4f}", f"{float(layer.measured_l1.max()):.4f}",
                         f"{float(layer.worst_call_l1.max()):.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"Calibration of {self.model_class} ({self.method}, target L1 {self.target_l1}"
                f"{'' if self.pv_target_l1 is None else f', pv target {self.pv_target_l1}'}): mean kept "
                f"{self.mean_kept_fraction:.3f}, max measured L1 {self.max_measured_l1:.4f}\n{self.table()}")

    @classmethod
    def dense_for(cls, layer_heads: Mapping[str, int], *, model_class: str = "", family: str = "",
                  method: str = "cdf", config: SparseAttentionConfig | None = None) -> "Calibration":
        """A calibration keeping every block of every head (a baseline / placeholder)."""
        layers = {name: dense_layer(heads, 0) for name, heads in layer_heads.items()}
        return cls(model_class=model_class, family=family, method=method, target_l1=0.0, pv_target_l1=None,
                   config=config or SparseAttentionConfig(), grid=SearchGrid(method=method), layers=layers)

    # -- files --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``creative_sparse_config.json`` and ``sparse_params.safetensors`` into
        ``directory`` (created if needed). Each file is written to a temporary file in
        the same directory and renamed over the old one, so an interrupted save leaves no
        half file; the JSON records the size and SHA-256 of the tensor file, so a pair
        from two different saves is detected on load. Returns the directory."""
        from safetensors.torch import save as save_tensors

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            for key, value in layer.tensors().items():
                key = self.method if key == "level" else key
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        blob = save_tensors(tensors, metadata={"format": "pt", "producer": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "model_class": self.model_class,
            "family": self.family,
            "method": self.method,
            "target_l1": self.target_l1,
            "pv_target_l1": self.pv_target_l1,
            "config": self.config.to_dict(),
            "grid": self.grid.to_dict(),
            "layers": [{"name": n, "heads": layer.heads, "calls": layer.calls} for n, layer in self.layers.items()],
            "tensors_file": TENSORS_NAME,
            "tensors_bytes": len(blob),
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "info": self.info,
        }
        _atomic_write(os.path.join(directory, TENSORS_NAME), blob)
        _atomic_write(os.path.join(directory, CONFIG_NAME), (json.dumps(meta, indent=2) + "\n").encode())
        return directory


def dense_layer(heads: int, calls: int) -> LayerCalibration:
    ones = torch.ones(heads)
    return LayerCalibration(heads=heads, calls=calls, simthreshd1=ones.clone(), level=ones.clone(),
                            pvthreshd=torch.full((heads,), math.inf), dense=torch.ones(heads, dtype=torch.bool),
                            estimated_l1=torch.zeros(heads), measured_l1=torch.full((heads,), math.nan),
                            worst_call_l1=torch.full((heads,), math.nan), kept_fraction=ones.clone(),
                            runtime_kept_fraction=ones.clone())


def _listing(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.
    The file is created with mode 0o666 less the user's umask, as ``open`` would
    (``tempfile.mkstemp`` would make it 0o600, unreadable to the user's group)."""
    folder, base = os.path.split(path)
    while True:
        tmp = os.path.join(folder or ".", f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _config_paths(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) in (CONFIG_NAME, TENSORS_NAME):
        folder = os.path.dirname(path) or "."
    elif os.path.exists(path):
        raise ValueError(f"calibration path {path!r} must be a directory holding {CONFIG_NAME} and {TENSORS_NAME} "
                         "(or one of those files)")
    else:
        raise FileNotFoundError(f"no calibration at {path!r}")
    return os.path.join(folder, CONFIG_NAME), os.path.join(folder, TENSORS_NAME)


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a calibration saved by `Calibration.save` and check it.

    Args:
        path: the directory (or either of its two files).

    Raises:
        FileNotFoundError: no calibration there.
        ValueError: a file is truncated or corrupt, the two files come from different
            saves, or the content is not a valid calibration (each message says which).

    Example:
        >>> import tempfile
        >>> cal = Calibration.dense_for({"blocks.0.attn1": 2})
        >>> load_calibration(cal.save(tempfile.mkdtemp())).layers["blocks.0.attn1"].heads
        2
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    config_path, tensors_path = _config_paths(path)
    for p in (config_path, tensors_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"calibration file {p} is missing")
    try:
        with open(config_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a hf_creative_sparse calibration (format {FORMAT!r} expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {meta.get('format_version')!r}; this version of "
                         f"hf_creative_sparse reads {FORMAT_VERSION}")
    with open(tensors_path, "rb") as fh:
        blob = fh.read()
    expected = meta.get("tensors_bytes")
    if len(blob) != expected:
        raise ValueError(f"{tensors_path} has {len(blob)} bytes but {CONFIG_NAME} expects {expected}: the file is "
                         "truncated or belongs to another save")
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise ValueError(f"{tensors_path} does not match the checksum in {CONFIG_NAME}: corrupt, or the two files "
                         "come from different saves")
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{tensors_path} is not a readable safetensors file: {err}") from None
    try:
        method = meta["method"]
        grid = SearchGrid.from_dict(meta["grid"])
        config = SparseAttentionConfig.from_dict(meta["config"])
        layers = {}
        for entry in meta["layers"]:
            name, heads, calls = entry["name"], int(entry["heads"]), int(entry["calls"])
            values = {}
            for key in (*_FLOAT_FIELDS, method, "dense"):
                full = f"{name}.{key}"
                if full not in tensors:
                    raise ValueError(f"tensor {full!r} is missing")
                t = tensors[full]
                if tuple(t.shape) != (heads,):
                    raise ValueError(f"tensor {full!r} has shape {tuple(t.shape)}, expected ({heads},)")
                values["level" if key == method else key] = t
            layers[name] = LayerCalibration(heads=heads, calls=calls, **values)
        cal = Calibration(model_class=meta["model_class"], family=meta.get("family", ""), method=method,
                          target_l1=float(meta["target_l1"]),
                          pv_target_l1=None if meta["pv_target_l1"] is None else float(meta["pv_target_l1"]),
                          config=config, grid=grid, layers=layers, library_version=meta.get("library_version", ""),
                          info=meta.get("info", {}), source=os.path.dirname(config_path))
        for name, layer in layers.items():  # every stored threshold must make a valid config
            layer.config(config, method)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: not a valid calibration: {err}") from None
    return cal


def as_calibration(calibration: Any) -> Any:
    """What ``enable_creative_sparse(calibration=...)`` accepts: a path (str or PathLike)
    is loaded with `load_calibration`; a `Calibration`, a mapping or None pass through."""
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration)
    return calibration


def module_heads(model: torch.nn.Module, name: str) -> int | None:
    """The number of q heads of attention module ``name`` of ``model`` (diffusers
    ``heads``, transformers ``num_heads`` / ``config.num_attention_heads``), or None
    when the name is not a module path or the module does not say."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    for attr in ("heads", "num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def handle_layer_heads(handle: Any) -> dict[str, int | None]:
    """Layer name (as `CreativeSparseHandle.layer_states`) -> q heads (None = unknown)."""
    prefixed = len(handle.patches) > 1
    out: dict[str, int | None] = {}
    for component, patch in handle.patches.items():
        for name in patch.layer_states():
            out[f"{component}.{name}" if prefixed and component else name] = module_heads(patch.model, name)
    return out
