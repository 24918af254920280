#!/usr/bin/env python3
"""Build, test and benchmark the GPU backends in one run on a CUDA machine.

    python benchmarks/gpu_check.py                     # build + cuda tests + benchmark
    python benchmarks/gpu_check.py --stages bench --shapes 32k --budget 200

Stages:
  build    JIT-builds the CUDA extension through the package's own loader (timed).
  test     pytest -m cuda on tests/test_cuda_kernels.py and tests/test_flex_backend.py.
  profile  kernel-level GPU time of mask prediction (torch.profiler).
  bench    per shape (DESIGN.md's list), bf16: SDPA cuDNN and flash (dense), then for kept
         fractions 100/50/25/10% of random block masks the cuda kernel and FlexAttention
         on the same mask (kernel time; the mask is given), then the default predicted
         mask end to end (`sparse_attention`, prediction included) on structured inputs,
         and the mask prediction alone. Ratios are measured in the same run.
Logs and a JSON of every number go to $OUT (default ./gpu_check_out); a short table is
printed last. Timing: CUDA events, warm-up, median of repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "gpu_check.log"), "a")
START = time.time()

# name -> (B, H, N, D, causal)
SHAPES = {
    "flux": (1, 24, 4608, 128, False),
    "cogvideox": (1, 30, 17776, 64, False),
    "wan": (1, 12, 32760, 128, False),
    "32k": (1, 24, 32768, 128, False),
    "32k_d64": (1, 24, 32768, 64, False),
    "gpt2": (8, 12, 1024, 64, True),
}
KEPT = (1.0, 0.5, 0.25, 0.1)
# Compiled kernels by their set_kernel_preference number (csrc/cuda/bindings.cpp).
CUDA_KERNELS = (("mma", 1), ("ws", 2))
KERNELS_ONLY = False


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.write(msg + "\n")
    LOG.flush()


def elapsed() -> float:
    return time.time() - START


def time_fn(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events), after warm-up."""
    from hf_creative_sparse.evaluation.attention_benchmark import device_timer

    return device_timer(torch.device("cuda"))(fn, warmup, reps)


def paired_ms(q, k, v, causal, fn, rounds: int = 7) -> tuple[float, float, float]:
    """(cuDNN ms, ``fn`` ms, cuDNN/fn speed ratio), timed in turn over ``rounds`` rounds:
    medians of each and of the per-round ratios, so that clock drift over a run moves both
    sides of a ratio alike. Calls under a millisecond get 50 repetitions a round (their
    per-call times vary by a few percent)."""
    import statistics

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        reps = 50 if time_fn(cudnn, reps=3) < 1.0 else 10
    refs, runs, ratios = [], [], []
    for _ in range(rounds):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = time_fn(cudnn, reps=reps)
        run = time_fn(fn, reps=reps)
        refs.append(ref)
        runs.append(run)
        ratios.append(ref / run)
    return statistics.median(refs), statistics.median(runs), statistics.median(ratios)


def stage_build() -> bool:
    from hf_creative_sparse.ops._ext import load_extension

    t0 = time.time()
    status = load_extension("cuda")
    log(f"[build] cuda extension: {'OK' if status.module else 'FAILED'} in {time.time() - t0:.1f} s")
    if status.error:
        log(status.error)
    return status.module is not None


