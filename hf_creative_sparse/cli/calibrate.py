"""`hf-creative-sparse calibrate`: per-layer, per-head thresholds for a model to an error budget.

    hf-creative-sparse calibrate --example wan --tiny --target-l1 0.05 --out DIR
    accelerate launch --multi_gpu --num_processes 2 -m hf_creative_sparse calibrate --example wan --tiny --out DIR

``--tiny`` runs `hf_creative_sparse.testing.tiny_example`: an offline tiny pipeline
(random weights, CPU, seconds) from diffusers' test configs, with attention made local
(`testing.localise_attention`) so that a block mask can thin it as it thins a trained
model's, started from smooth latents. Without ``--tiny`` the pipeline is loaded with
``DiffusionPipeline.from_pretrained(--model)`` (network or a local folder) and called
with ``--prompt``s.

Under ``accelerate launch`` (or torchrun) the calls are sharded across the processes and
the statistics merged; process 0 writes the files. (On a machine without GPUs,
``accelerate launch --cpu`` starts several processes only through mpirun; its
``--multi_gpu`` launcher (torchrun) starts them with the gloo backend.)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import torch

from ..testing import TINY_FAMILIES, tiny_example
from ._args import fraction, int_at_least

HELP = "per-layer, per-head sparse-attention thresholds for a model to an error budget (saved as safetensors)"

#: Hub ids used without --tiny (one per family the plugin patches).
DEFAULT_MODELS = {"cogvideox": "THUDM/CogVideoX-2b", "flux": "black-forest-labs/FLUX.1-dev",
                  "hunyuan_video": "hunyuanvideo-community/HunyuanVideo", "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
DEFAULT_PROMPTS = ("A red fox runs through fresh snow at dawn, cinematic.",
                   "A lighthouse on a cliff in a storm, waves crashing, aerial shot.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", choices=TINY_FAMILIES, required=True,
                        help="model family to calibrate (its default Hub model without --tiny)")
    parser.add_argument("--tiny", action="store_true", help="offline tiny pipeline with random weights (CPU, seconds)")
    parser.add_argument("--model", default=None,
                        help="pipeline id or folder (without --tiny; default: the example's Hub model)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt of one recorded call (repeatable; default: two built-in prompts)")
    parser.add_argument("--out", required=True,
                        help="directory for creative_sparse_config.json and sparse_params.safetensors")
    parser.add_argument("--target-l1", type=fraction(low_open=True, high_open=True), default=0.05,
                        help="relative L1 budget per layer and head, in (0, 1)")
    parser.add_argument("--pv-target-l1", type=fraction(low_open=True, high_open=True),
                        default=None, help="budget with the stage-2 skip, >= --target-l1 (default: --target-l1)")
    parser.add_argument("--method", choices=("cdf", "topk"), default="cdf",
                        help="how a head's blocks are chosen: cumulative predicted mass (cdf) or a kept fraction")
    parser.add_argument("--num-calls", type=int_at_least(1), default=2,
                        help="recorded pipeline calls")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="denoising steps per call (default: 2 with --tiny, 10 otherwise)")
    parser.add_argument("--min-seq-len", type=int_at_least(0), default=None,
                        help="dense below this many keys (default: 0 with --tiny, the library default otherwise)")
    parser.add_argument("--device", default=None, help="default: cuda (this process's GPU) when available, else cpu")


def _real_example(args: argparse.Namespace, device: str) -> tuple[Any, Callable[[int], Any], int]:
    from diffusers import DiffusionPipeline

    model_id = args.model or DEFAULT_MODELS[args.example]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    prompts = tuple(args.prompt or DEFAULT_PROMPTS)
    steps = args.steps or 10

    def call(i: int) -> Any:
        generator = torch.Generator(device="cpu").manual_seed(i)
        return pipe(prompt=prompts[i % len(prompts)], num_inference_steps=steps, generator=generator,
                    output_type="latent")

    return pipe, call, max(args.num_calls, 1)


def run(args: argparse.Namespace) -> int:
    import torch.distributed

    from ..calibration.distributed import process_group

    started_here = torch.distributed.is_available() and not torch.distributed.is_initialized()
    dist = process_group(None)
    rank = dist.get_rank() if dist is not None else 0
    try:
        return _run(args, rank)
    finally:
        if started_here and dist is not None:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int) -> int:
    from ..calibration.runner import calibrate
    from ..ops.config import SparseAttentionConfig

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; give a directory (created if missing)")
    if args.pv_target_l1 is not None and args.pv_target_l1 < args.target_l1:
        raise ValueError(f"--pv-target-l1 ({args.pv_target_l1}) must be >= --target-l1 ({args.target_l1})")
    if args.tiny:
        if args.model:
            print("--model is ignored with --tiny", file=sys.stderr)
        pipe, call = tiny_example(args.example, steps=args.steps or 2)
        num_calls = args.num_calls
        min_seq_len = 0 if args.min_seq_len is None else args.min_seq_len
    else:
        device = args.device
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        pipe, call, num_calls = _real_example(args, device)
        min_seq_len = args.min_seq_len
    config = SparseAttentionConfig() if min_seq_len is None else SparseAttentionConfig(min_seq_len=min_seq_len)
    cal = calibrate(pipe, call, target_l1=args.target_l1, pv_target_l1=args.pv_target_l1, num_calls=num_calls,
                    config=config, method=args.method, progress=not args.no_progress)
    if rank == 0:
        cal.save(args.out)
        print(cal)
        print(f"\n{cal.info['seconds']:.1f} s on {cal.info['processes']} process(es); saved to {args.out}")
        print(f"use it with hcs.enable_creative_sparse(pipe, calibration={args.out!r}): it runs with the config "
              f"it was fitted with (min_seq_len {cal.config.min_seq_len}) unless you pass another")
    return 0
