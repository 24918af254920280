#!/usr/bin/env python3
"""Sparse attention under Ulysses context parallelism: a Wan-480p-shaped transformer on 2 GPUs.

    torchrun --nproc_per_node 2 benchmarks/gpu_context_parallel.py            # 2 GPUs of one host
    torchrun --nproc_per_node 2 benchmarks/gpu_context_parallel.py --tiny     # CPU smoke run (gloo)

The GPU machine has no diffusers: carry the wheels in .whl (diffusers 0.42.1 and requests
with its dependencies, which diffusers checks at import) and run, from the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        .whl/diffusers-0.42.1-py3-none-any.whl .whl/requests-*.whl .whl/urllib3-*.whl .whl/idna-*.whl \\
        .whl/certifi-*.whl .whl/charset_normalizer-*.whl \\
      && PYTHONPATH=/tmp/site:. torchrun --nproc_per_node 2 benchmarks/gpu_context_parallel.py

Model: diffusers' WanTransformer3DModel with Wan2.1-T2V-1.3B's sizes (12 heads x 128,
width 1536, FFN 8960, ``--layers`` blocks; 30 in the released model), random weights, bf16.
Input: the 480p, 81-frame latent (16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32760 tokens) and
512 text tokens. Structured inputs: the latent is smooth noise (coarse noise upsampled,
plus 10% white noise), in every self-attention ``to_k`` shares ``to_q``'s weights, so
q.k measures how alike two tokens are, as in trained video DiTs where nearby tokens and
the same place in other frames attend to each other (random, untied weights give diffuse
attention with nothing to skip), and ``--qk-gain`` scales the q/k RMSNorm weights (logits
by its square) toward the peaked heads of trained models. Measured on a 2048-token slice
of this model on CPU (one block, top-k 10% / 20% of the key blocks, relative L1 against
dense): gain 1.0: 0.070 / 0.054 (diffuse); 1.5: 0.0047 / 0.0025; 2.0: 0.0011 / 0.0006.
Sparsity is measured, not assumed: the table gives the kept fraction and the relative L1
of every self-attention output against dense attention on the same q/k/v (mean and max
over layers and ranks).

Variants (same weights and inputs; every rank runs the 1-GPU ones on its own GPU, rank 0's
numbers are reported):

* 1-GPU dense: diffusers' ``_native_cudnn`` backend (cuDNN SDPA);
* 1-GPU sparse: ``hcs.enable_diffusers_backend`` (the ``creative_sparse`` backend), once
  per ``--budgets`` entry (default: top-k 10% of the key blocks, and per-head budgets
  measured to relative L1 0.03 where the config has ``target_l1``);
* N-GPU dense: ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` with
  ``_native_cudnn``;
* N-GPU sparse: the same with ``creative_sparse`` (each rank: its heads, whole sequence).

Timing: one denoising loop per variant (decreasing timesteps, `loop_timesteps`): ``--warmup``
untimed forwards, then ``--iters`` forwards, each bracketed by a
device synchronize and a barrier; per forward the slowest rank's wall time; the median is
reported. Attention ms is the backend's own per-layer time (CUDA events, `sparsity_report`)
summed over layers, per forward (creative_sparse variants only). Checks (exit code 1 when
one fails): finite outputs; the N-GPU outputs match the 1-GPU ones of the same backend
(relative L1 below ``--cp-tol``; bf16). Targets from issue 19: N-GPU sparse >= 1.7x faster
than 1-GPU sparse, and >= 2.5x faster than N-GPU dense at attention L1 <= 0.03.

Output: a markdown table on rank 0; JSON and the table in $OUT (if set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations import diffusers_backend as db  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny widths, 512 tokens, gloo")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default 30; 2 with --tiny)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 21)")
    p.add_argument("--height", type=int, default=None, help="latent height (default 60)")
    p.add_argument("--width", type=int, default=None, help="latent width (default 104)")
    p.add_argument("--budgets", default="topk=0.1,target_l1=0.03",
                   help="sparse budgets to run, comma-separated: topk=F (kept fraction of key blocks) and/or "
                        "target_l1=E (per-head budgets measured to that error; skipped where the config lacks it); "
                        "default topk=0.1,target_l1=0.03")
    p.add_argument("--qk-gain", type=float, default=1.5,
                   help="scale of the self-attention q/k RMSNorm weights (default 1.5; see above)")
    p.add_argument("--simthreshd1", type=float, default=-1.0,
                   help="self-similarity threshold (default -1: the budget alone decides)")
    p.add_argument("--backend", default="auto", help="creative_sparse kernel backend (default auto)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cp-tol", type=float, default=0.02, help="N-GPU vs 1-GPU relative L1 allowed (bf16)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.layers = args.layers or (2 if tiny else 30)
    args.frames = args.frames or (4 if tiny else 21)
    args.height = args.height or (16 if tiny else 60)
    args.width = args.width or (32 if tiny else 104)
    return args


def sparse_configs(args: argparse.Namespace) -> dict[str, hcs.SparseAttentionConfig]:
    """Budget label ("topk=0.1") -> config, for each of ``--budgets`` this checkout has."""
    base: dict[str, Any] = dict(simthreshd1=args.simthreshd1, backend=args.backend)
    if args.tiny:
        base.update(min_seq_len=0, backend="reference" if args.backend == "auto" else args.backend)
    configs = {}
    for spec in filter(None, (x.strip() for x in args.budgets.split(","))):
        name, _, value = spec.partition("=")
        if name not in ("topk", "target_l1") or not value:
            raise SystemExit(f"--budgets: expected topk=F or target_l1=E, got {spec!r}")
        if name not in hcs.SparseAttentionConfig.__dataclass_fields__:
            print(f"skipping {spec}: SparseAttentionConfig has no {name} in this checkout", flush=True)
            continue
        configs[spec] = hcs.SparseAttentionConfig(**base, **{name: float(value)})
    if not configs:
        raise SystemExit("--budgets: nothing to run")
    return configs


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Wan 1.3B-shaped (or tiny) transformer, rank 0's random weights on every rank, with
    ``to_k`` tied to ``to_q`` and q/k norms scaled by ``--qk-gain`` in the self-attentions
    (see the module docstring)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if args.tiny:
        sizes = dict(num_attention_heads=4, attention_head_dim=16, text_dim=32, ffn_dim=64)
    else:
        sizes = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960)
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256,
                                      num_layers=args.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6, rope_max_seq_len=1024, **sizes)
    # cast as from_pretrained(torch_dtype=...) does: _keep_in_fp32_modules stay float32
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    model.eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_k.weight.copy_(block.attn1.to_q.weight)
            block.attn1.to_k.bias.copy_(block.attn1.to_q.bias)
            block.attn1.norm_q.weight.mul_(args.qk_gain)
            block.attn1.norm_k.weight.mul_(args.qk_gain)
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
    return model


def build_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from hf_creative_sparse.testing import smooth_noise

    latent = smooth_noise((1, 16, args.frames, args.height, args.width), seed=1).to(device, dtype)
    g = torch.Generator().manual_seed(2)
    text_dim = 32 if args.tiny else 4096
    text = torch.randn(1, 64 if args.tiny else 512, text_dim, generator=g).to(device, dtype)
    return dict(hidden_states=latent, encoder_hidden_states=text, return_dict=False)  # timestep: loop_timesteps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_timesteps(args: argparse.Namespace) -> list[torch.Tensor]:
    """One denoising loop's decreasing timesteps: the warm-up forwards, the timed ones, and
    one more for the error measurement. A bare transformer's step clock reads them (a smaller
    timestep is the next step), so a variant with an error target measures its budgets in
    its first (dense) step and reuses them after, as in a pipeline; with one repeated
    timestep every forward would be step 0."""
    n = args.warmup + args.iters + 1
    return [torch.tensor([999.0 - 998.0 * i / (n - 1)]) for i in range(n)]


def time_forwards(model: torch.nn.Module, inputs: dict, args: argparse.Namespace, device: torch.device,
                  group: Any, after_warmup: Callable[[], None] | None = None) -> tuple[float, torch.Tensor]:
    """Median over ``--iters`` of the slowest participating rank's forward time (ms), and
    the output of the last forward. ``group`` None: this rank alone. ``after_warmup`` runs
    between the warm-up and the timed forwards (e.g. to reset statistics)."""
    out = None
    schedule = [t.to(device) for t in loop_timesteps(args)]
    with torch.no_grad():
        for i in range(args.warmup):
            out = model(**inputs, timestep=schedule[i])[0]
        if after_warmup is not None:
            after_warmup()
        times = []
        for i in range(args.warmup, args.warmup + args.iters):
            sync(device)
            if group is not None:
                dist.barrier(group=group)
            start = time.perf_counter()
            out = model(**inputs, timestep=schedule[i])[0]
            sync(device)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if group is not None:
                elapsed = elapsed.to(device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
            times.append(float(elapsed) * 1000.0)
    return statistics.median(times), out


def attention_ms(model: torch.nn.Module, forwards: int) -> tuple[float, float]:
    """(attention ms per forward summed over layers, mean kept fraction of the video
    self-attentions) from this rank's report."""
    rows = hcs.sparsity_report(model).rows
    total = sum(r["time_ms"] for r in rows) / max(forwards, 1)
    kept = [r["mean_kept_fraction"] for r in rows if r["layer"].endswith("attn1")]
    return total, sum(kept) / len(kept)


