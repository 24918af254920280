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

from hf_creative_sparse.testing import tiny_pipeline  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="black-forest-labs/FLUX.1-dev", height=1024, width=1024,
                      frames=None, steps=28)
    device, dtype = device_and_dtype()
    if args.tiny:
        pipe = tiny_pipeline("flux", vae=True).to(device)
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
