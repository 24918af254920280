#!/usr/bin/env python3
"""HunyuanVideo text-to-video with creative sparse attention.

    python examples/hunyuan_video.py          # hunyuanvideo-community/HunyuanVideo on a GPU
    python examples/hunyuan_video.py --tiny   # tiny random HunyuanVideo, offline, CPU

Double- and single-stream blocks are patched; the video comes first and the text last,
the text stays dense, and padded text keys are never attended (the transformer's mask
becomes the kernel's key padding mask). Prints the time with and without the plugin and
the report.
"""

from __future__ import annotations

import torch

from _common import compare, device_and_dtype, generator, parse_args, save_video

from hf_creative_sparse.testing import tiny_pipeline  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="hunyuanvideo-community/HunyuanVideo", height=320,
                      width=512, frames=61, steps=30)
    device, dtype = device_and_dtype()
    if args.tiny:
        pipe = tiny_pipeline("hunyuan_video", vae=True).to(device)
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(1, 32, dtype=torch.long)
        mask[0, 20:] = 0  # 20 real text tokens, 12 padded
        embeds = dict(prompt_embeds=torch.randn(1, 32, 16, generator=g).to(device),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=g).to(device),
                      prompt_attention_mask=mask.to(device))
        size = dict(height=128, width=128, num_frames=5)  # latent 2 x 16 x 16 -> 512 video + 32 text tokens
    else:
        from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

        transformer = HunyuanVideoTransformer3DModel.from_pretrained(args.model_id, subfolder="transformer",
                                                                     torch_dtype=dtype)
        pipe = HunyuanVideoPipeline.from_pretrained(args.model_id, transformer=transformer, torch_dtype=torch.float16
                                                    if device.type == "cuda" else dtype)
        pipe.vae.enable_tiling()
        pipe.enable_model_cpu_offload() if args.cpu_offload else pipe.to(device)
        embeds = dict(prompt=args.prompt)
        size = dict(height=args.height, width=args.width, num_frames=args.frames)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(**embeds, **size, num_inference_steps=args.steps, generator=generator(args, device)).frames

    frames = compare(pipe, call, args, device)
    if args.output:
        save_video(frames[0], args.output, fps=15)


if __name__ == "__main__":
    main()