def stage_test(timeout: float = 240.0) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "tests/test_cuda_kernels.py", "tests/test_flex_backend.py"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\nTIMEOUT after {timeout} s"
    with open(os.path.join(OUT, "pytest.log"), "w") as fh:
        fh.write(text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else "no output"
    log(f"[test] {summary} ({time.time() - t0:.0f} s)")
    for ln in failures[:20]:
        log("  " + ln[:300])
    return summary


def stage_profile() -> None:
    """Kernel-level GPU time of mask prediction (torch.profiler) at two sizes."""
    from torch.profiler import ProfilerActivity, profile

    from hf_creative_sparse.ops.inputs import attention_inputs
    from hf_creative_sparse.ops.masks import kept_fraction, predict_from_inputs

    for name in ("32k", "cogvideox"):
        b, h, n, d, causal = SHAPES[name]
        q, k = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        inp = attention_inputs(q, k, k, is_causal=causal)
        fn = lambda: kept_fraction(predict_from_inputs(inp, simthreshd1=0.6, cdfthreshd=0.98), inp)  # noqa: E731
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.time()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        wall = (time.time() - t0) / 5 * 1e3
        log(f"[profile] prediction {name}: {wall:.3f} ms wall per call (profiled); GPU kernels per call:")
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0 and e.count >= 5]
        events.sort(key=lambda e: -e.device_time_total)
        for e in events[:8]:
            log(f"    {e.device_time_total / 5:9.1f} us  x{e.count // 5}  {e.key[:90]}")


