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

import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.config import SparseAttentionConfig
from ..ops.inputs import attention_inputs
from .distributed import process_group
from .passes import CalibrationSearch, merge_over_processes, run_passes
from .search import DEFAULT_MAX_CHUNK_ELEMENTS, CallOptions, SearchGrid
from .result import Calibration, ComponentView, LayerCalibration, dense_layer, handle_layer_heads

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
    search = CalibrationSearch(grid, float(target_l1), pv_target_l1, base, max_chunk_elements, float(safety),
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

        rounds_used = max(rounds_used, run_passes(search, run_pass, max_verify_rounds))
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
    from ..integrations.enable import enable_creative_sparse, get_handle
    from ..integrations.state import PatchOptions

    _check_budget(target_l1, pv_target_l1, max_verify_rounds, safety)
    grid = _make_grid(method, grid)
    base = config if config is not None else SparseAttentionConfig()
    if not isinstance(base, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(base).__name__}")
    total_calls, run_call = _call_runner(pipe_or_model, inputs_or_callable, num_calls)
    dist = process_group(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    my_calls = list(range(rank, total_calls, world))

    previous = get_handle(pipe_or_model)
    restore = None
    if previous is not None:
        first = next(iter(previous.patches.values()), None)
        previous_cal = getattr(first, "calibration", None)
        if isinstance(previous_cal, ComponentView):
            previous_cal = previous_cal.calibration
        restore = dict(config=previous.config, schedule=previous.schedule, options=previous.options,
                       calibration=previous_cal)
    recording = SparseAttentionConfig.dense(backend="sdpa", min_seq_len=0)
    handle = enable_creative_sparse(pipe_or_model, recording, options=PatchOptions())
    search = CalibrationSearch(grid, float(target_l1), pv_target_l1, base, max_chunk_elements, float(safety),
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
            merge_over_processes(search, dist, all_names, mode)
            return [n for n in all_names if n in search.stats]

        bar = None
        rounds = run_passes(search, run_pass, max_verify_rounds)
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
            layers[name] = dense_layer(heads.get(name) or 0, 0)
    models = list(dict.fromkeys(type(p.model).__name__ for p in handle.patches.values()))
    families = list(dict.fromkeys(p.family for p in handle.patches.values()))
    info = {"seconds": time.perf_counter() - start, "processes": world, "calls": total_calls, "verify_rounds": rounds,
            "safety": safety, "per_call": per_call, "pass_seconds": dict(search.seconds),
            "verify_backends": dict(search.backends)}
    return Calibration(model_class="+".join(models), family="+".join(families), method=grid.method,
                       target_l1=float(target_l1), pv_target_l1=pv_target_l1, config=base, grid=grid,
                       layers=layers, info=info)
