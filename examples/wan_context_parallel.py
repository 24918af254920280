#!/usr/bin/env python3
"""Wan 2.1 on several GPUs: Ulysses context parallelism with sparse attention.

    torchrun --nproc_per_node 2 examples/wan_context_parallel.py            # 2 GPUs, Wan2.1-T2V-1.3B
    torchrun --nproc_per_node 2 examples/wan_context_parallel.py --tiny     # tiny random Wan, CPU (gloo)
    accelerate launch --num_processes 2 examples/wan_context_parallel.py    # the same with accelerate

Every rank loads the pipeline; ``hcs.enable_diffusers_backend`` routes the transformer's
attention through the ``creative_sparse`` diffusers backend (one `LayerState` per layer),
and diffusers' ``enable_parallelism(ContextParallelConfig(ulysses_degree=world))`` splits
the sequence over the ranks. Inside attention each rank holds ``heads / world`` heads over
the whole sequence and runs the sparse kernel on them (per-head thresholds follow the head
shard). Ring attention is refused by the backend: use Ulysses. The heads (Wan 1.3B: 12)
must divide by the number of ranks.

Rank 0 prints the time per pipeline call and its sparsity report (its heads), and with
``--output`` saves the video. Flags as the single-GPU examples (``--topk``, ``--schedule``,
``--dense-steps``, ``--mask-refresh``).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from _common import generator, parse_args, plugin_settings, save_video

from hf_creative_sparse.testing import tiny_pipeline, tiny_random_transformer  # noqa: E402

import hf_creative_sparse as hcs


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832,
                      frames=81, steps=50)
    use_cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.bfloat16
        torch.cuda.set_device(device)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        # diffusers places rank r on device r % device_count(), which is 0 without an
        # accelerator; the CPU is the one device here.
        torch.accelerator.device_count = lambda: 1

    from diffusers import ContextParallelConfig

    if args.tiny:
        pipe = tiny_pipeline("wan", tiny_random_transformer("wan", num_attention_heads=4, in_channels=16,
                                                        out_channels=16), vae=True).to(device)
        g = torch.Generator().manual_seed(1)
        embeds = dict(prompt_embeds=torch.randn(1, 16, 16, generator=g).to(device),
                      negative_prompt_embeds=torch.randn(1, 16, 16, generator=g).to(device))
        size = dict(height=256, width=256, num_frames=5)  # latent 2 x 32 x 32 -> 512 video tokens
    else:
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(args.model_id, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(args.model_id, vae=vae, torch_dtype=dtype).to(device)
        embeds = dict(prompt=args.prompt, negative_prompt="blurry, low quality, static")
        size = dict(height=args.height, width=args.width, num_frames=args.frames)
    pipe.set_progress_bar_config(disable=rank != 0)

    config, schedule, options = plugin_settings(args)
    hcs.enable_diffusers_backend(pipe, config, schedule=schedule, options=options)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    def call():
        return pipe(**embeds, **size, num_inference_steps=args.steps, guidance_scale=5.0,
                    generator=generator(args, device)).frames

    with torch.no_grad():
        if use_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        frames = call()
        if use_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if rank == 0:
        print(f"{world} ranks, Ulysses {world}: {seconds:.2f} s per pipeline call ({args.steps} steps)")
        print(hcs.sparsity_report(pipe))
        if args.output:
            save_video(frames[0], args.output, fps=16)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
