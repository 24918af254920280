#!/usr/bin/env python3
"""Flux text-to-image with creative sparse attention.

    python examples/flux.py                   # black-forest-labs/FLUX.1-dev on a GPU
    python examples/flux.py --tiny            # tiny random Flux, offline, CPU

Both double-stream and single-stream blocks are patched; the text tokens (first in the
joint sequence) stay dense. Prints the time with and without the plugin and the report.
"""

from __future__ import annotations

import torch

from _common import compare, device_and_dtype, generator, parse_args


def tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="black-forest-labs/FLUX.1-dev", height=1024, width=1024,
                      frames=None, steps=28)
    device, dtype = device_and_dtype()
    if args.tiny:
        pipe = tiny_pipeline().to(device)
        g = torch.Generator().manual_seed(1)
        embeds = dict(prompt_embeds=torch.randn(1, 64, 32, generator=g).to(device),
                      pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(device))
        size = dict(height=64, width=64)  # tiny VAE: 64 x 64 latent -> 1024 image tokens + 64 text
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.model_id, torch_dtype=dtype)
        pipe.enable_model_cpu_offload() if args.cpu_offload else pipe.to(device)
        embeds = dict(prompt=args.prompt)
        size = dict(height=args.height, width=args.width)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(**embeds, **size, num_inference_steps=args.steps, guidance_scale=3.5,
                    generator=generator(args, device)).images

    images = compare(pipe, call, args, device)
    if args.output:
        images[0].save(args.output)
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