def random_block_mask(b, h, mq, mk, frac, causal, device):
    """bool [B, H, Mq, Mk] keeping round(frac * attendable) blocks per row (>= 1)."""
    score = torch.rand(b, h, mq, mk, device=device)
    if causal:
        from hf_creative_sparse.ops.masks import causal_block_mask

        allowed = causal_block_mask(mq * 128, mk * 64, device)[None, None]
        score = score.masked_fill(~allowed, -1.0)
        n_allowed = allowed.sum(-1, keepdim=True).expand(b, h, mq, 1)
    else:
        n_allowed = torch.full((b, h, mq, 1), mk, device=device)
    n = torch.clamp(torch.round(n_allowed.float() * frac), min=1).long()
    order = score.argsort(dim=-1, descending=True)
    ranks = torch.arange(mk, device=device)
    keep_sorted = ranks < n
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def structured_qkv(b, h, n, d, dtype, device, amp):
    """Tokens along a smooth random path (anchors every 256 tokens, linearly interpolated,
    norm ``amp * sqrt(d)``) plus noise: neighbouring tokens are similar, as in image/video
    latents, so blocks are self-similar and the default predictor selects a subset."""
    g = torch.Generator(device=device).manual_seed(1)
    walk = torch.randn(b, h, n // 256 + 2, d, device=device, generator=g)
    walk = F.interpolate(walk.transpose(2, 3).reshape(b * h, d, -1), size=n, mode="linear",
                         align_corners=False).reshape(b, h, d, n).transpose(2, 3)
    walk = walk / walk.norm(dim=-1, keepdim=True) * (amp * d ** 0.5)
    q = walk + 0.5 * amp * torch.randn(b, h, n, d, device=device, generator=g)
    k = walk + 0.5 * amp * torch.randn(b, h, n, d, device=device, generator=g)
    v = torch.randn(b, h, n, d, device=device, generator=g)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


def sdpa_time(q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    try:
        with sdpa_kernel([which]):
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            out = fn()
            ms = time_fn(fn)
        return ms, out
    except Exception as exc:  # backend unavailable for this shape
        log(f"  sdpa {backend} failed: {type(exc).__name__}: {str(exc)[:200]}")
        return math.nan, None


def rel_l1(out, ref):
    return float((out.float() - ref.float()).abs().sum() / ref.float().abs().sum().clamp(min=1e-30))


def bench_shape(name, results, budget):
    from hf_creative_sparse.ops.config import SparseAttentionConfig
    from hf_creative_sparse.ops import predict_cuda
    from hf_creative_sparse.ops.backends import flex as backend_flex
    from hf_creative_sparse.ops._ext import load_extension
    from hf_creative_sparse.ops.attention import sparse_attention_inputs
    from hf_creative_sparse.ops.dense import dense_attention
    from hf_creative_sparse.ops.custom_ops import block_sparse_fwd
    from hf_creative_sparse.ops.inputs import attention_inputs
    from hf_creative_sparse.ops.masks import check_block_mask, kept_fraction, predict_from_inputs
    from hf_creative_sparse.ops.predict_cuda import mask_to_lut

    b, h, n, d, causal = SHAPES[name]
    dev, dtype = "cuda", torch.bfloat16
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    row = {"shape": name, "B": b, "H": h, "N": n, "D": d, "causal": causal, "dense_tflop": flops / 1e12}
    cud_ms, cud_out = sdpa_time(q, k, v, causal, "cudnn")
    fl_ms, _ = sdpa_time(q, k, v, causal, "flash")
    row.update(cudnn_ms=cud_ms, flash_ms=fl_ms, cudnn_tflops=flops / cud_ms / 1e9, flash_tflops=flops / fl_ms / 1e9)
    log(f"[bench] {name}: cuDNN {cud_ms:.3f} ms ({row['cudnn_tflops']:.0f} TFLOP/s), flash {fl_ms:.3f} ms")
    inp = attention_inputs(q, k, v, is_causal=causal)
    pv_off = torch.full((h,), math.inf, device=dev)
    row["kept"] = {}
    for frac in KEPT:
        if elapsed() > budget:
            log("  (time budget reached)")
            break
        mask = check_block_mask(random_block_mask(b, h, inp.num_q_blocks, inp.num_k_blocks, frac, causal, dev), inp)
        kept, _ = kept_fraction(mask, inp)
        counts, idx = mask_to_lut(mask)
        cuda_fn = lambda: block_sparse_fwd(q, k, v, counts, idx, None, causal, inp.scale, pv_off)  # noqa: E731
        entry = {"kept": kept}
        mod = load_extension("cuda").module
        for kname, pref in CUDA_KERNELS:
            if kname != "mma" and (d > 128 or torch.cuda.get_device_capability() != (9, 0)):
                continue
            mod.set_kernel_preference(pref)
            try:
                out_k = cuda_fn()[0]
                entry[f"{kname}_ms"] = time_fn(cuda_fn)
                entry[f"{kname}_rel_l1_vs_mma"] = rel_l1(out_k, entry["_out_mma"]) if "_out_mma" in entry else 0.0
                entry["_out_mma"] = entry.get("_out_mma", out_k)
            except Exception as exc:
                log(f"  {kname} failed: {type(exc).__name__}: {str(exc)[:300]}")
        mod.set_kernel_preference(0)
        out_cuda = entry.pop("_out_mma")
        cuda_ms = min(entry.get(f"{kname}_ms", math.inf) for kname, _ in CUDA_KERNELS)
        entry["best_kernel"] = min((entry.get(f"{kn}_ms", math.inf), kn) for kn, _ in CUDA_KERNELS)[1]
        entry.update(cuda_ms=cuda_ms, cuda_tflops_eff=flops * kept / cuda_ms / 1e9, cuda_vs_cudnn=cud_ms / cuda_ms)
        try:
            bm = backend_flex.build_block_mask(inp, mask)
            fx = backend_flex._flex_fn(True)
            opts = backend_flex.kernel_options(d, dtype)
            flex_fn = lambda: fx(q, k, v, block_mask=bm, scale=inp.scale, kernel_options=opts)  # noqa: E731
            with backend_flex._recompile_room():
                out_flex = flex_fn()
                flex_ms = time_fn(flex_fn)
            entry.update(flex_ms=flex_ms, flex_tflops_eff=flops * kept / flex_ms / 1e9,
                         cuda_vs_flex=flex_ms / cuda_ms, cuda_flex_rel_l1=rel_l1(out_cuda, out_flex))
        except Exception as exc:
            log(f"  flex failed: {type(exc).__name__}: {str(exc)[:300]}")
        if cud_out is not None:
            entry["rel_l1_vs_dense"] = rel_l1(out_cuda, cud_out)
        row["kept"][f"{frac:.2f}"] = entry
        times = ", ".join(f"{kn} {entry.get(kn + '_ms', math.nan):.3f} ms (L1 vs mma "
                          f"{entry.get(kn + '_rel_l1_vs_mma', math.nan):.1e})" for kn, _ in CUDA_KERNELS)
        log(f"  kept {kept:.3f}: {times}; best cuda {cuda_ms:.3f} ms ({entry['cuda_tflops_eff']:.0f} eff TFLOP/s, "
            f"{entry['cuda_vs_cudnn']:.2f}x cuDNN), flex {entry.get('flex_ms', math.nan):.3f} ms "
            f"({entry.get('flex_tflops_eff', math.nan):.0f}), cuda/flex speedup {entry.get('cuda_vs_flex', math.nan):.2f}, "
            f"L1 vs dense {entry.get('rel_l1_vs_dense', math.nan):.3f}")

    if elapsed() > budget or KERNELS_ONLY:
        return row
    # The default policy on random (not self-similar) inputs: what most calls look like to
    # the predictor when attention is not local. Must stay within ~5% of cuDNN.
    cfg0 = SparseAttentionConfig()
    with torch.no_grad():
        _, st0 = sparse_attention_inputs(inp, cfg0)
        ref_ms, auto_ms, auto_ratio = paired_ms(q, k, v, causal, lambda: sparse_attention_inputs(inp, cfg0))
        # the dense fallback alone, to tell its cost from the prediction's
        fallback_ms = time_fn(lambda: dense_attention(inp))
    row["auto_random"] = {"ms": auto_ms, "vs_cudnn": auto_ratio, "cudnn_ms": ref_ms, "backend": st0.backend,
                          "fallback": st0.fallback_reason, "dense_fallback_ms": fallback_ms}
    log(f"  default policy, random inputs: {auto_ms:.3f} ms = {auto_ratio:.2f}x cuDNN ({ref_ms:.3f} ms, timed in turn; "
        f"{st0.backend}" + (f"; {st0.fallback_reason}" if st0.fallback_reason else "")
        + f"); the dense fallback alone {fallback_ms:.3f} ms")
    # Default predicted mask, end to end (prediction + policy + kernel), on structured
    # inputs: "moderate" locality (the predictor keeps most blocks) and "local".
    row["predicted"] = {}
    for label, amp in (("moderate", 0.8 if d >= 128 else 0.9), ("local", 1.0 if d >= 128 else 1.1)):
        qs, ks, vs = structured_qkv(b, h, n, d, dtype, dev, amp)
        inp_s = attention_inputs(qs, ks, vs, is_causal=causal)
        cud_s_ms, cud_s_out = sdpa_time(qs, ks, vs, causal, "cudnn")
        cfg = SparseAttentionConfig()
        with torch.no_grad():
            out_s, stats = sparse_attention_inputs(inp_s, cfg)
            cud_s_ms, e2e_ms, e2e_ratio = paired_ms(qs, ks, vs, causal, lambda: sparse_attention_inputs(inp_s, cfg))
            pred_fn = lambda: kept_fraction(predict_from_inputs(  # noqa: E731
                inp_s, simthreshd1=cfg.simthreshd1, cdfthreshd=cfg.cdfthreshd), inp_s)
            kept_pred = pred_fn()[0]
            pred_ms = time_fn(pred_fn)
            predict_cuda.ENABLED = False
            try:
                pred_torch_ms = time_fn(pred_fn)
            finally:
                predict_cuda.ENABLED = True
        p = row["predicted"][label] = {
            "kept": kept_pred, "backend": stats.backend, "fallback": stats.fallback_reason,
            "e2e_ms": e2e_ms, "cudnn_ms": cud_s_ms, "vs_cudnn": e2e_ratio, "predict_ms": pred_ms,
            "predict_torch_ms": pred_torch_ms, "predict_pct_of_cudnn": 100.0 * pred_ms / cud_s_ms,
            "rel_l1_vs_dense": rel_l1(out_s, cud_s_out) if cud_s_out is not None else math.nan,
            "pv_skipped_fraction": stats.pv_skipped_fraction,
        }
        log(f"  predicted ({label} inputs, default cfg): kept {kept_pred:.3f} backend {p['backend']} "
            f"e2e {e2e_ms:.3f} ms = {p['vs_cudnn']:.2f}x cuDNN; prediction {pred_ms:.3f} ms "
            f"({p['predict_pct_of_cudnn']:.1f}% of cuDNN; torch path {pred_torch_ms:.3f} ms); "
            f"L1 vs dense {p['rel_l1_vs_dense']:.4f}, pv skipped {p['pv_skipped_fraction']:.3f}"
            + (f"; fallback: {p['fallback']}" if p["fallback"] else ""))

    if not causal and elapsed() < budget:
        # Headline: kept 25% by top-k, prediction included, per backend (called directly:
        # `auto` would pick one, and the cuda backend refuses sizes where flex is faster).
        from hf_creative_sparse.ops.dispatch import get_backend

        pv_default = torch.full((h,), float(SparseAttentionConfig().pvthreshd), device=dev)
        for backend in ("cuda", "flex"):
            be = get_backend(backend)

            def e2e():
                mask = predict_from_inputs(inp, simthreshd1=-1.0, cdfthreshd=None, topk=0.25)
                kept_fraction(mask, inp)  # the policy's host sync
                return be.run(inp, mask, pv_default)
            try:
                with torch.no_grad():
                    ms = time_fn(e2e)
                row[f"topk25_{backend}_e2e_ms"] = ms
                log(f"  top-k 25% end to end ({backend}): {ms:.3f} ms = {cud_ms / ms:.2f}x cuDNN")
            except Exception as exc:
                log(f"  top-k 25% ({backend}) failed: {type(exc).__name__}: {str(exc)[:200]}")
    return row


def print_table(results):
    log("")
    log(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  bf16")
    log("shape       cuDNN ms | kept: cuda ms (eff TF/s, x cuDNN, x flex) ... | predicted: kept, backend, x cuDNN, pred%")
    for row in results:
        cells = []
        for key, e in row.get("kept", {}).items():
            cells.append(f"{float(key) * 100:.0f}%: {e['cuda_ms']:.2f} ({e['cuda_tflops_eff']:.0f}, "
                         f"{e['cuda_vs_cudnn']:.2f}x, {e.get('cuda_vs_flex', math.nan):.2f}x)")
        preds = row.get("predicted", {})
        pred = " ".join(f"{k}: {p['kept']:.2f} {p['backend']} {p['vs_cudnn']:.2f}x pred {p['predict_pct_of_cudnn']:.1f}%"
                        for k, p in preds.items()) or "-"
        auto = row.get("auto_random")
        auto_cell = f" | auto(random) {auto['vs_cudnn']:.2f}x" if auto else ""
        log(f"{row['shape']:10s} {row['cudnn_ms']:8.2f} | " + " ".join(cells) + f" | {pred}" + auto_cell)


def markdown_table(results, device: str, torch_version: str) -> str:
    """The BENCHMARKS.md tables of one run."""
    day = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    lines = [f"GPU: {device}, torch {torch_version}, bf16, {day}. Times in ms (median of 10 after warm-up, CUDA "
             "events); eff TFLOP/s = dense-equivalent FLOP x kept fraction / time.", "",
             "| shape | kept | cuDNN | cuda mma.sync | cuda warp-specialized | flex "
             "| best cuda eff TFLOP/s | flex eff TFLOP/s | cuda x cuDNN | cuda x flex |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        for key, e in row.get("kept", {}).items():
            lines.append(
                f"| {row['shape']} (B{row['B']} H{row['H']} N{row['N']} D{row['D']}{' causal' if row['causal'] else ''}) "
                f"| {e['kept']:.2f} | {row['cudnn_ms']:.3f} | {e.get('mma_ms', math.nan):.3f} | "
                f"{e.get('ws_ms', math.nan):.3f} | "
                f"{e.get('flex_ms', math.nan):.3f} | {e['cuda_tflops_eff']:.0f} | "
                f"{e.get('flex_tflops_eff', math.nan):.0f} | {e['cuda_vs_cudnn']:.2f} | {e.get('cuda_vs_flex', math.nan):.2f} |")
    lines += ["", "Default policy (`sparse_attention`, backend auto, default config; prediction included):", "",
              "| shape | inputs | predicted kept | ran | time | x cuDNN | prediction ms (% of cuDNN) | torch-path "
              "prediction ms | rel L1 vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        auto = row.get("auto_random")
        if auto:
            lines.append(f"| {row['shape']} | random | - | {auto['backend']} | {auto['ms']:.3f} | "
                         f"{auto['vs_cudnn']:.2f} | - | - | - |")
        for label, p in row.get("predicted", {}).items():
            lines.append(f"| {row['shape']} | {label} | {p['kept']:.3f} | {p['backend']} | {p['e2e_ms']:.3f} | "
                         f"{p['vs_cudnn']:.2f} | {p['predict_ms']:.3f} ({p['predict_pct_of_cudnn']:.1f}%) | "
                         f"{p['predict_torch_ms']:.3f} | {p['rel_l1_vs_dense']:.4f} |")
    heads = [r for r in results if "topk25_cuda_e2e_ms" in r or "topk25_flex_e2e_ms" in r]
    if heads:
        lines += ["", "Top-k 25% end to end (prediction + index lists + kernel) against cuDNN dense:", "",
                  "| shape | cuDNN | cuda | flex | cuda x cuDNN | flex x cuDNN |", "|---|---|---|---|---|---|"]
        for r in heads:
            c, f = r.get("topk25_cuda_e2e_ms", math.nan), r.get("topk25_flex_e2e_ms", math.nan)
            lines.append(f"| {r['shape']} | {r['cudnn_ms']:.3f} | {c:.3f} | {f:.3f} | {r['cudnn_ms'] / c:.2f} | "
                         f"{r['cudnn_ms'] / f:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="build,test,profile,bench")
    ap.add_argument("--shapes", default="32k,32k_d64,cogvideox,flux,wan,gpt2")
    ap.add_argument("--kernels-only", action="store_true", help="bench only the kernels on fixed random masks")
    ap.add_argument("--budget", type=float, default=360.0, help="seconds after which benchmarking stops")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("no CUDA GPU: nothing to check")
        return 1
    log(f"device {torch.cuda.get_device_name()} cap {torch.cuda.get_device_capability()} torch {torch.__version__} "
        f"cuda {torch.version.cuda}")
    stages = args.stages.split(",")
    global KERNELS_ONLY
    KERNELS_ONLY = args.kernels_only
    ok = True
    if "build" in stages:
        ok = stage_build()
    summary = stage_test() if "test" in stages and ok else "not run"
    if "profile" in stages and ok:
        try:
            stage_profile()
        except Exception as exc:
            log(f"[profile] failed: {type(exc).__name__}: {str(exc)[:300]}")
    results = []
    if "bench" in stages and ok:
        torch.backends.cuda.matmul.allow_tf32 = True
        for name in args.shapes.split(","):
            if elapsed() > args.budget:
                log(f"[bench] time budget reached before {name}")
                break
            try:
                results.append(bench_shape(name, results, args.budget))
            except Exception as exc:
                log(f"[bench] {name} failed: {type(exc).__name__}: {str(exc)[:500]}")
            with open(os.path.join(OUT, "bench.json"), "w") as fh:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tests": summary,
                           "results": results}, fh, indent=1, default=str)
            torch.cuda.empty_cache()
        with open(os.path.join(OUT, "benchmarks_table.md"), "w") as fh:
            fh.write(markdown_table(results, torch.cuda.get_device_name(), torch.__version__))
        print_table(results)
    log(f"[tests] {summary}")
    log(f"total {elapsed():.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
