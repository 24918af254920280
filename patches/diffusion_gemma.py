"""Context KV retention for transformers' DiffusionGemma (block diffusion).

DiffusionGemma's encoder writes the context (prompt plus accepted canvases) into a KV
cache; its decoder then refines a canvas of new tokens over many denoising steps, each
step attending bidirectionally over the *whole* cached context plus the canvas
(``DiffusionGemmaDecoderTextAttention``: ``cat(cache, canvas)`` then the
``AttentionInterface`` function). With retention, each decoder attention layer:

* runs the first ``delay_step`` steps of a canvas unchanged (the original forward:
  bit-identical);
* at step ``delay_step`` scores the cached keys by the canvas queries' attention
  (`hf_creative_sparse.integrations.retention.saliency_scores`), gathers the retained share into new,
  smaller K/V tensors (optionally moving the full ones to ``offload_to``), and attends to
  ``cat(retained, canvas)`` through the same attention function;
* reuses that compact K/V for every later step of the canvas. The encoder pre-hook marks
  the canvas boundary (the accepted canvas is appended to the *full* cache, restored
  first if it was offloaded), so the next canvas selects afresh.

Per-prompt configs: ``retention=[cfg_row0, cfg_row1, ...]``. Rows whose phase is dense
come from the original forward over the whole batch (exact); only the sparse rows are
recomputed on their retained context, grouped by retained size.

Only DynamicCache (the default of ``generate``) is supported: a static cache is compiled
by ``generate`` into a graph that these Python hooks cannot enter.

Example:
    >>> import hf_creative_sparse as hcs
    >>> handle = hcs.enable_creative_sparse(model, retention=hcs.RetentionConfig(retention_ratio=0.5))  # doctest: +SKIP
    >>> out = model.generate(input_ids=ids, max_new_tokens=64)                                          # doctest: +SKIP
    >>> print(hcs.sparsity_report(model))   # per layer: retained tokens, steps, MB saved  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hf_creative_sparse.integrations.enable import HANDLE_ATTR, CreativeSparseHandle, _set_handle, get_handle
from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.creative.control import SparsityController, current_sparsity, set_current_sparsity
from hf_creative_sparse.integrations.retention import (RetentionConfig, as_retention_configs, compact_kv, saliency_scores,
                                          select_retained)
from hf_creative_sparse.integrations.state import LayerState, PatchOptions, StepClock

#: Model classes (or bases) retention installs on.
MODEL_CLASSES: tuple[str, ...] = ("DiffusionGemmaForBlockDiffusion", "DiffusionGemmaModel")
DECODER_ATTENTION = "DiffusionGemmaDecoderTextAttention"
ENCODER_MODEL = "DiffusionGemmaEncoderModel"
DECODER_MODEL = "DiffusionGemmaDecoderModel"


def _is(module: Any, names: tuple[str, ...] | str) -> bool:
    names = (names,) if isinstance(names, str) else names
    return any(k.__name__ in names for k in type(module).__mro__)


def find_model(model_or_pipe: Any) -> torch.nn.Module:
    """The DiffusionGemma model of ``model_or_pipe`` (a model, or a pipeline holding one as
    a component, e.g. diffusers' DiffusionGemmaPipeline).

    Raises:
        ValueError: naming ``model_or_pipe`` and the supported classes.
    """
    if isinstance(model_or_pipe, torch.nn.Module) and _is(model_or_pipe, MODEL_CLASSES):
        return model_or_pipe
    components = getattr(model_or_pipe, "components", None)
    if isinstance(components, dict):
        for module in components.values():
            if isinstance(module, torch.nn.Module) and _is(module, MODEL_CLASSES):
                return module
    raise ValueError(f"retention= supports DiffusionGemma ({', '.join(MODEL_CLASSES)}, or a pipeline holding one); "
                     f"got model_or_pipe={type(model_or_pipe).__name__}. LLaDA2 (diffusers' LLaDA2Pipeline) is not "
                     "supported: its model is not part of transformers and loads only with remote code, whose "
                     "attention this package cannot patch reliably")


def project_qkv(module: torch.nn.Module, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The canvas q, k, v of a DiffusionGemma decoder attention layer, (B, H, Nc, D) each:
    the same operations, in the same order, as ``DiffusionGemmaDecoderTextAttention.forward``
    before it reads the cache (k doubles as v on layers without ``v_proj``)."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import apply_rotary_pos_emb

    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    cos, sin = position_embeddings
    q = apply_rotary_pos_emb(module.q_norm(module.q_proj(hidden_states).view(shape)), cos, sin, unsqueeze_dim=2)
    k_raw = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape) if module.v_proj is not None else k_raw
    k = apply_rotary_pos_emb(module.k_norm(k_raw), cos, sin, unsqueeze_dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), module.v_norm(v).transpose(1, 2)


def context_attendable(attention_mask: Any, batch: int, context: int, total: int) -> torch.Tensor | None:
    """bool (B, context): which cached context keys the canvas may attend, from the layer's
    4D mask (bool: True attends; additive float: 0 attends), or None for no mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError("retention needs the decoder's attention mask as a 4D tensor (or None), got "
                         f"{type(attention_mask).__name__}")
    if attention_mask.shape[-1] != total:
        raise ValueError(f"the decoder mask covers {attention_mask.shape[-1]} keys, expected cache + canvas = {total} "
                         "(retention supports DynamicCache only)")
    row = attention_mask[:, 0, 0, :context]
    row = row if row.dtype == torch.bool else row == 0
    return row.expand(batch, context)


@dataclass
class LayerStats:
    """What one decoder attention layer did since enabling (or `reset_stats`)."""

    name: str
    layer_type: str
    dense_steps: int = 0
    sparse_steps: int = 0
    selections: int = 0
    context_tokens: float = 0.0  # at the last selection, attendable tokens, mean over the selecting rows
    retained_tokens: float = 0.0  # at the last selection, mean over the selecting rows
    full_bytes: int = 0  # K+V bytes of the full context of the rows selecting, last selection
    kept_bytes: int = 0  # K+V bytes of their compact copy
    offloaded_bytes: int = 0  # K+V bytes moved to offload_to at the last offload
    sparse_time_s: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"layer": self.name, "type": self.layer_type, "dense_steps": self.dense_steps,
                "sparse_steps": self.sparse_steps, "selections": self.selections,
                "context_tokens": self.context_tokens, "retained_tokens": self.retained_tokens,
                "retained_share": (self.retained_tokens / self.context_tokens) if self.context_tokens else float("nan"),
                "memory_saved_mb": (self.full_bytes - self.kept_bytes) / 2**20,
                "offloaded_mb": self.offloaded_bytes / 2**20, "sparse_time_ms": 1e3 * self.sparse_time_s}


