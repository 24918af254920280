"""`hf-creative-sparse calibrate`: per-layer, per-head thresholds for a model to an error budget.

    hf-creative-sparse calibrate --example wan --tiny --target-l1 0.05 --out DIR
    accelerate launch --multi_gpu --num_processes 2 -m hf_creative_sparse calibrate --example wan --tiny --out DIR

``--tiny`` builds an offline tiny pipeline (random weights, CPU, seconds) from diffusers'
test configs. Random weights attend almost uniformly, and no block mask thins uniform
attention within a few percent of L1, while trained video and image transformers attend
locally, mostly through RoPE. The tiny examples therefore give each self-attention a
shared random q/k bias that dominates the (scaled-down) content term, tie the key
projection to the query projection and sharpen the q/k norms: the scores then follow
RoPE's relative positions, so every token attends mostly to its neighbours whatever the
input, and they start from smooth latents. Without ``--tiny`` the pipeline is loaded with
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

from ._args import fraction, int_at_least

HELP = "per-layer, per-head sparse-attention thresholds for a model to an error budget (saved as safetensors)"

#: Hub ids used without --tiny (one per family the plugin patches).
DEFAULT_MODELS = {"cogvideox": "THUDM/CogVideoX-2b", "flux": "black-forest-labs/FLUX.1-dev",
                  "hunyuan_video": "hunyuanvideo-community/HunyuanVideo", "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
DEFAULT_PROMPTS = ("A red fox runs through fresh snow at dawn, cinematic.",
                   "A lighthouse on a cliff in a storm, waves crashing, aerial shot.")
#: Multiplier of the tiny examples' q/k norm weights (sharper softmax, local attention).
TINY_SHARPNESS = 4.0
#: Multiplier of the tiny examples' q/k projection weights: the shared bias dominates, so
#: the scores follow RoPE's relative positions more than the content.
CONTENT_WEIGHT = 0.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", choices=sorted(DEFAULT_MODELS), required=True,
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


# -- the tiny examples ---------------------------------------------------------------------------


def _tie(to_q: torch.nn.Linear, to_k: torch.nn.Linear, norm_q: Any, norm_k: Any, sharpness: float) -> None:
    to_q.weight.mul_(CONTENT_WEIGHT)
    if to_q.bias is not None:
        g = torch.Generator().manual_seed(to_q.weight.shape[0])
        to_q.bias.copy_(torch.randn(to_q.bias.shape, generator=g))
    to_k.weight.copy_(to_q.weight)
    if to_q.bias is not None and to_k.bias is not None:
        to_k.bias.copy_(to_q.bias)
    if getattr(norm_q, "weight", None) is not None and getattr(norm_k, "weight", None) is not None:
        norm_k.weight.copy_(norm_q.weight)
        norm_q.weight.mul_(sharpness)
        norm_k.weight.mul_(sharpness)


def localise_attention(transformer: torch.nn.Module, sharpness: float = TINY_SHARPNESS) -> torch.nn.Module:
    """Make a random-weight transformer (any of the four families) attend locally (see the module
    docstring): q weights * `CONTENT_WEIGHT`, a seeded random q bias, k projections :=
    q projections, q/k norm weights * ``sharpness``."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if not hasattr(module, "to_q") or not hasattr(module, "to_k"):
                continue
            if name.endswith("attn2"):  # Wan's cross-attention keys are text: leave alone
                continue
            _tie(module.to_q, module.to_k, getattr(module, "norm_q", None), getattr(module, "norm_k", None), sharpness)
            if getattr(module, "add_q_proj", None) is not None and getattr(module, "add_k_proj", None) is not None:
                _tie(module.add_q_proj, module.add_k_proj, getattr(module, "norm_added_q", None),
                     getattr(module, "norm_added_k", None), sharpness)
    return transformer


def tiny_transformer(family: str) -> torch.nn.Module:
    """A tiny random transformer of ``family`` (a key of `DEFAULT_MODELS`; diffusers' test
    configs), localised, in eval mode (seeded)."""
    return localise_attention(tiny_random_transformer(family))


