"""Shared plumbing of the per-family examples: arguments, timing, the with/without run.

Each example builds its pipeline (the real model from the Hub, or with ``--tiny`` a tiny
random one offline, without text encoders: prompt embeddings are random tensors), runs it
once without the plugin and once with it on the same seed, and prints both times and the
per-layer sparsity report.
"""

from __future__ import annotations

import argparse
import os
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


def compare(pipe: Any, call: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> Any:
    """Run ``call`` without and with the plugin; print both times and the report.
    Returns the plugin run's output."""
    config, schedule, options = plugin_settings(args)
    if args.tiny:  # warm up (first-call costs: kernel loading, allocator) outside the timings
        _timed(call, device)
    _, base_s = _timed(call, device)
    print(f"without plugin: {base_s:.2f} s", flush=True)

    handle = hcs.enable_creative_sparse(pipe, config, schedule=schedule, options=options)
    if args.tiny:
        _timed(call, device)
        handle.reset_stats()
    out, sparse_s = _timed(call, device)
    report = hcs.sparsity_report(pipe)
    hcs.disable_creative_sparse(pipe)
    print(f"with plugin:    {sparse_s:.2f} s  (speed-up {base_s / sparse_s:.2f}x, "
          f"{len(handle.layer_states())} patched layers)")
    print()
    print(report)
    return out


def generator(args: argparse.Namespace, device: torch.device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(args.seed)


def save_video(frames: Any, path: str, fps: int = 8) -> None:
    from diffusers.utils import export_to_video

    export_to_video(frames, path, fps=fps)
    print(f"saved {path}")
