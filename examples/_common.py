"""Shared plumbing of the per-family examples: arguments, timing, the with/without run.

Each example builds its pipeline (the real model from the Hub, or with ``--tiny`` a tiny
random one offline, without text encoders: prompt embeddings are random tensors), runs it
without the plugin, with the plugin in dense mode (attention through SDPA, to time the
attention layers alone) and with the plugin as configured, on the same seed, and prints
the attention time and the whole call's time separately, then the per-layer report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_creative_sparse as hcs  # noqa: E402


def parse_args(description: str, *, model_id: str, height: int, width: int, frames: int | None,
               steps: int) -> argparse.Namespace:
    """Common flags; the defaults are the real model's usual ones."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny random model, offline, CPU friendly")
    p.add_argument("--model-id", default=model_id, help=f"Hub id of the pipeline (default {model_id})")
    p.add_argument("--prompt", default="A red fox running through fresh snow at sunrise, cinematic")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {steps}; 2 with --tiny)")
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--width", type=int, default=width)
    if frames is not None:
        p.add_argument("--frames", type=int, default=frames)
    p.add_argument("--topk", type=float, default=None,
                   help="kept fraction of key blocks (default: the cdf threshold; 0.5 with --tiny)")
    p.add_argument("--schedule", action="store_true", help="two-stage schedule: diverge (s=0.7), then refine (s=0.3)")
    p.add_argument("--dense-steps", type=int, default=0, help="first denoising steps run dense")
    p.add_argument("--mask-refresh", type=int, default=1, help="predict the block mask every k steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() (real models)")
    p.add_argument("--output", default=None, help="save the result here (real models)")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.tiny else steps)
    return args


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def plugin_settings(args: argparse.Namespace) -> tuple[hcs.SparseAttentionConfig, Any, hcs.PatchOptions]:
    """(config, schedule, options) from the flags. Tiny random models have short sequences
    and no self-similar blocks, so ``--tiny`` sets min_seq_len=0 and simthreshd1=-1."""
    kwargs: dict[str, Any] = {}
    if args.topk is not None or args.tiny:
        kwargs["topk"] = args.topk if args.topk is not None else 0.5
    if args.tiny:
        kwargs.update(min_seq_len=0, simthreshd1=-1.0)
    config = hcs.SparseAttentionConfig(**kwargs)
    schedule = hcs.TwoStageSchedule(diverge=0.7, refine=0.3, switch=0.5) if args.schedule else None
    controller = None
    if args.schedule and args.tiny:
        controller = hcs.SparsityController(hcs.SparsityConfig(simthreshd1=-1.0))
    options = hcs.PatchOptions(dense_steps=args.dense_steps, mask_refresh=args.mask_refresh, controller=controller)
    return config, schedule, options


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _attention_run(pipe: Any, call: Callable[[], Any], device: torch.device, config: hcs.SparseAttentionConfig,
                   schedule: Any, options: hcs.PatchOptions, repeats: int) -> tuple[Any, float, hcs.integrations.enable.SparsityReport]:
    """Run ``call`` ``repeats`` times with the plugin (after one untimed warm-up call on
    tiny models): the output, the median whole-call seconds and the report of one call
    (its ``time_ms`` is the patched attention layers' own time)."""
    handle = hcs.enable_creative_sparse(pipe, config, schedule=schedule, options=options)
    try:
        if repeats > 1:
            _timed(call, device)
        times, out, report = [], None, None
        for _ in range(repeats):
            handle.reset_stats()
            out, seconds = _timed(call, device)
            times.append(seconds)
            report = hcs.sparsity_report(pipe)
    finally:
        hcs.disable_creative_sparse(pipe)
    return out, statistics.median(times), report


def compare(pipe: Any, call: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> Any:
    """Run ``call`` without the plugin, with it in dense mode (every layer through SDPA,
    to time attention alone) and with it as configured; print the attention time and the
    whole call's time separately, and the per-layer report. Returns the plugin run's
    output.

    The whole call includes the text encoder, the VAE decode and everything else that the
    plugin does not touch, so its ratio understates the attention speed-up; attention time
    is the sum of the patched layers' times from `sparsity_report` (on CUDA the layers'
    host time: the calls run asynchronously, so compare whole-call times there). Tiny
    models repeat each run 3 times (median) after a warm-up.
    """
    config, schedule, options = plugin_settings(args)
    repeats = 3 if args.tiny else 1
    if args.tiny:  # warm up (first-call costs: kernel loading, allocator) outside the timings
        _timed(call, device)
    base_s = statistics.median(_timed(call, device)[1] for _ in range(repeats))
    print(f"without plugin: {base_s:.2f} s per call", flush=True)
    dense_config = hcs.SparseAttentionConfig.dense(min_seq_len=0, backend="sdpa")
    _, dense_s, dense_report = _attention_run(pipe, call, device, dense_config, None, hcs.PatchOptions(), repeats)
    out, sparse_s, report = _attention_run(pipe, call, device, config, schedule, options, repeats)
    attn_dense, attn_sparse = dense_report.time_ms, report.time_ms
    print(f"attention ({len(report.rows)} patched layers): dense SDPA {attn_dense:.0f} ms -> plugin "
          f"{attn_sparse:.0f} ms per call ({attn_dense / attn_sparse:.2f}x), kept fraction "
          f"{report.mean_kept_fraction:.2f}")
    print(f"whole call: {base_s:.2f} s -> {sparse_s:.2f} s ({base_s / sparse_s:.2f}x; attention is "
          f"{100 * attn_dense / 1000 / max(dense_s, 1e-9):.0f}% of the dense call)")
    if args.tiny:
        print("(tiny model: a few hundred tokens per sequence, so attention is a small share of the call and "
              "block prediction costs about what skipping blocks saves: expect no speed-up here; sparsity pays "
              "at the real models' 17k-33k tokens)")
    print()
    print(report)
    return out


def generator(args: argparse.Namespace, device: torch.device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(args.seed)


def save_video(frames: Any, path: str, fps: int = 8) -> None:
    from diffusers.utils import export_to_video

    export_to_video(frames, path, fps=fps)
    print(f"saved {path}")
