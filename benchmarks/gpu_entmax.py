"""alpha-entmax attention on one GPU: build, correctness, benchmark (issue 21), in one command.

    python3 benchmarks/gpu_entmax.py            # from the repo root; logs to $OUT if set

1. Builds only the entmax CUDA sources (csrc/cuda/entmax_fwd.cu, entmax_binding.cpp) as a
   standalone extension for this GPU's architecture (about a minute), so the run does not
   wait for the whole block-sparse extension.
2. Correctness against the PyTorch reference (ops/entmax.py, float32 from the same 16-bit
   inputs): odd lengths, batch > 1, head dims 64/128, causal and not, GQA, key padding
   (with keyless rows), per-head alpha, alpha 2; outputs poisoned (NaN left in the caching
   allocator's block before each call); exact zeros (v = identity makes the output the
   weight matrix); the benchmark shapes checked on row/head slices.
3. Benchmark: B1 H24, N 4k/16k/32k, D 64/128, causal and not, alpha 1.5, bf16, on
   structured inputs (tokens in 512-token clusters: entmax leaves most blocks empty),
   against dense cuDNN softmax SDPA and AdaSplash (pip ``adasplash``) when importable.
   Ours is timed end to end (bounds + kernel), and the bounds and the kernel alone.
   Prints a markdown table. ``--sizes 32768 --dims 128`` runs the issue's target shape only.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_creative_sparse.ops import entmax as em  # noqa: E402
from hf_creative_sparse.ops._ext_sources import cuda_gencode_flags  # noqa: E402
from hf_creative_sparse.ops.inputs import attention_inputs  # noqa: E402

OUT = os.environ.get("OUT")
LOG: list[str] = []
START = time.time()


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def build() -> None:
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    t0 = time.time()
    cpp_extension.load(
        name="hcs_entmax_cuda_standalone",
        sources=[os.path.join(ROOT, "csrc", "cuda", "entmax_fwd.cu"),
                 os.path.join(ROOT, "csrc", "cuda", "entmax_binding.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        + cuda_gencode_flags(arch),
        is_python_module=False,  # the binding registers torch.ops.hcs_entmax (TORCH_LIBRARY), no PyInit
        verbose=False,
    )
    log(f"built the entmax kernel for sm_{arch} in {time.time() - t0:.0f} s")


def poison(nbytes: int) -> None:
    """Leave NaN in a freed block of the caching allocator so that an uninitialised output
    reusing it shows up as NaN."""
    x = torch.full((nbytes // 2 + 64,), float("nan"), dtype=torch.bfloat16, device="cuda")
    del x


def check(name: str, q, k, v, alpha, causal=False, kpm=None, rows=None, heads=None) -> dict:
    """Kernel vs reference; rows/heads restrict the reference to a slice (exact: rows of a
    non-causal call see every key; causal slices start at row 0 with keys cut alike)."""
    poison(q.numel() * q.element_size())
    out, stats = em.entmax_attention(q, k, v, alpha, is_causal=causal, key_padding_mask=kpm, backend="cuda",
                                     return_stats=True)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    qs, ks, vs, a = q, k, v, alpha
    if heads is not None:
        group = q.shape[1] // k.shape[1]
        qs = q[:, heads]
        ks, vs = k[:, [h // group for h in heads]], v[:, [h // group for h in heads]]
        a = alpha[heads] if isinstance(alpha, torch.Tensor) else alpha
        out = out[:, heads]
    if rows is not None:
        qs, out = qs[:, :, :rows], out[:, :, :rows]
        if causal:
            ks, vs = ks[:, :, :rows], vs[:, :, :rows]
    inp = attention_inputs(qs, ks, vs, is_causal=causal, key_padding_mask=kpm if rows is None or not causal
                           else (kpm[:, :rows] if kpm is not None else None))
    ref, _, _ = em.reference_forward(inp, em.check_alpha(a, qs.shape[1], q.device))
    err = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-6)
    ok = finite and float(err.max() / scale) < 3e-2 and float(err.mean() / ref.float().abs().mean().clamp_min(1e-6)) < 1e-2
    row = {"case": name, "ok": ok, "max_err_rel": float(err.max() / scale), "finite": finite,
           "block_sparsity": stats.block_sparsity, "skipped": stats.skipped_blocks, "total": stats.total_blocks,
           "passes": stats.tau_iterations}
    log(f"check {name}: {'OK' if ok else 'FAIL'} max rel err {row['max_err_rel']:.2e} finite={finite} "
        f"block sparsity {stats.block_sparsity:.2f} skipped {stats.skipped_blocks}/{stats.total_blocks} "
        f"passes {stats.tau_iterations}")
    return row


def structured(b, h, n, d, span=512, seed=0, dtype=torch.bfloat16):
    """Tokens in contiguous clusters of ``span`` tokens: queries and keys near their cluster's
    centre, so a query's entmax support stays in its own cluster."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    label = torch.arange(n, device="cuda") // span
    centres = torch.randn(b, h, int(label[-1]) + 1, d, generator=g, device="cuda") * 1.5
    q = centres[:, :, label] + 0.5 * torch.randn(b, h, n, d, generator=g, device="cuda")
    k = centres[:, :, label] + 0.5 * torch.randn(b, h, n, d, generator=g, device="cuda")
    v = torch.randn(b, h, n, d, generator=g, device="cuda")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def correctness() -> list[dict]:
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    bf, fp = torch.bfloat16, torch.float16
    q, k, v = (torch.randn(2, 4, 1000, 64, device=dev, dtype=bf) for _ in range(3))
    rows.append(check("B2 H4 N1000 D64 causal", q, k, v, 1.5, causal=True))
    q = torch.randn(1, 4, 777, 128, device=dev, dtype=fp)
    k, v = (torch.randn(1, 2, 1300, 128, device=dev, dtype=fp) for _ in range(2))
    kpm = torch.rand(1, 1300, device=dev) > 0.3
    rows.append(check("B1 H4/2 Nq777 Nk1300 D128 padded GQA fp16", q, k, v, 1.5, kpm=kpm))
    q, k, v = (torch.randn(2, 2, 2100, 128, device=dev, dtype=bf) * 2 for _ in range(3))
    kpm = torch.ones(2, 2100, dtype=torch.bool, device=dev)
    kpm[1, :300] = False  # causal rows 0..299 of batch 1 see no key
    rows.append(check("B2 H2 N2100 D128 causal padded, per-head alpha", q, k, v,
                      torch.tensor([1.5, 1.25], device=dev), causal=True, kpm=kpm))
    q, k, v = (torch.randn(1, 2, 515, 64, device=dev, dtype=bf) for _ in range(3))
    rows.append(check("B1 H2 N515 D64 alpha 2 (sparsemax)", q, k, v, 2.0))
    q, k, v = structured(1, 4, 4096, 128)
    rows.append(check("structured B1 H4 N4096 D128", q, k, v, 1.5))
    rows.append(check("structured B1 H4 N4096 D128 causal", q, k, v, 1.5, causal=True))
    q, k, v = structured(2, 2, 3000, 64, span=300)
    rows.append(check("structured B2 H2 N3000 D64 span 300", q, k, v, 1.5))

    # Exact zeros: v = identity (128 keys, D 128) makes the output the weight matrix.
    q = torch.randn(1, 2, 300, 128, device=dev, dtype=bf)
    k = torch.randn(1, 2, 128, 128, device=dev, dtype=bf)
    q[..., :4] *= 12
    k[..., :4] *= 12
    eye = torch.eye(128, device=dev, dtype=bf).expand(1, 2, 128, 128).contiguous()
    poison(q.numel() * 2)
    p = em.entmax_attention(q, k, eye, 1.5, backend="cuda").float()
    s = (q.float() @ k.float().transpose(-1, -2)) * 128 ** -0.5 * 0.5
    tau = em.bisect_tau(s, torch.full((2,), 1.5, device=dev), 50)
    margin = s - tau.unsqueeze(-1)
    zero_ok = bool((p[margin < -1e-2] == 0).all()) and bool((p[margin > 1e-2] > 0).all())
    log(f"check exact zeros (v = I): {'OK' if zero_ok else 'FAIL'}; reference zero fraction "
        f"{float((margin <= 0).float().mean()):.2f}")
    rows.append({"case": "exact zeros", "ok": zero_ok})
    return rows