def measure_l1(model: torch.nn.Module, inputs: dict, args: argparse.Namespace) -> list[float]:
    """One forward with a hook on every video self-attention: relative L1 of its output
    against dense attention on the same inputs (this rank's heads)."""
    from hf_creative_sparse.ops.dense import dense_attention

    errors: list[float] = []

    def hook(call: Any) -> None:
        dense = dense_attention(call.inputs).float()
        errors.append(float((call.output.float() - dense).abs().sum() / dense.abs().sum()))

    removers = [layer.active_state().add_hook(hook) for name, layer in db.backend_layers(model).items()
                if name.endswith("attn1")]
    with torch.no_grad():
        last = loop_timesteps(args)[-1].to(next(model.parameters()).device)
        model(**inputs, timestep=last)  # the loop's next step: sparse, as timed
    for remove in removers:
        remove()
    return errors


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().sum() / b.float().abs().sum())


def gather_floats(values: list[float], device: torch.device) -> list[float]:
    """Every rank's ``values`` (same length on every rank), concatenated."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [float(x) for part in parts for x in part]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.bfloat16
        torch.cuda.set_device(device)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.accelerator.device_count = lambda: 1  # diffusers: rank % device_count(); the CPU is the one device
    from diffusers import ContextParallelConfig

    if use_cuda:  # build (or load) the CUDA kernels once, rank 0 first, outside every timing
        from hf_creative_sparse.ops._ext import load_extension

        for turn in range(2):
            if (rank == 0) == (turn == 0):
                start = time.perf_counter()
                status = load_extension("cuda")
                if rank == 0:
                    print(f"CUDA extension: {'ready' if status.module is not None else status.error} "
                          f"({time.perf_counter() - start:.1f} s)", flush=True)
            dist.barrier()

    model = build_model(args, device, dtype)
    inputs = build_inputs(args, device, dtype)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    configs = sparse_configs(args)
    dense_backend = "_native_cudnn" if use_cuda else "native"
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, gpus: int, group: Any, config: hcs.SparseAttentionConfig | None) -> None:
        sparse = config is not None
        handle = None
        if sparse:
            handle = hcs.enable_diffusers_backend(model, config)
        else:
            model.set_attention_backend(dense_backend)
        ms, out = time_forwards(model, inputs, args, device, group,
                                after_warmup=handle.reset_stats if handle is not None else None)
        row: dict[str, Any] = dict(variant=name, gpus=gpus, forward_ms=ms, finite=bool(torch.isfinite(out).all()),
                                   budget=name.split(" ", 2)[2] if sparse else None)
        if sparse:
            row["attention_ms"], row["kept"] = attention_ms(model, args.iters)
            errors = measure_l1(model, inputs, args)
            if gpus > 1:
                errors = gather_floats(errors, device)
                row["kept"] = statistics.mean(gather_floats([row["kept"]], device))
            row["l1_mean"], row["l1_max"] = statistics.mean(errors), max(errors)
            hcs.disable_creative_sparse(model)
        results[name], outputs[name] = row, out
        if rank == 0:
            print(json.dumps(row), flush=True)

    run("1-GPU dense", 1, None, None)
    for budget, config in configs.items():
        run(f"1-GPU sparse {budget}", 1, None, config)
    dist.barrier()
    model.set_attention_backend(dense_backend)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    run(f"{world}-GPU dense", world, dist.group.WORLD, None)
    for budget, config in configs.items():
        run(f"{world}-GPU sparse {budget}", world, dist.group.WORLD, config)

    checks = {"finite outputs": all(r["finite"] for r in results.values())}
    for kind in ["dense", *(f"sparse {b}" for b in configs)]:
        diff = rel_l1(outputs[f"{world}-GPU {kind}"], outputs[f"1-GPU {kind}"])
        checks[f"{world}-GPU {kind} = 1-GPU {kind} (rel L1 {diff:.2e} <= {args.cp_tol})"] = diff <= args.cp_tol
    ok = all(checks.values())
    if rank == 0:
        table = format_table(results, world, args, tokens, next(iter(configs.values())).backend)
        print(table)
        for name, passed in checks.items():
            print(f"{'PASS' if passed else 'FAIL'}: {name}")
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "gpu_context_parallel.json"), "w") as f:
                json.dump(dict(args=vars(args), configs={b: c.to_dict() for b, c in configs.items()},
                               results=results, checks=checks,
                               device=torch.cuda.get_device_name(device) if use_cuda else "cpu",
                               torch=torch.__version__), f, indent=2)
            with open(os.path.join(os.environ["OUT"], "gpu_context_parallel.md"), "w") as f:
                f.write(table + "\n")
    dist.destroy_process_group()
    return 0 if ok else 1


def format_table(results: dict[str, dict], world: int, args: argparse.Namespace, tokens: int,
                 backend: str) -> str:
    dense = {1: results["1-GPU dense"]["forward_ms"], world: results[f"{world}-GPU dense"]["forward_ms"]}
    lines = [f"Wan-480p-shaped transformer, {args.layers} blocks, {tokens} video tokens, Ulysses {world}; "
             f"q/k gain {args.qk_gain}; creative_sparse simthreshd1={args.simthreshd1}, backend={backend}",
             "",
             "| variant | GPUs | forward ms | attention ms | kept | attn L1 mean / max | vs 1-GPU, same "
             "attention | vs dense, same GPUs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        same = "1-GPU dense" if r["budget"] is None else f"1-GPU sparse {r['budget']}"
        base = results[same]["forward_ms"]
        attn = f"{r['attention_ms']:.1f}" if "attention_ms" in r else "-"
        kept = f"{r['kept']:.3f}" if "kept" in r else "1.000"
        l1 = f"{r['l1_mean']:.4f} / {r['l1_max']:.4f}" if "l1_mean" in r else "0"
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['forward_ms']:.1f} | {attn} | {kept} | {l1} | "
                     f"{base / r['forward_ms']:.2f}x | {dense[r['gpus']] / r['forward_ms']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