@dataclass
class RetentionReport:
    """Per decoder attention layer: retained tokens, dense and sparse steps, memory saved
    (full context K+V bytes minus the compact copy's, at the last selection). ``print`` it."""

    rows: list[dict[str, Any]]

    @property
    def memory_saved_mb(self) -> float:
        return sum(r["memory_saved_mb"] for r in self.rows)

    def table(self) -> str:
        header = ("layer", "type", "dense", "sparse", "context", "retained", "share", "saved MB", "offloaded MB")
        lines = [header]
        for r in self.rows:
            lines.append((r["layer"], r["type"], str(r["dense_steps"]), str(r["sparse_steps"]),
                          f"{r['context_tokens']:.1f}",
                          f"{r['retained_tokens']:.1f}", f"{r['retained_share']:.3f}", f"{r['memory_saved_mb']:.2f}",
                          f"{r['offloaded_mb']:.2f}"))
        lines.append(("total", "", str(sum(r["dense_steps"] for r in self.rows)),
                      str(sum(r["sparse_steps"] for r in self.rows)), "", "", "", f"{self.memory_saved_mb:.2f}",
                      f"{sum(r['offloaded_mb'] for r in self.rows):.2f}"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        out = []
        for n, row in enumerate(lines):
            cells = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            out.append("  ".join(cells).rstrip())
            if n == 0 or n == len(lines) - 2:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Offloaded:
    layer: Any  # the cache layer the tensors belong to (restored there, whatever cache a call passes)
    keys: torch.Tensor
    values: torch.Tensor
    device: torch.device


class RetentionRuntime:
    """The state shared by the hooks of one patched model: the configs, the canvas and
    step counters, each layer's compact K/V and statistics."""

    def __init__(self, model: torch.nn.Module, configs: RetentionConfig | list[RetentionConfig]) -> None:
        self.model = model
        self.configs = configs
        self.step = -1  # denoising step within the current canvas (0-based once the decoder runs)
        self.canvas = 0
        self._canvas_key: tuple[int, int] | None = None
        self.stores: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> row -> (k, v)
        # layer -> (rows, canvas length, selection epoch, keys, values): the rows' retained K/V
        # followed by a slot for the canvas's own keys, written in place at every step
        self.workspaces: dict[int, tuple[tuple[int, ...], int, int, torch.Tensor, torch.Tensor]] = {}
        self.epochs: dict[int, int] = {}  # layer -> selections so far (a new one invalidates the workspace)
        self.indices: dict[int, dict[int, torch.Tensor]] = {}  # layer -> row -> retained positions (S, R)
        self.offloaded: dict[int, _Offloaded] = {}
        self.stats: dict[int, LayerStats] = {}
        self.controller = SparsityController()
        self.cache: Any = None

    # -- configs ---------------------------------------------------------------------------
    def row_configs(self, batch: int) -> list[RetentionConfig]:
        if isinstance(self.configs, list):
            if len(self.configs) != batch:
                raise ValueError(f"retention has {len(self.configs)} configs but the batch has {batch} rows: give "
                                 "one RetentionConfig per batch row, or a single config for all")
            return self.configs
        return [self.configs] * batch

    def ratio(self, cfg: RetentionConfig) -> float:
        """The ratio of a selection now: the config's, times k_attn(s) when a dial is published."""
        s = current_sparsity()
        if cfg.follow_dial and s is not None:
            return max(1e-6, cfg.retention_ratio * self.controller.attention_budget(s))
        return cfg.retention_ratio

    # -- canvas boundaries ---------------------------------------------------------------------
    def new_canvas(self) -> None:
        self.restore_all()
        self.clear_stores()
        self.indices.clear()
        self.step = -1
        self.canvas += 1

    def on_encoder(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the encoder appends to the cache: the full cache back, a new canvas next."""
        self.new_canvas()
        self._canvas_key = None

    def on_decoder(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each decoder pass (one denoising step): count the step; a different cache
        or cache length (no encoder pass seen) also starts a new canvas."""
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        ids = kwargs.get("decoder_input_ids", args[0] if args else None)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("retention supports DynamicCache only (generate's default); got a static cache "
                             f"({type(cache).__name__})")
        if isinstance(ids, torch.Tensor):
            self.row_configs(ids.shape[0])  # checks the per-row list against the batch
        key = (id(cache), cache.get_seq_length() if cache is not None else 0)
        if key != self._canvas_key:
            if self._canvas_key is not None:
                self.new_canvas()
            self._canvas_key = key
        self.cache = cache
        self.step += 1

    def clear_stores(self) -> None:
        """Free the compact K/V of every layer (and their workspaces)."""
        self.stores.clear()
        self.workspaces.clear()

    def workspace(self, idx: int, store: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: list[int],
                  canvas: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys and values [len(rows), Hkv, kept + canvas, D] for the decoder's attention: the
        rows' retained context, then ``canvas`` slots the caller fills with this step's keys.

        Why: concatenating the retained context with the canvas at every denoising step
        copies the retained K/V once per step (and stacking several rows once more), as many
        bytes as the attention then reads. Built once per selection and canvas length; the
        rows' store entries become views into it, so the retained K/V are held once.
        """
        epoch = self.epochs.get(idx, 0)
        ws = self.workspaces.get(idx)
        key = tuple(rows)
        if ws is not None and ws[0] == key and ws[1] == canvas and ws[2] == epoch:
            return ws[3], ws[4], ws[3].shape[2] - canvas
        k0 = store[rows[0]][0]
        kept = k0.shape[1]
        shape = (len(rows), k0.shape[0], kept + canvas, k0.shape[2])
        keys, values = k0.new_empty(shape), k0.new_empty(shape)
        for i, b in enumerate(rows):
            keys[i, :, :kept].copy_(store[b][0])
            values[i, :, :kept].copy_(store[b][1])
            store[b] = (keys[i, :, :kept], values[i, :, :kept])
        self.workspaces[idx] = (key, canvas, epoch, keys, values)
        return keys, values, kept

    # -- offloading --------------------------------------------------------------------------
    def ensure_full(self, layer_idx: int) -> None:
        """Bring layer ``layer_idx``'s full context KV back to its device if it was offloaded."""
        entry = self.offloaded.pop(layer_idx, None)
        if entry is not None:
            entry.layer.keys = entry.keys.to(entry.device, non_blocking=True)
            entry.layer.values = entry.values.to(entry.device, non_blocking=True)

    def offload(self, layer_idx: int, cache: Any, device: str) -> None:
        layer = cache.layers[layer_idx]
        target, here = torch.device(device), layer.keys.device
        if layer_idx in self.offloaded or (target.type == here.type and target.index in (None, here.index)):
            return
        pin = target.type == "cpu" and layer.keys.is_cuda
        moved = []
        for t in (layer.keys, layer.values):
            host = torch.empty(t.shape, dtype=t.dtype, device=target, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            moved.append(host)
        self.offloaded[layer_idx] = _Offloaded(layer, moved[0], moved[1], layer.keys.device)
        self.stats[layer_idx].offloaded_bytes = sum(t.numel() * t.element_size() for t in moved)
        layer.keys, layer.values = moved  # the device copies are freed here

    def restore_all(self) -> None:
        for idx in list(self.offloaded):
            self.ensure_full(idx)

    # -- the attention layer -------------------------------------------------------------------
    def attention(self, module: torch.nn.Module, original: Callable[..., Any], hidden_states: torch.Tensor,
                  position_embeddings: Any = None, attention_mask: Any = None, cache: Any = None,
                  **kwargs: Any) -> Any:
        idx = module.layer_idx
        stats = self.stats[idx]
        batch = hidden_states.shape[0]
        configs = self.row_configs(batch)
        phases = [cfg.phase(max(self.step, 0)) for cfg in configs]
        sparse_rows = [b for b, p in enumerate(phases) if p != "dense"]
        if cache is None or not sparse_rows:
            stats.dense_steps += 1
            self.ensure_full(idx)
            return original(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)

        start = time.perf_counter()
        dense_rows = [b for b, p in enumerate(phases) if p == "dense"]
        out = None
        if dense_rows:  # exact for them: the original forward over the whole batch
            self.ensure_full(idx)
            out = original(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)[0].clone()
        every_row = len(sparse_rows) == batch  # the common case: no index tensors (no host-device copies)
        cos, sin = position_embeddings
        hidden = hidden_states
        if not every_row:
            rows = torch.tensor(sparse_rows, device=hidden_states.device)
            hidden = hidden_states.index_select(0, rows)
            if cos.shape[0] == batch and batch > 1:
                cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
        q, k_new, v_new = project_qkv(module, hidden, (cos, sin))

        store = self.stores.setdefault(idx, {})
        selecting = [b for b in sparse_rows if phases[b] == "select" or b not in store]
        if selecting:
            self._select(module, idx, cache, attention_mask, q, k_new, sparse_rows, selecting, configs, store, batch)

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.diffusion_gemma.modeling_diffusion_gemma import eager_attention_forward

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
        groups: dict[tuple[int, ...], list[int]] = {}
        for pos, b in enumerate(sparse_rows):
            groups.setdefault(tuple(store[b][0].shape), []).append(pos)
        single_group = len(groups) == 1
        for positions in groups.values():
            whole = len(positions) == q.shape[0]
            sel = None if whole else torch.tensor(positions, device=hidden_states.device)
            pick = (lambda t: t) if sel is None else (lambda t, sel=sel: t.index_select(0, sel))
            if single_group:  # the common case: one workspace, the canvas's keys written in place
                keys, values, kept = self.workspace(idx, store, [sparse_rows[p] for p in positions], k_new.shape[2])
                keys[:, :, kept:].copy_(pick(k_new))
                values[:, :, kept:].copy_(pick(v_new))
            else:  # rows retaining different counts: one concatenation per group
                kept_k = torch.stack([store[sparse_rows[p]][0] for p in positions])
                kept_v = torch.stack([store[sparse_rows[p]][1] for p in positions])
                keys = torch.cat([kept_k, pick(k_new)], 2)
                values = torch.cat([kept_v, pick(v_new)], 2)
            # No mask: retained keys are attendable by construction and the canvas always is.
            # No sliding window either: compacted positions are not contiguous, and on the
            # decoder every layer attends to all it holds (its mask is bidirectional).
            attn, _ = attend(module, pick(q), keys, values, None, dropout=0.0,
                             scaling=module.scaling, sliding_window=None, is_causal=False)
            o = module.o_proj(attn.reshape(*attn.shape[:2], -1).contiguous())
            if out is None and every_row and whole:
                out = o
                continue
            if out is None:
                out = o.new_empty(batch, *o.shape[1:])
            out[[sparse_rows[p] for p in positions]] = o

        offload_to = {cfg.offload_to for cfg in configs}
        if not dense_rows and len(offload_to) == 1 and None not in offload_to:
            self.offload(idx, cache, offload_to.pop())
        stats.sparse_steps += 1
        stats.sparse_time_s += time.perf_counter() - start
        return out, None

    def _select(self, module: torch.nn.Module, idx: int, cache: Any, attention_mask: Any, q: torch.Tensor,
                k_new: torch.Tensor, sparse_rows: list[int], selecting: list[int], configs: list[RetentionConfig],
                store: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int) -> None:
        self.ensure_full(idx)
        layer = cache.layers[idx]
        full_k, full_v = layer.keys, layer.values
        context = full_k.shape[2]
        attendable = context_attendable(attention_mask, batch, context, context + q.shape[2])
        stats = self.stats[idx]
        kept, full_bytes, kept_bytes, valid = 0, 0, 0, 0
        for b in selecting:
            cfg = configs[b]
            pos = sparse_rows.index(b)
            ok = None if attendable is None else attendable[b:b + 1]
            n_valid = context if ok is None else int(ok.sum())
            count = cfg.retained_count(n_valid, self.ratio(cfg))
            if count == 0:
                raise ValueError(f"retention: batch row {b} has no attendable context token at layer {idx}")
            scores = saliency_scores(q[pos:pos + 1], full_k[b:b + 1], head_select=cfg.head_select,
                                     pool_kernel=cfg.pool_kernel, attendable=ok, rule=cfg.saliency,
                                     canvas_keys=k_new[pos:pos + 1], scaling=module.scaling)
            index = select_retained(scores, count)
            k_c, v_c = compact_kv(full_k[b:b + 1], full_v[b:b + 1], index)
            store[b] = (k_c[0], v_c[0])
            self.indices.setdefault(idx, {})[b] = index[0]
            valid += n_valid
            elt = full_k.element_size()
            full_bytes += 2 * full_k[b].numel() * elt
            kept_bytes += 2 * k_c.numel() * elt
            kept += count
        self.epochs[idx] = self.epochs.get(idx, 0) + 1
        stats.selections += 1
        stats.context_tokens = valid / len(selecting)
        stats.retained_tokens = kept / len(selecting)
        stats.full_bytes, stats.kept_bytes = full_bytes, kept_bytes

    def report(self) -> RetentionReport:
        return RetentionReport([s.row() for _, s in sorted(self.stats.items())])

    def reset_stats(self) -> None:
        for idx, s in self.stats.items():
            self.stats[idx] = LayerStats(s.name, s.layer_type)


@dataclass(repr=False)
class RetentionHandle(CreativeSparseHandle):
    """What ``enable_creative_sparse(model, retention=...)`` installed; `disable` restores
    the model exactly. `report` gives the per-layer retention table."""

    runtime: RetentionRuntime | None = None

    def __repr__(self) -> str:
        return (f"RetentionHandle({type(self.target).__name__}; {len(self.runtime.stats) if self.runtime else 0} "
                f"decoder attention layers; {'active' if self.active else 'disabled'})")

    def layer_states(self) -> dict[str, LayerState]:
        return {}

    def report(self) -> RetentionReport:  # type: ignore[override]
        return self.runtime.report()

    def reset_stats(self) -> None:
        self.runtime.reset_stats()


def enable_retention(model_or_pipe: Any, retention: Any) -> RetentionHandle:
    """Install context KV retention on a DiffusionGemma model or pipeline.

    Args:
        model_or_pipe: ``DiffusionGemmaForBlockDiffusion`` / ``DiffusionGemmaModel``, or a
            pipeline with one among its components (diffusers' ``DiffusionGemmaPipeline``).
        retention: a `RetentionConfig`, a ratio in (0, 1], a dict of its fields, or a list
            with one of those per batch row (per-prompt configs).

    Returns:
        A `RetentionHandle` (``disable_creative_sparse`` / ``sparsity_report`` work on it).

    Raises:
        ValueError / TypeError naming the bad argument; the model is left untouched.
    """
    configs = as_retention_configs(retention)
    model = find_model(model_or_pipe)
    attention = [(name, m) for name, m in model.named_modules() if _is(m, DECODER_ATTENTION)]
    encoders = [m for m in model.modules() if _is(m, ENCODER_MODEL)]
    decoders = [m for m in model.modules() if _is(m, DECODER_MODEL)]
    if not attention or len(encoders) != 1 or len(decoders) != 1:
        raise ValueError(f"model_or_pipe: {type(model).__name__} has no DiffusionGemma decoder attention / encoder / "
                         "decoder to patch")
    for previous in {id(h): h for h in (get_handle(model_or_pipe), get_handle(model)) if h is not None}.values():
        previous.disable()

    runtime = RetentionRuntime(model, configs)
    handle = RetentionHandle(target=model_or_pipe, patches={}, clock=StepClock(None),
                             config=SparseAttentionConfig(), schedule=None, options=PatchOptions(), runtime=runtime)
    try:
        for name, module in attention:
            runtime.stats[module.layer_idx] = LayerStats(name, str(module.layer_type))
            original = module.forward
            had_own = "forward" in vars(module)

            def forward(*args: Any, _m: torch.nn.Module = module, _o: Callable[..., Any] = original,
                        **kwargs: Any) -> Any:
                return runtime.attention(_m, _o, *args, **kwargs)

            module.forward = forward

            def undo(_m: torch.nn.Module = module, _o: Callable[..., Any] = original, _own: bool = had_own) -> None:
                if _own:
                    _m.forward = _o
                else:
                    del _m.forward

            handle._undo.append(undo)
        handle._undo.append(encoders[0].register_forward_pre_hook(runtime.on_encoder, with_kwargs=True).remove)
        handle._undo.append(decoders[0].register_forward_pre_hook(runtime.on_decoder, with_kwargs=True).remove)
        handle._undo.append(runtime.restore_all)  # runs first on disable: the cache comes back whole
        if callable(getattr(model, "generate", None)):
            original_generate = model.generate
            had_generate = "generate" in vars(model)

            def generate(*args: Any, **kwargs: Any) -> Any:
                dial = current_sparsity()
                try:
                    return original_generate(*args, **kwargs)
                finally:  # the returned cache is whole, the compact copies are freed, and a dial
                    runtime.restore_all()  # published by this call's processor does not outlive it
                    runtime.clear_stores()
                    set_current_sparsity(dial)

            generate.__wrapped__ = original_generate  # type: ignore[attr-defined]
            generate.__doc__ = original_generate.__doc__
            model.generate = generate
            handle._undo.append(lambda: setattr(model, "generate", original_generate) if had_generate
                                else delattr(model, "generate"))
        _set_handle(model, handle)
        if model_or_pipe is not model:
            _set_handle(model_or_pipe, handle)
    except BaseException:
        handle.disable()
        raise
    return handle


__all__ = ["enable_retention", "RetentionHandle", "RetentionReport", "RetentionRuntime", "project_qkv",
           "find_model", "HANDLE_ATTR"]