def timeit(fn, reps: int) -> float:
    """Median ms over ``reps`` CUDA-event timed calls after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def benchmark(sizes: tuple[int, ...], dims: tuple[int, ...], budget_s: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        import adasplash
    except Exception as err:  # noqa: BLE001
        adasplash = None
        log(f"adasplash not importable ({type(err).__name__}: {err}); its column stays empty")
    rows = []
    # The target shape first (N 32k, D 128, non-causal), so that AdaSplash's time
    # budget and the run's 6 minutes are spent on it before anything else.
    for n in sizes:
        for d in dims:
            for causal in (False, True):
                if time.time() - START > budget_s:
                    log(f"skipped N{n} D{d} causal={causal}: the run's time budget is spent")
                    continue
                q, k, v = structured(1, 24, n, d, seed=n + d)
                reps = 10 if n <= 16384 else 5
                ours = timeit(lambda: em.entmax_attention(q, k, v, 1.5, is_causal=causal, backend="cuda"), reps)
                inp = attention_inputs(q, k, v, is_causal=causal)
                bounds_ms = timeit(lambda: em.seed_blocks(inp, em.block_score_bounds(inp)), reps)
                bounds = em.block_score_bounds(inp)
                seeds = em.seed_blocks(inp, bounds)
                alpha = torch.full((24,), 1.5, device=q.device)
                kernel_ms = timeit(lambda: torch.ops.hcs_entmax.cuda_forward(
                    q, k, v, None, bounds, seeds, alpha, inp.scale, causal, em.CUDA_NEWTON_TOL, em.NEWTON_MAX_ITERS),
                    reps)
                _, stats = em.entmax_attention(q, k, v, 1.5, is_causal=causal, backend="cuda", return_stats=True)
                def sdpa() -> torch.Tensor:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                try:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        cudnn = timeit(sdpa, reps)
                except RuntimeError as err:  # no cuDNN attention in this build: flash instead, said so
                    log(f"cuDNN SDPA unavailable ({err}); timing the default SDPA backend instead")
                    cudnn = timeit(sdpa, reps)
                ada = None
                ada_err = None
                if adasplash is not None and time.time() - START < 0.8 * budget_s:
                    try:
                        ada = timeit(lambda: adasplash.adasplash(q, k, v, alpha=1.5, is_causal=causal), 3)
                        mine = em.entmax_attention(q[:, :2], k[:, :2], v[:, :2], 1.5, is_causal=causal,
                                                   backend="cuda").float()
                        theirs = adasplash.adasplash(q[:, :2].contiguous(), k[:, :2].contiguous(),
                                                     v[:, :2].contiguous(), alpha=1.5, is_causal=causal).float()
                        ada_err = float((mine - theirs).abs().max())
                    except Exception as err:  # noqa: BLE001
                        log(f"adasplash failed at N{n} D{d} causal={causal}: {type(err).__name__}: {err}")
                row = {"N": n, "D": d, "causal": causal, "ours_ms": ours, "bounds_ms": bounds_ms, "kernel_ms": kernel_ms,
                       "cudnn_ms": cudnn,
                       "adasplash_ms": ada, "ours_vs_adasplash_maxdiff": ada_err,
                       "block_sparsity": stats.block_sparsity, "skipped_frac": stats.skipped_blocks / stats.total_blocks,
                       "zero_fraction": stats.zero_fraction, "passes": stats.tau_iterations}
                rows.append(row)
                log(json.dumps(row))
                q = k = v = bounds = seeds = None  # free before the next shape
                torch.cuda.empty_cache()
    return rows


def slice_checks() -> list[dict]:
    """The benchmark inputs, checked on a head pair and the first 1024 rows."""
    rows = []
    for n, d, causal in ((32768, 128, False), (32768, 128, True), (16384, 64, False)):
        q, k, v = structured(1, 24, n, d, seed=n + d)
        rows.append(check(f"bench N{n} D{d} causal={causal} (heads 0, 23; rows < 1024)", q, k, v, 1.5,
                          causal=causal, rows=1024, heads=[0, 23]))
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="32768,16384,4096", help="sequence lengths, comma separated")
    parser.add_argument("--dims", default="128,64", help="head dims, comma separated")
    parser.add_argument("--time-budget", type=float, default=320.0,
                        help="seconds from the start after which shapes are skipped (AdaSplash stops at 80%%)")
    parser.add_argument("--use-extension", action="store_true",
                        help="use the package's built CUDA extension instead of building the entmax sources alone")
    args = parser.parse_args()
    sizes = tuple(int(x) for x in args.sizes.split(","))
    dims = tuple(int(x) for x in args.dims.split(","))
    if not torch.cuda.is_available():
        print("no CUDA device")
        sys.exit(1)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.use_extension:
        from hf_creative_sparse.ops._ext import load_extension

        error = load_extension("cuda").error
        if error is not None:
            raise SystemExit(f"the CUDA extension did not load: {error}")
    else:
        build()
    checks = correctness() + slice_checks()
    bench = benchmark(sizes, dims, args.time_budget)
    log("\n| N | D | causal | block sparsity | skipped | tau passes | ours ms (bounds ms) | cuDNN ms | "
        "AdaSplash ms | vs AdaSplash | vs cuDNN |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(bench, key=lambda r: (r["N"], r["D"], r["causal"])):
        ada = f"{r['adasplash_ms']:.2f}" if r["adasplash_ms"] else "-"
        speed = f"{r['adasplash_ms'] / r['ours_ms']:.1f}x" if r["adasplash_ms"] else "-"
        log(f"| {r['N']} | {r['D']} | {r['causal']} | {r['block_sparsity']:.3f} | {r['skipped_frac']:.3f} | "
            f"{r['passes']} | {r['ours_ms']:.2f} ({r['bounds_ms']:.2f}, {r['kernel_ms']:.2f}) | {r['cudnn_ms']:.2f} | {ada} | {speed} | "
            f"{r['cudnn_ms'] / r['ours_ms']:.2f}x |")
    failed = [c["case"] for c in checks if not c["ok"]]
    log(f"\ncorrectness: {len(checks) - len(failed)}/{len(checks)} OK" + (f"; FAILED: {failed}" if failed else ""))
    log(f"total {time.time() - START:.0f} s")
    if OUT:
        with open(os.path.join(OUT, "gpu_entmax.json"), "w") as f:
            json.dump({"checks": checks, "bench": bench}, f, indent=1)
        with open(os.path.join(OUT, "gpu_entmax.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
