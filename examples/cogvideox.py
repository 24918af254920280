#!/usr/bin/env python3
"""CogVideoX text-to-video with creative sparse attention.

    python examples/cogvideox.py              # THUDM/CogVideoX-2b on a GPU
    python examples/cogvideox.py --tiny       # tiny random CogVideoX, offline, CPU

Each block's joint attention is patched; the text tokens (226 for the real model, first
in the sequence) stay dense and RoPE stays on the video part. Classifier-free guidance
runs as one batch of 2. Prints the time with and without the plugin and the report.
"""

from __future__ import annotations

import torch

from _common import compare, device_and_dtype, generator, parse_args, save_video

from hf_creative_sparse.testing import tiny_pipeline, tiny_random_transformer  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="THUDM/CogVideoX-2b", height=480, width=720, frames=49,
                      steps=50)
    device, dtype = device_and_dtype()
    if args.tiny:
        transformer = tiny_random_transformer("cogvideox", sample_width=16, sample_height=16)
        pipe = tiny_pipeline("cogvideox", transformer, vae=True).to(device)
        g = torch.Generator().manual_seed(1)
        embeds = dict(prompt_embeds=torch.randn(1, 8, 8, generator=g).to(device),
                      negative_prompt_embeds=torch.randn(1, 8, 8, generator=g).to(device))
        size = dict(height=128, width=128, num_frames=9)  # latent 3 x 16 x 16 -> 192 video + 8 text tokens
    else:
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline.from_pretrained(args.model_id, torch_dtype=torch.float16 if device.type == "cuda"
                                                 else dtype)
        pipe.enable_model_cpu_offload() if args.cpu_offload else pipe.to(device)
        embeds = dict(prompt=args.prompt)
        size = dict(height=args.height, width=args.width, num_frames=args.frames)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(**embeds, **size, num_inference_steps=args.steps, guidance_scale=6.0,
                    generator=generator(args, device)).frames

    frames = compare(pipe, call, args, device)
    if args.output:
        save_video(frames[0], args.output, fps=8)


if __name__ == "__main__":
    main()
