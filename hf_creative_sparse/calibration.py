"""Calibration: per-layer, per-head thresholds to an error budget, in minutes.

`calibrate(pipe, call)` runs the user's pipeline (or model) call a few times with every
patched attention layer in *recording mode* (dense SDPA, a `LayerState` hook observing
q/k/v), and finds for every layer and head the sparsest thresholds -- simthreshd1,
cdfthreshd (or topk) and pvthreshd -- whose relative L1 error against dense attention,
sum |out - dense| / sum |dense|, stays under ``target_l1`` on every recorded attention
call (``per_call=True``, the default; this bounds SpargeAttn's metric over all calls
together, which ``per_call=False`` uses alone). Heads that cannot be sparse within the
budget stay dense.

How (the passes; each runs the user's calls once, all on the dense trajectory):

1. *mask pass*: every mask candidate of the grid is evaluated from block statistics
   computed once per call (`calibration_search`): exact float32 math, no kernel call
   per candidate. Per head the candidate with the fewest kept blocks under the target wins.
2. *stage-2 pass*: with that mask, the pvthreshd candidates are evaluated the same way;
   the one that skips the most (row, block) pairs while mask and skip together stay
   under ``pv_target_l1`` (default ``target_l1``) wins.
3. *verification*: the chosen thresholds run through the real `sparse_attention` path
   (`sparse_attention_inputs`: prediction, dispatch, kernel, dense-fallback policy) on
   the recorded calls, and the measured relative L1 is compared with the target. (The
   searches aim at ``safety * target``, default 0.9, leaving headroom for unseen calls.) A head
   over it gets a tighter budget (and no stage-2 skip) and is verified again; after
   ``max_verify_rounds - 1`` rounds, heads still over it go dense. The measured errors
   are saved with the thresholds.

Launched with ``accelerate launch`` (or any ``torch.distributed`` launcher), the calls are
sharded across processes (call i on rank i % world) and the statistics -- sums of
numerators and denominators -- are added up with ``all_reduce``, so every process ends
with the same thresholds.

`Calibration.save(directory)` writes ``creative_sparse_config.json`` and
``sparse_params.safetensors`` atomically; `load_calibration` reads and checks them;
``enable_creative_sparse(model, calibration=path_or_calibration)`` applies them after
checking that they fit the model (layer names, head counts).

Example:
    >>> import torch
    >>> from diffusers import WanTransformer3DModel
    >>> import hf_creative_sparse as hcs
    >>> model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
    ...     in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
    ...     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    >>> inputs = [dict(hidden_states=torch.randn(1, 4, 2, 32, 32), timestep=torch.tensor([500]),
    ...                encoder_hidden_states=torch.randn(1, 8, 16))]
    >>> cal = hcs.calibrate(model, inputs, target_l1=0.05, progress=False,
    ...                     config=hcs.SparseAttentionConfig(min_seq_len=0))
    >>> sorted(cal.layers)
    ['blocks.0.attn1', 'blocks.1.attn1']
    >>> bool((cal.layers["blocks.0.attn1"].measured_l1 <= 0.05).all())
    True
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration_search import (DEFAULT_MAX_CHUNK_ELEMENTS, CallOptions, HeadChoice, LayerStats, SearchGrid,
                                 choose_masks, choose_pv, observe_masks, observe_pv)
from .config import SparseAttentionConfig
from .ops.attention import sparse_attention_inputs
from .ops.dense import dense_attention
from .ops.inputs import AttentionInputs, attention_inputs, per_head
from .ops.masks import attendable_blocks, predict_from_inputs

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


class _ComponentView:
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
            from . import __version__

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
        return _ComponentView(self, f"{component}." if prefixed and component else "")

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

    def check_fits(self, handle: Any, *, allow_other_model: bool = False) -> None:
        """Raise ValueError unless this calibration was made for the handle's model class
        and family (`check_model`; skipped with ``allow_other_model``) and has exactly its
        patched layers with the same head counts (read from the layer modules where they
        say)."""
        if not allow_other_model:
            self.check_model(handle)
        model_heads = handle_layer_heads(handle)
        missing = [n for n in model_heads if n not in self.layers]
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
        layers = {name: _dense_layer(heads, 0) for name, heads in layer_heads.items()}
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


def _dense_layer(heads: int, calls: int) -> LayerCalibration:
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


# -- the search over recorded calls --------------------------------------------------------


@dataclass
class RecordedCall:
    """One attention call to calibrate on (for `calibrate_calls`).

    Attributes:
        q, k, v: as for `sparse_attention` (``layout`` "HND" or "NHD").
        dense_prefix, dense_suffix: text tokens kept dense (as the patch passes them).
        dense_output: the dense output in q's layout, if already computed (else SDPA).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str = "HND"
    is_causal: bool = False
    scale: float | None = None
    key_padding_mask: torch.Tensor | None = None
    dense_prefix: int = 0
    dense_suffix: int = 0
    dense_output: torch.Tensor | None = None


