#!/usr/bin/env python3
"""Forward time of a long-sequence, tiny-width Wan transformer with and without the plugin.

    python benchmarks/wan_long_gpu.py                       # GPU: 16 x 64 x 64 latent = 16384 tokens
    python benchmarks/wan_long_gpu.py --expect-backend cuda # fail unless the CUDA kernel ran
    python benchmarks/wan_long_gpu.py --small               # CPU smoke run (512 tokens)

A WanTransformer3DModel with few layers but real head sizes (default 4 heads x 128, 2
layers) and random weights runs on one latent video of ``frames x height x width`` (patch
1 x 2 x 2, so tokens = frames * height/2 * width/2). Attention dominates the forward at
these lengths, which is what the plugin changes. Random weights give attention with no
self-similar blocks, so the default config sets ``simthreshd1=-1`` (every block may be
dropped) and ``topk`` (the kept fraction) directly.

Timing: CUDA events (wall clock on CPU), ``--warmup`` untimed forwards, median of
``--iters``; each forward gets the next timestep of a descending schedule, as in a
denoising loop (so ``--mask-refresh`` reuses masks as it would there). Both variants run
on the same inputs in the same process.

Checks (exit code 1 when one fails): outputs finite; the plugin with every block kept, on
the same backend as the sparse run, matches the unpatched model (relative L1 below
``--dense-tol``); with ``--expect-backend`` every sparse call ran on that backend.

Needs torch and diffusers (>= 0.35); on a machine without diffusers, install the wheel
first (pip install --no-deps --target DIR diffusers-*.whl importlib_metadata-*.whl and put
DIR on PYTHONPATH). Results are printed, and written as JSON to $OUT (if set) or --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import hf_creative_sparse as hcs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16, help="latent frames (default 16)")
    p.add_argument("--height", type=int, default=64, help="latent height, even (default 64)")
    p.add_argument("--width", type=int, default=64, help="latent width, even (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim (default 128)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--text-len", type=int, default=64, help="text tokens for the cross-attention (default 64)")
    p.add_argument("--topk", type=float, default=0.25, help="kept fraction of key blocks (default 0.25)")
    p.add_argument("--simthreshd1", type=float, default=-1.0, help="self-similarity threshold (default -1)")
    p.add_argument("--backend", default="auto", help="auto, cuda, flex, cpu or reference (default auto)")
    p.add_argument("--mask-refresh", type=int, default=1, help="predict the mask every k forwards (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dense-tol", type=float, default=None,
                   help="max relative L1 of the all-blocks-kept plugin run vs unpatched (default 2e-2 bf16/fp16, 1e-4 fp32)")
    p.add_argument("--expect-backend", default=None, help="fail unless every sparse call ran on this backend")
    p.add_argument("--small", action="store_true",
                   help="CPU smoke size: 2 x 32 x 32 latent (512 tokens), 2 heads x 32, 1 layer, 2 iters")
    p.add_argument("--json", default=None, help="write the results here (default $OUT/wan_long_gpu.json if $OUT is set)")
    args = p.parse_args(argv)
    if args.small:
        args.frames, args.height, args.width = 2, 32, 32
        args.heads, args.head_dim, args.layers, args.text_len = 2, 32, 1, 16
        args.warmup, args.iters = 1, 2
    if args.height % 2 or args.width % 2:
        p.error("--height and --width must be even (patch 1 x 2 x 2)")
    if args.head_dim < 6 or args.head_dim % 2:
        p.error("--head-dim must be even and >= 6 (Wan's 3-D RoPE splits it over t, h, w)")
    return args


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    dim = args.heads * args.head_dim
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=256, ffn_dim=2 * dim, num_layers=args.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=max(1024, args.frames, args.height, args.width))
    # cast as from_pretrained(torch_dtype=...) does: _keep_in_fp32_modules stay float32
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model.to(device).eval()


def timed_forwards(model: torch.nn.Module, inputs: dict, timesteps: list[float], warmup: int,
                   device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Milliseconds of each timed forward (after ``warmup``) and the last output."""
    times, out = [], None
    for i, t in enumerate(timesteps):
        kwargs = dict(inputs, timestep=torch.full((1,), t, device=device))
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.no_grad():
                out = model(**kwargs, return_dict=False)[0]
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(**kwargs, return_dict=False)[0]
            ms = (time.perf_counter() - t0) * 1000.0
        if i >= warmup:
            times.append(ms)
    return times, out


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"dtype {dtype}, tokens {tokens}, heads {args.heads} x {args.head_dim}, layers {args.layers}", flush=True)

    t0 = time.perf_counter()
    backends = hcs.available_backends()  # builds the compiled extensions if needed
    print(f"backends ({time.perf_counter() - t0:.1f} s): "
          + ", ".join(f"{k}: {'ok' if v is None else v}" for k, v in backends.items()), flush=True)

    model = build_model(args, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, args.frames, args.height, args.width, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, args.text_len, 64, generator=g).to(device, dtype),
    }
    n = args.warmup + args.iters
    timesteps = [999.0 - 990.0 * i / max(1, n - 1) for i in range(n)]

    base_times, base_out = timed_forwards(model, inputs, timesteps, args.warmup, device)

    config = hcs.SparseAttentionConfig(topk=args.topk, simthreshd1=args.simthreshd1, min_seq_len=0,
                                       backend=args.backend)
    handle = hcs.enable_creative_sparse(model, config, options=hcs.PatchOptions(mask_refresh=args.mask_refresh))
    sparse_times, sparse_out = timed_forwards(model, inputs, timesteps, args.warmup, device)
    report = handle.report()
    hcs.disable_creative_sparse(model)

    used = sorted({b for r in report.rows for b in r["backend"].split(",")})
    sparse_backend = args.backend if args.backend != "auto" else (used[0] if len(used) == 1 else "auto")
    if sparse_backend == "sdpa":
        sparse_backend = "auto"
    dense_cfg = hcs.SparseAttentionConfig.dense(min_seq_len=0, backend=sparse_backend)
    hcs.enable_creative_sparse(model, dense_cfg)
    _, dense_plugin_out = timed_forwards(model, inputs, timesteps[-1:], 0, device)
    hcs.disable_creative_sparse(model)
    _, base_last = timed_forwards(model, inputs, timesteps[-1:], 0, device)

    base_ms, sparse_ms = statistics.median(base_times), statistics.median(sparse_times)
    dense_err = rel_l1(dense_plugin_out, base_last)
    sparse_err = rel_l1(sparse_out, base_out)
    tol = args.dense_tol if args.dense_tol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    print()
    print(report.table())
    print()
    print(f"tokens                       {tokens}")
    print(f"unpatched forward (median)   {base_ms:.3f} ms")
    print(f"plugin forward (median)      {sparse_ms:.3f} ms")
    print(f"speed-up unpatched/plugin    {base_ms / sparse_ms:.3f}x")
    print(f"mean kept fraction           {report.mean_kept_fraction:.4f}")
    print(f"backends used                {', '.join(used)}")
    print(f"rel L1 sparse vs unpatched   {sparse_err:.4e}")
    print(f"rel L1 all-kept ({sparse_backend}) vs unpatched {dense_err:.4e} (tol {tol:g})")

    failures = []
    if not (torch.isfinite(sparse_out).all() and torch.isfinite(base_out).all() and torch.isfinite(dense_plugin_out).all()):
        failures.append("non-finite output")
    if not dense_err <= tol:
        failures.append(f"all-blocks-kept plugin output differs from unpatched: rel L1 {dense_err:.3e} > {tol:g}")
    sparse_backends = {b for r in report.rows for b in r["backend"].split(",") if b not in ("sdpa", "original")}
    if args.expect_backend and (sparse_backends != {args.expect_backend} or any(r["fallbacks"] for r in report.rows)):
        failures.append(f"expected every call on {args.expect_backend!r}, got backends {used} "
                        f"and fallbacks {[r['fallback_reasons'] for r in report.rows]}")

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "dtype": str(dtype), "tokens": tokens, "heads": args.heads, "head_dim": args.head_dim, "layers": args.layers,
        "topk": args.topk, "simthreshd1": args.simthreshd1, "mask_refresh": args.mask_refresh,
        "unpatched_ms": base_times, "plugin_ms": sparse_times, "unpatched_median_ms": base_ms,
        "plugin_median_ms": sparse_ms, "speedup": base_ms / sparse_ms, "mean_kept_fraction": report.mean_kept_fraction,
        "backends": used, "rel_l1_sparse": sparse_err, "rel_l1_all_kept": dense_err, "layers_report": report.rows,
        "failures": failures,
    }
    path = args.json or (os.path.join(os.environ["OUT"], "wan_long_gpu.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"wrote {path}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