def tiny_random_transformer(family: str) -> torch.nn.Module:
    """`tiny_transformer` before localising: diffusers' test config with seeded random
    weights, in eval mode (the tests build on it too)."""
    torch.manual_seed(0)
    if family == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        # head_dim 16 (not the tests' 8) so the 3-D RoPE (t, h, w = 4, 6, 6 dims) applies
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=8, num_layers=1, sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    elif family == "hunyuan_video":
        from diffusers import HunyuanVideoTransformer3DModel

        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None)
    elif family == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    elif family == "flux":
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    else:
        raise ValueError(f"unknown tiny example {family!r}; choose one of {', '.join(sorted(DEFAULT_MODELS))}")
    return model.eval()


def smooth_noise(shape: tuple[int, ...], seed: int, coarse: int = 8) -> torch.Tensor:
    """Noise that varies slowly over the last two (spatial) dims: coarse noise upsampled
    by ``coarse`` plus 10% white noise (float32)."""
    g = torch.Generator().manual_seed(seed)
    *lead, h, w = shape
    planes = int(torch.tensor(lead).prod()) if lead else 1
    low = torch.randn(planes, 1, max(1, h // coarse), max(1, w // coarse), generator=g)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (up.view(*shape) + 0.1 * torch.randn(*shape, generator=g)).float()


def tiny_example(family: str, *, steps: int = 2) -> tuple[Any, Callable[[int], Any]]:
    """(pipeline, call) for the tiny example: ``call(i)`` runs the pipeline once with the
    i-th seeded prompt embeddings and smooth latents, without CFG, to latents.

    Sequence lengths: Wan 2 x 16 x 32 = 1024 video tokens; Flux 24 text + 1024 image tokens;
    CogVideoX 8 text + 3 x 16 x 16 = 776; HunyuanVideo 2 x 16 x 32 = 1024 video + 20 text.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_transformer(family)
    pipe: Any
    if family == "cogvideox":
        from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=CogVideoXDDIMScheduler())

        def call(i: int) -> Any:
            g = torch.Generator().manual_seed(1000 + i)
            latents = smooth_noise((1, 3, 4, 32, 32), seed=i)  # (batch, frames, channels, h, w)
            return pipe(prompt_embeds=torch.randn(1, 8, 8, generator=g), height=256, width=256, num_frames=9,
                        latents=latents, guidance_scale=1.0, num_inference_steps=steps, output_type="latent",
                        return_dict=False)[0]
    elif family == "hunyuan_video":
        from diffusers import HunyuanVideoPipeline

        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                    tokenizer_2=None)

        def call(i: int) -> Any:
            g = torch.Generator().manual_seed(1000 + i)
            return pipe(prompt_embeds=torch.randn(1, 20, 16, generator=g),
                        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                        prompt_attention_mask=torch.ones(1, 20, dtype=torch.long), height=128, width=256,
                        num_frames=5, latents=smooth_noise((1, 4, 2, 16, 32), seed=i), num_inference_steps=steps,
                        output_type="latent", return_dict=False)[0]
    elif family == "wan":
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler())

        def call(i: int) -> Any:
            g = torch.Generator().manual_seed(1000 + i)
            return pipe(prompt_embeds=torch.randn(1, 12, 16, generator=g), height=256, width=512, num_frames=5,
                        latents=smooth_noise((1, 4, 2, 32, 64), seed=i), guidance_scale=1.0,
                        num_inference_steps=steps, output_type="latent", return_dict=False)[0]
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)

        def call(i: int) -> Any:
            g = torch.Generator().manual_seed(1000 + i)
            latents = pipe._pack_latents(smooth_noise((1, 1, 64, 64), seed=i), 1, 1, 64, 64)
            return pipe(prompt_embeds=torch.randn(1, 24, 32, generator=g),
                        pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=512, width=512,
                        latents=latents, num_inference_steps=steps, output_type="latent", return_dict=False)[0]
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


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