class _Search:
    """Statistics, choices and per-layer configs of one calibration (all layers)."""

    def __init__(self, grid: SearchGrid, target_l1: float, pv_target_l1: float | None,
                 base: SparseAttentionConfig, max_chunk_elements: int, safety: float = 1.0,
                 per_call: bool = True) -> None:
        self.grid, self.base = grid, base
        self.per_call = per_call
        self.safety = safety
        self.target = target_l1 * safety
        self.final_target = target_l1 if pv_target_l1 is None else pv_target_l1
        self.max_chunk_elements = max_chunk_elements
        self.mode = "mask"
        self.stats: dict[str, LayerStats] = {}
        self.targets: dict[str, torch.Tensor] = {}
        self.choices: dict[str, HeadChoice] = {}
        self.pv_values: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}  # wall time per pass kind
        self.backends: dict[str, int] = {}  # backend -> verification calls it ran
        self._configs: dict[str, SparseAttentionConfig] = {}

    def ensure(self, name: str, heads: int) -> LayerStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = LayerStats(heads, len(self.grid.simthreshd1), len(self.grid.levels), len(self.grid.pvthreshd))
            self.stats[name] = stats
        elif stats.heads != heads:
            raise ValueError(f"layer {name!r} was called with {heads} q heads after {stats.heads}; calibration needs "
                             "a fixed head count per layer")
        return stats

    def observe(self, name: str, inp: AttentionInputs, opts: CallOptions, dense_out: torch.Tensor | None) -> None:
        stats = self.ensure(name, inp.heads_q)
        if self.mode == "mask":
            observe_masks(stats, inp, self.grid, opts, max_chunk_elements=self.max_chunk_elements)
        elif self.mode == "pv":
            cfg = self.layer_config(name, opts)
            with torch.no_grad():
                mask = predict_from_inputs(
                    inp, simthreshd1=cfg.effective_simthreshd1, cdfthreshd=None if cfg.topk is not None else cfg.cdfthreshd,
                    topk=cfg.topk, attention_sink=cfg.attention_sink, dense_prefix=cfg.dense_prefix,
                    dense_suffix=cfg.dense_suffix)
            observe_pv(stats, inp, mask, self.grid, max_chunk_elements=self.max_chunk_elements)
        elif self.mode == "verify":
            self._verify(name, stats, inp, opts, dense_out)
        else:
            raise RuntimeError(f"unknown mode {self.mode!r}")

    def _verify(self, name: str, stats: LayerStats, inp: AttentionInputs, opts: CallOptions,
                dense_out: torch.Tensor | None) -> None:
        cfg = self.layer_config(name, opts)
        with torch.no_grad():
            out, st = sparse_attention_inputs(inp, cfg)
            self.backends[st.backend] = self.backends.get(st.backend, 0) + 1
            dense = dense_out if dense_out is not None else dense_attention(inp)
            err = (out.float() - dense.float()).abs().sum(dim=(0, 2, 3))
            ref = dense.float().abs().sum(dim=(0, 2, 3))
            total = float(attendable_blocks(inp).sum())
            if st.fallback_reason is None and st.block_mask is not None:
                kept = st.block_mask.sum(dim=(0, 2, 3)).double()
            else:  # the policy ran it dense
                kept = torch.full((inp.heads_q,), total, dtype=torch.float64)
        stats.add("verify_err", err)
        stats.add("verify_abs", ref)
        stats.maximum("verify_worst", _ratio(err, ref))
        stats.add("verify_kept", kept)
        stats.add("verify_total", torch.full((inp.heads_q,), total))

    # -- choices ------------------------------------------------------------------------

    def solve_masks(self, names: Iterable[str]) -> None:
        for name in names:
            stats = self.stats[name]
            if name not in self.targets:
                self.targets[name] = torch.full((stats.heads,), float(self.target), dtype=torch.float64)
            self.choices[name] = choose_masks(stats, self.targets[name], per_call=self.per_call)
            default_pv = math.inf if self.grid.pvthreshd else None
            if default_pv is None:
                self.pv_values[name] = per_head("pvthreshd", self.base.pvthreshd, stats.heads, torch.device("cpu"))
            else:
                self.pv_values[name] = torch.full((stats.heads,), math.inf)
            no_skip = torch.full_like(self.pv_values[name], math.inf)
            self.pv_values[name] = torch.where(self.choices[name].dense, no_skip, self.pv_values[name])
            self._configs.pop(name, None)

    def solve_pv(self, names: Iterable[str]) -> None:
        if not self.grid.pvthreshd:
            return
        pv_grid = torch.tensor(self.grid.pvthreshd, dtype=torch.float32)
        for name in names:
            stats = self.stats[name]
            targets = torch.full((stats.heads,), float(self.final_target * self.safety), dtype=torch.float64)
            choice = choose_pv(stats, self.choices[name], targets, per_call=self.per_call)
            self.choices[name] = choice
            self.pv_values[name] = pv_grid[choice.pv_index]
            self._configs.pop(name, None)

    def measured(self, name: str) -> torch.Tensor:
        """The verified relative L1 per head by the criterion: over all calls, or the worst call."""
        stats = self.stats[name]
        measured = _ratio(stats.verify_err, stats.verify_abs)
        return torch.maximum(measured, stats.verify_worst) if self.per_call else measured

    def failing(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Layer -> bool [H] of heads whose measured L1 exceeds the final target."""
        out = {}
        for name in names:
            measured = self.measured(name)
            bad = measured > self.final_target
            if bool(bad.any()):
                out[name] = bad
        return out

    def back_off(self, failing: Mapping[str, torch.Tensor], *, to_dense: bool) -> None:
        """Tighten the failing heads' budgets (by the measured overshoot), drop their
        stage-2 skip; with ``to_dense`` make them dense."""
        for name, bad in failing.items():
            stats = self.stats[name]
            measured = self.measured(name)
            if to_dense:
                choice = self.choices[name]
                choice.dense = choice.dense | bad
                choice.level_index = torch.where(bad, torch.full_like(choice.level_index, len(self.grid.levels) - 1),
                                                 choice.level_index)
                choice.estimated_l1 = torch.where(bad, torch.zeros_like(choice.estimated_l1), choice.estimated_l1)
                choice.kept_fraction = torch.where(bad, torch.ones_like(choice.kept_fraction), choice.kept_fraction)
            else:
                shrink = torch.clamp(self.final_target / measured.clamp(min=1e-12), max=0.8)
                self.targets[name] = torch.where(bad, self.targets[name] * shrink, self.targets[name])
                previous = self.choices[name]
                fresh = choose_masks(stats, self.targets[name], per_call=self.per_call)
                keep = ~bad
                self.choices[name] = HeadChoice(
                    sim_index=torch.where(keep, previous.sim_index, fresh.sim_index),
                    level_index=torch.where(keep, previous.level_index, fresh.level_index),
                    pv_index=torch.where(keep, previous.pv_index, torch.zeros_like(previous.pv_index)),
                    dense=torch.where(keep, previous.dense, fresh.dense),
                    estimated_l1=torch.where(keep, previous.estimated_l1, fresh.estimated_l1),
                    kept_fraction=torch.where(keep, previous.kept_fraction, fresh.kept_fraction))
            no_skip = torch.full_like(self.pv_values[name], math.inf)
            self.pv_values[name] = torch.where(bad, no_skip, self.pv_values[name])
            self._configs.pop(name, None)

    def layer_calibration(self, name: str) -> LayerCalibration:
        stats, choice = self.stats[name], self.choices[name]
        sims = torch.tensor(self.grid.simthreshd1, dtype=torch.float32)
        levels = torch.tensor(self.grid.levels, dtype=torch.float32)
        dense = choice.dense.clone()
        measured = _ratio(stats.verify_err, stats.verify_abs).float()
        measured = torch.where(stats.verify_abs > 0, measured, torch.full_like(measured, math.nan))
        worst = torch.where(stats.verify_abs > 0, stats.verify_worst.float(), torch.full_like(measured, math.nan))
        return LayerCalibration(
            heads=stats.heads, calls=int(stats.calls.item()),
            simthreshd1=torch.where(dense, torch.ones(stats.heads), sims[choice.sim_index]),
            level=torch.where(dense, torch.ones(stats.heads), levels[choice.level_index]),
            pvthreshd=torch.where(dense, torch.full((stats.heads,), math.inf), self.pv_values[name].float()),
            dense=dense, estimated_l1=choice.estimated_l1.float(), measured_l1=measured, worst_call_l1=worst,
            kept_fraction=choice.kept_fraction.float(),
            runtime_kept_fraction=_ratio(stats.verify_kept, stats.verify_total).float())

    def layer_config(self, name: str, opts: CallOptions) -> SparseAttentionConfig:
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = self.layer_calibration(name).config(self.base, self.grid.method)
            self._configs[name] = cfg
        prefix, suffix = max(cfg.dense_prefix, opts.dense_prefix), max(cfg.dense_suffix, opts.dense_suffix)
        if (prefix, suffix) != (cfg.dense_prefix, cfg.dense_suffix):
            cfg = cfg.replace(dense_prefix=prefix, dense_suffix=suffix)
        return cfg


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


_PASS_TENSORS = {"mask": ("mask_err", "dense_abs", "kept", "total", "calls", "mask_worst"),
                 "pv": ("pv_err", "pv_skipped", "pv_visited", "pv_dense_abs", "pv_worst"),
                 "verify": ("verify_err", "verify_abs", "verify_kept", "verify_total", "verify_worst")}


def _search(search: _Search, run_pass: Callable[[str], list[str]], max_verify_rounds: int) -> int:
    """Mask pass, stage-2 pass, verification rounds; ``run_pass(mode)`` feeds the calls
    and returns the layer names that have statistics. Returns the rounds used."""
    def timed(mode: str) -> list[str]:
        start = time.perf_counter()
        search.mode = mode
        out = run_pass(mode)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        search.seconds[mode] = search.seconds.get(mode, 0.0) + time.perf_counter() - start
        return out

    names = timed("mask")
    search.solve_masks(names)
    if search.grid.pvthreshd:
        timed("pv")
        search.solve_pv(names)
    rounds = 0
    for rnd in range(max_verify_rounds):
        rounds = rnd + 1
        for name in names:
            search.stats[name].reset(*_PASS_TENSORS["verify"])
        timed("verify")
        failing = search.failing(names)
        if not failing:
            break
        if rnd == max_verify_rounds - 1:
            search.back_off(failing, to_dense=True)
            warnings.warn(f"calibration: {sum(int(b.sum()) for b in failing.values())} head(s) still exceeded the "
                          f"target after {max_verify_rounds} verification rounds and were made dense without a "
                          "further check", RuntimeWarning, stacklevel=3)
            break
        search.back_off(failing, to_dense=rnd == max_verify_rounds - 2)
    return rounds


def _check_budget(target_l1: Any, pv_target_l1: Any, max_verify_rounds: Any, safety: Any = 1.0) -> None:
    if isinstance(target_l1, bool) or not isinstance(target_l1, (int, float)) or not 0.0 < float(target_l1) < 1.0:
        raise ValueError(f"target_l1 must be a float in (0, 1), got {target_l1!r}")
    if pv_target_l1 is not None:
        if isinstance(pv_target_l1, bool) or not isinstance(pv_target_l1, (int, float)) \
                or not float(target_l1) <= float(pv_target_l1) < 1.0:
            raise ValueError(f"pv_target_l1 must be None or a float in [target_l1, 1) = [{target_l1}, 1) (the stage-2 "
                             f"skip adds to the mask's error), got {pv_target_l1!r}")
    if isinstance(max_verify_rounds, bool) or not isinstance(max_verify_rounds, int) or max_verify_rounds < 2:
        raise ValueError(f"max_verify_rounds must be an int >= 2, got {max_verify_rounds!r}")
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0.0 < float(safety) <= 1.0:
        raise ValueError(f"safety must be a float in (0, 1], got {safety!r}")


def _make_grid(method: str | None, grid: SearchGrid | None) -> SearchGrid:
    if grid is not None:
        if not isinstance(grid, SearchGrid):
            raise TypeError(f"grid must be a SearchGrid or None, got {type(grid).__name__}")
        if method is not None and method != grid.method:
            raise ValueError(f"method={method!r} contradicts grid.method={grid.method!r}; give one of them")
        return grid
    return SearchGrid(method=method or "cdf")


def _progress(iterable: Any = None, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def calibrate_calls(
    layers: Mapping[str, Sequence[RecordedCall] | Callable[[], Iterable[RecordedCall]]],
    target_l1: float = 0.05,
    pv_target_l1: float | None = None,
    *,
    config: SparseAttentionConfig | None = None,
    method: str | None = None,
    grid: SearchGrid | None = None,
    max_verify_rounds: int = 3,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    progress: bool = True,
    safety: float = 0.9,
    per_call: bool = True,
    model_class: str = "",
    family: str = "",
) -> Calibration:
    """Calibrate on attention calls given directly (no model): layer by layer, all passes.

    Args:
        layers: layer name -> its recorded calls, or a function returning them afresh
            (called once per pass, so calls need not all stay in memory).
        safety, per_call: as `calibrate`.
        Others: as `calibrate`; ``model_class`` / ``family`` are stored in the result.

    Example:
        >>> q = k = v = torch.randn(1, 2, 512, 32)
        >>> cal = calibrate_calls({"attn": [RecordedCall(q, k, v)]}, 0.05, progress=False,
        ...                       config=SparseAttentionConfig(min_seq_len=0))
        >>> cal.layers["attn"].heads
        2
    """
    _check_budget(target_l1, pv_target_l1, max_verify_rounds, safety)
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping layer name -> recorded calls")
    grid = _make_grid(method, grid)
    base = config if config is not None else SparseAttentionConfig()
    if not isinstance(base, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(base).__name__}")
    search = _Search(grid, float(target_l1), pv_target_l1, base, max_chunk_elements, float(safety),
                     per_call=bool(per_call))
    start = time.perf_counter()
    result: dict[str, LayerCalibration] = {}
    rounds_used = 0
    bar = _progress(total=len(layers), desc="calibrate", unit=" layers", disable=not progress)
    for name, source in layers.items():
        def run_pass(mode: str, name: str = name, source: Any = source) -> list[str]:
            calls = source() if callable(source) else source
            for call in calls:
                if not isinstance(call, RecordedCall):
                    raise TypeError(f"layer {name!r}: calls must be RecordedCall, got {type(call).__name__}")
                # SDPA's fused kernels (the dense reference) need stride 1 along head_dim
                q, k, v = (t if not isinstance(t, torch.Tensor) or t.stride(-1) == 1 else t.contiguous()
                           for t in (call.q, call.k, call.v))
                inp = attention_inputs(q, k, v, layout=call.layout, is_causal=call.is_causal,
                                       scale=call.scale, key_padding_mask=call.key_padding_mask)
                dense = None
                if call.dense_output is not None:
                    dense = call.dense_output.transpose(1, 2) if call.layout == "NHD" else call.dense_output
                search.observe(name, inp, CallOptions(call.dense_prefix, call.dense_suffix, base.attention_sink), dense)
            if name not in search.stats:
                raise ValueError(f"layer {name!r} has no recorded calls")
            return [name]

        rounds_used = max(rounds_used, _search(search, run_pass, max_verify_rounds))
        result[name] = search.layer_calibration(name)
        del search.stats[name]  # free per-layer statistics as we go
        bar.update(1)
        bar.set_postfix_str(name)
    bar.close()
    info = {"seconds": time.perf_counter() - start, "processes": 1, "verify_rounds": rounds_used, "safety": safety,
            "per_call": per_call,
            "pass_seconds": dict(search.seconds), "verify_backends": dict(search.backends)}
    return Calibration(model_class=model_class, family=family, method=grid.method, target_l1=float(target_l1),
                       pv_target_l1=pv_target_l1, config=base, grid=grid, layers=result, info=info)


# -- the search on a patched model ----------------------------------------------------------


def _distributed(enabled: bool | None) -> Any:
    """torch.distributed when this run has several processes (initialised here from the
    launcher's environment when needed), else None."""
    if enabled is False:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        if enabled:
            raise RuntimeError("distributed=True but torch.distributed is not available")
        return None
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "MASTER_ADDR" not in os.environ:
            if enabled:
                raise RuntimeError("distributed=True but no process group is initialised and WORLD_SIZE/MASTER_ADDR "
                                   "are not set (launch with `accelerate launch` or torchrun)")
            return None
        use_nccl = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist if dist.get_world_size() > 1 else None


def _all_reduce(dist: Any, tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """Sum (or max) float64 CPU tensors over the processes; returns new tensors."""
    if dist is None or not tensors:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors]).double()
    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    flat = flat.cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset: offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def _call_runner(target: Any, inputs_or_callable: Any, num_calls: int) -> tuple[int, Callable[[int], Any]]:
    """(number of calls, run(i)) for a callable or a list of inputs."""
    if callable(inputs_or_callable) and not isinstance(inputs_or_callable, torch.nn.Module):
        fn = inputs_or_callable
        if isinstance(num_calls, bool) or not isinstance(num_calls, int) or num_calls < 1:
            raise ValueError(f"num_calls must be an int >= 1, got {num_calls!r}")
        try:
            takes_index = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                              for p in inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            takes_index = False
        return num_calls, (lambda i: fn(i)) if takes_index else (lambda i: fn())
    if isinstance(inputs_or_callable, (list, tuple)) and inputs_or_callable:
        items = list(inputs_or_callable)

        def run(i: int) -> Any:
            item = items[i]
            if isinstance(item, Mapping):
                return target(**item)
            if isinstance(item, tuple):
                return target(*item)
            return target(item)

        return len(items), run
    raise TypeError("inputs_or_callable must be a callable (called as fn(i) or fn(), num_calls times) or a non-empty "
                    "list of inputs (dicts of keyword arguments or tuples), got "
                    f"{type(inputs_or_callable).__name__}")


def calibrate(
    pipe_or_model: Any,
    inputs_or_callable: Any,
    target_l1: float = 0.05,
    pv_target_l1: float | None = None,
    *,
    num_calls: int = 2,
    config: SparseAttentionConfig | None = None,
    method: str | None = None,
    grid: SearchGrid | None = None,
    max_verify_rounds: int = 3,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    progress: bool = True,
    safety: float = 0.9,
    per_call: bool = True,
    distributed: bool | None = None,
) -> Calibration:
    """Fit per-layer, per-head thresholds of a pipeline or model to an error budget.

    Args:
        pipe_or_model: what `enable_creative_sparse` accepts (a diffusers pipeline, a
            transformer, a transformers model).
        inputs_or_callable: a function run ``num_calls`` times -- ``fn(i)`` (i = call
            index) or ``fn()``; e.g. ``lambda i: pipe(prompt_embeds=..., generator=...)``
            -- or a list of inputs, each a dict of keyword arguments (or a tuple of
            positional ones) for ``pipe_or_model``. Every pass runs each call again on
            the dense model, so the calls must be repeatable (fixed seeds).
        target_l1: budget of the relative L1 error of every layer and head (sum |out -
            dense| / sum |dense| over the calls) for the block mask.
        pv_target_l1: budget for mask and stage-2 skip together (>= target_l1; None:
            target_l1, so the skip may only use what the mask left).
        num_calls: calls of a callable (a list gives its own length).
        config: base config: its policy fields (min_seq_len, max_kept_fraction, backend,
            attention_sink) apply in the verification and in the saved calibration.
        method: "cdf" (default) or "topk"; grid: the candidates (`SearchGrid`).
        max_verify_rounds: verification runs (>= 2); the last-but-one back-off makes the
            failing heads dense.
        max_chunk_elements: memory bound of the search's largest tensor (float32 elements).
        progress: show progress bars.
        safety: the search aims at ``safety * target`` (and ``safety * pv_target``) so that
            calls it did not see have headroom; verification checks the target itself.
        per_call: every recorded call must meet the target on its own (default), not
            only all calls together (SpargeAttn's metric, which this implies). Attention
            patterns vary between calls; the worst recorded call is a better guide to an
            unseen one than the average.
        distributed: shard the calls over the processes of a ``torch.distributed`` run
            (None: when one is running or the launcher's environment says so).

    Returns:
        A `Calibration` (save it with ``.save(dir)``; apply it with
        ``enable_creative_sparse(pipe, calibration=cal_or_dir)``).

    Any active creative-sparse handle on ``pipe_or_model`` is disabled during the run and
    enabled again afterwards with its settings.

    Example: see the module docstring.
    """
    from .api import enable_creative_sparse, get_handle
    from .state import PatchOptions

    _check_budget(target_l1, pv_target_l1, max_verify_rounds, safety)
    grid = _make_grid(method, grid)
    base = config if config is not None else SparseAttentionConfig()
    if not isinstance(base, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(base).__name__}")
    total_calls, run_call = _call_runner(pipe_or_model, inputs_or_callable, num_calls)
    dist = _distributed(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    my_calls = list(range(rank, total_calls, world))

    previous = get_handle(pipe_or_model)
    restore = None
    if previous is not None:
        first = next(iter(previous.patches.values()), None)
        previous_cal = getattr(first, "calibration", None)
        if isinstance(previous_cal, _ComponentView):
            previous_cal = previous_cal.calibration
        restore = dict(config=previous.config, schedule=previous.schedule, options=previous.options,
                       calibration=previous_cal)
    recording = SparseAttentionConfig.dense(backend="sdpa", min_seq_len=0)
    handle = enable_creative_sparse(pipe_or_model, recording, options=PatchOptions())
    search = _Search(grid, float(target_l1), pv_target_l1, base, max_chunk_elements, float(safety),
                     per_call=bool(per_call))
    start = time.perf_counter()
    states = handle.layer_states()
    all_names = sorted(states)
    removers = []
    try:
        for name, state in states.items():
            def hook(call: Any, name: str = name) -> None:
                cfg = call.config
                opts = CallOptions(cfg.dense_prefix if cfg else 0, cfg.dense_suffix if cfg else 0, base.attention_sink)
                search.observe(name, call.inputs, opts, call.output)
                bar.update(1)

            removers.append(state.add_hook(hook))

        def run_pass(mode: str) -> list[str]:
            nonlocal bar
            label = {"mask": "mask search", "pv": "stage-2 search", "verify": "verification"}[mode]
            bar = _progress(desc=f"calibrate: {label}", unit=" attention calls", disable=not progress or rank != 0)
            try:
                with torch.no_grad():
                    for i in my_calls:
                        run_call(i)
            finally:
                bar.close()
            _merge(search, dist, all_names, mode)
            return [n for n in all_names if n in search.stats]

        bar = None
        rounds = _search(search, run_pass, max_verify_rounds)
    finally:
        for remove in removers:
            remove()
        handle.disable()
        if restore is not None:
            enable_creative_sparse(pipe_or_model, **restore)

    heads = handle_layer_heads(handle)
    layers = {}
    for name in all_names:
        if name in search.stats:
            layers[name] = search.layer_calibration(name)
        else:  # never called: no evidence that any block can go
            layers[name] = _dense_layer(heads.get(name) or 0, 0)
    models = list(dict.fromkeys(type(p.model).__name__ for p in handle.patches.values()))
    families = list(dict.fromkeys(p.family for p in handle.patches.values()))
    info = {"seconds": time.perf_counter() - start, "processes": world, "calls": total_calls, "verify_rounds": rounds,
            "safety": safety, "per_call": per_call, "pass_seconds": dict(search.seconds),
            "verify_backends": dict(search.backends)}
    return Calibration(model_class="+".join(models), family="+".join(families), method=grid.method,
                       target_l1=float(target_l1), pv_target_l1=pv_target_l1, config=base, grid=grid,
                       layers=layers, info=info)


def _merge(search: _Search, dist: Any, names: list[str], mode: str) -> None:
    """Add up the statistics of ``mode`` over the processes (layers in a fixed order;
    layers a process never saw get zero statistics of the agreed head count)."""
    if dist is None:
        return
    if mode == "mask":
        heads = torch.tensor([float(search.stats[n].heads) if n in search.stats else 0.0 for n in names])
        (heads,) = _all_reduce(dist, [heads], op="max")
        for n, h in zip(names, heads.tolist()):
            if h > 0:
                search.ensure(n, int(h))
    present = [n for n in names if n in search.stats]
    for op in ("sum", "max"):
        keys = [key for key in _PASS_TENSORS[mode] if (key in LayerStats.MAXIMA) == (op == "max")]
        merged = _all_reduce(dist, [search.stats[n].tensors[key] for n in present for key in keys], op=op)
        i = 0
        for n in present:
            for key in keys:
                search.stats[n].tensors[key] = merged[i]
                i += 1
