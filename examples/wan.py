#!/usr/bin/env python3
"""Wan 2.1 text-to-video with creative sparse attention.

    python examples/wan.py                    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers on a GPU
    python examples/wan.py --tiny             # tiny random Wan, offline, CPU

Only the video self-attention (``attn1``) is patched; the cross-attention to the text
keeps diffusers' processor. Classifier-free guidance runs the transformer twice per
step; the plugin counts steps from the scheduler, so the schedule and ``--dense-steps``
follow the denoising loop. Prints the time with and without the plugin and the report.
"""

from __future__ import annotations

import torch

from _common import compare, device_and_dtype, generator, parse_args, save_video

from hf_creative_sparse.testing import tiny_pipeline  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832,
                      frames=81, steps=50)
    device, dtype = device_and_dtype()
    if args.tiny:
        pipe = tiny_pipeline("wan", vae=True).to(device)  # the tiny VAE has 16 latent channels
        g = torch.Generator().manual_seed(1)
        embeds = dict(prompt_embeds=torch.randn(1, 16, 16, generator=g).to(device),
                      negative_prompt_embeds=torch.randn(1, 16, 16, generator=g).to(device))
        size = dict(height=256, width=256, num_frames=5)  # latent 2 x 32 x 32 -> 512 video tokens
    else:
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(args.model_id, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(args.model_id, vae=vae, torch_dtype=dtype)
        pipe.enable_model_cpu_offload() if args.cpu_offload else pipe.to(device)
        embeds = dict(prompt=args.prompt, negative_prompt="blurry, low quality, static")
        size = dict(height=args.height, width=args.width, num_frames=args.frames)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(**embeds, **size, num_inference_steps=args.steps, guidance_scale=5.0,
                    generator=generator(args, device)).frames

    frames = compare(pipe, call, args, device)
    if args.output:
        save_video(frames[0], args.output, fps=16)


if __name__ == "__main__":
    main()
