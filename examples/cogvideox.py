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


def tiny_pipeline():
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="THUDM/CogVideoX-2b", height=480, width=720, frames=49,
                      steps=50)
    device, dtype = device_and_dtype()
    if args.tiny:
        pipe = tiny_pipeline().to(device)
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
