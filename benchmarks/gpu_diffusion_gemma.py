"""DiffusionGemma context KV retention on a GPU: speed, memory and error against the
unpatched model, in one run.

What it runs: DiffusionGemma at its released shapes (google/diffusiongemma-26B-A4B-it:
30 layers, hidden 2816, 16 query heads; sliding layers 8 KV heads x 256, window 1024;
full layers every 6th, 2 KV heads x 512; 128 experts, top 8; vocab 262144; canvas 256)
with random bf16 weights, text only (a tiny vision tower: images are not benchmarked).
For each context (4k, 16k, 32k tokens; prefilled once in chunks, then copied for every
variant) it generates 2 canvases (512 tokens, 48 denoising steps each) unpatched and with
retention 1.0 / 0.5 / 0.3 (delay_step 1), plus 0.5 with the full context offloaded to
the host during sparse steps, and reports:

* tokens/s of the generation (prefill excluded: it is the same for every variant, and
  printed apart) and the ratio to unpatched;
* decoder attention time (the decoder's self-attention modules, CUDA events) and its
  share of the decoder's time; the decode speedup that share and the measured
  attention speedup allow (Amdahl);
* peak memory of the generation and the context KV held on the GPU during sparse steps
  (cache + compact copies);
* attention-output relative L1 per decoder layer on identical inputs (the original
  forward vs the retained one at the selection step), mean and max over layers;
* whether retention 1.0 reproduced the unpatched tokens exactly.

Needs transformers >= 5.23 (DiffusionGemma); the GPU machine has 5.17, so carry the
wheels in .whl (transformers 5.24.0 and regex, which it checks at import). Command, from
the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/transformers-5.24.0-py3-none-any.whl .whl/regex-*.whl \
      && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_diffusion_gemma.py

It first runs tests/test_diffusion_gemma.py (with the GPU offload test) and prints its exit
status. Logs (JSON with every number, the markdown table) go to $OUT when it is set. ``--tiny``
runs the same code on a tiny random model on the CPU (checks the script, not speed);
``--layers N`` keeps the released attention shapes with fewer layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations.enable import HANDLE_ATTR  # noqa: E402
from hf_creative_sparse.integrations.retention import RetentionConfig  # noqa: E402

TINY_VISION = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64}


def build_model(tiny: bool, layers: int | None, device: str, dtype: torch.dtype) -> Any:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tiny:
            tc = DiffusionGemmaTextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          global_head_dim=16, num_global_key_value_heads=1, sliding_window=32,
                                          num_experts=4, top_k_experts=2, moe_intermediate_size=16)
            canvas = 8
        else:
            n = layers or 30
            tc = DiffusionGemmaTextConfig(vocab_size=262144, hidden_size=2816, intermediate_size=2112,
                                          num_hidden_layers=n, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                                          sliding_window=1024, num_experts=128, top_k_experts=8,
                                          moe_intermediate_size=704, max_position_embeddings=131072,
                                          final_logit_softcapping=30.0)
            canvas = 256
        cfg = DiffusionGemmaConfig(text_config=tc, vision_config=TINY_VISION, canvas_length=canvas)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionGemmaForBlockDiffusion(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if device == "cpu":
        model.set_experts_implementation("eager")
    return model


def prefill(model: Any, ids: torch.Tensor, chunk: int) -> Any:
    """The encoder's KV cache of ``ids`` built ``chunk`` tokens at a time (bounded
    attention memory whatever kernel SDPA picks for head dim 512)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            pos = torch.arange(start, start + part.shape[1], device=ids.device).unsqueeze(0)
            model.model.encoder(input_ids=part, cache=cache, position_ids=pos)
    return cache


class Timer:
    """Sums the time of module calls: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, modules: list[torch.nn.Module], cuda: bool) -> None:
        self.cuda = cuda
        self.pairs: list[Any] = []
        self._open: dict[int, Any] = {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._open[id(module)] = self._now()

    def _post(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.pairs.append((self._open.pop(id(module)), self._now()))

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs)
        return 1e3 * sum(b - a for a, b in self.pairs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def context_kv_bytes(model: Any, cache: Any, device: torch.device) -> int:
    """K/V bytes of the context on ``device``: the cache's tensors there plus the compact copies."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                if isinstance(t, torch.Tensor) and t.device.type == device.type)  # cuda == cuda:0
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        total += sum(t.numel() * t.element_size() for rows in handle.runtime.stores.values()
                     for kv in rows.values() for t in kv)
    return total


def run_variant(model: Any, base_cache: Any, tail: torch.Tensor, retention: Any, args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    cache = copy.deepcopy(base_cache)
    if retention is not None:
        hcs.enable_creative_sparse(model, retention=retention)
    attn_modules = [m for m in model.modules() if type(m).__name__ == "DiffusionGemmaDecoderTextAttention"]
    dec_timer = Timer([model.model.decoder], cuda)
    attn_timer = Timer(attn_modules, cuda)
    kv_seen: list[int] = []
    handle = model.model.decoder.register_forward_hook(
        lambda *a: kv_seen.append(context_kv_bytes(model, cache, device)))
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() if cuda else 0
        torch.manual_seed(1234)
        start = time.perf_counter()
        out = model.generate(input_ids=tail, cache=cache, max_new_tokens=args.new_tokens,
                             max_denoising_steps=args.steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base_mem) if cuda else 0
        report = hcs.sparsity_report(model) if retention is not None else None
    finally:
        handle.remove()
        dec_timer.remove()
        attn_timer.remove()
        if retention is not None:
            hcs.disable_creative_sparse(model)
    new = out.sequences.shape[1] - tail.shape[1]
    decoder_ms, attn_ms = dec_timer.total_ms(), attn_timer.total_ms()
    sparse_kv = kv_seen[args.steps // 2] if len(kv_seen) > args.steps // 2 else (kv_seen[-1] if kv_seen else 0)
    return {"seconds": seconds, "tokens": new, "tokens_per_s": new / seconds, "decoder_ms": decoder_ms,
            "attention_ms": attn_ms, "attention_share": attn_ms / decoder_ms if decoder_ms else math.nan,
            "decoder_passes": len(dec_timer.pairs), "peak_mb": peak / 2**20, "context_kv_mb": sparse_kv / 2**20,
            "sequences": out.sequences[:, tail.shape[1]:].cpu(),
            "report": report.rows if report is not None else None}


def attention_l1(model: Any, base_cache: Any, ratio: float, canvas: torch.Tensor) -> list[float]:
    """Relative L1 of each decoder attention layer's output at the selection step, the
    original forward on the very same inputs as the reference."""
    cache = copy.deepcopy(base_cache)
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=ratio, delay_step=0))
    errors: dict[int, float] = {}

    def hook(module: torch.nn.Module, args: Any, kwargs: dict, out: Any) -> None:
        dense, _ = type(module).forward(module, *args, **kwargs)
        got = out[0].float()
        ref = dense.float()
        errors[module.layer_idx] = float((got - ref).abs().sum() / ref.abs().sum())

    mods = [m for m in model.modules() if type(m).__name__ == "DiffusionGemmaDecoderTextAttention"]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(decoder_input_ids=canvas, cache=cache)
    finally:
        for h in handles:
            h.remove()
        hcs.disable_creative_sparse(model)
    return [errors[i] for i in sorted(errors)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the script)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, released attention shapes")
    parser.add_argument("--contexts", type=str, default=None, help="comma-separated context lengths")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per canvas (default 48)")
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    parser.add_argument("--skip-tests", action="store_true", help="skip tests/test_diffusion_gemma.py first")
    args = parser.parse_args()

    if not args.skip_tests:  # correctness first: the CPU tests and, on a GPU, the offload test
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               os.path.join(root, "tests", "test_diffusion_gemma.py")], cwd=root)
        print(f"tests/test_diffusion_gemma.py: exit status {done.returncode}", flush=True)

    import transformers

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else \
        ([64, 160] if args.tiny else [4096, 16384, 32768])
    args.steps = args.steps or (4 if args.tiny else 48)
    if args.tiny:
        args.chunk = 48
    out_dir = os.environ.get("OUT")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    t0 = time.perf_counter()
    try:  # the encoder and decoder are built apart, then tied: about 2x the weights at the peak
        model = build_model(args.tiny, args.layers, str(device), dtype)
    except torch.OutOfMemoryError:
        args.layers = (args.layers or 30) // 2
        print(f"out of memory building the released config; using its attention shapes with {args.layers} layers",
              flush=True)
        torch.cuda.empty_cache()
        model = build_model(args.tiny, args.layers, str(device), dtype)
    canvas_len = model.config.canvas_length
    args.new_tokens = args.canvases * canvas_len
    text = model.config.text_config
    print(f"built in {time.perf_counter() - t0:.1f} s: {text.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, canvas {canvas_len}, "
          f"{args.steps} steps, {args.canvases} canvases", flush=True)

    variants: list[tuple[str, Any]] = [("unpatched", None), ("1.0", RetentionConfig(retention_ratio=1.0)),
                                       ("0.5", RetentionConfig(retention_ratio=0.5, delay_step=1)),
                                       ("0.3", RetentionConfig(retention_ratio=0.3, delay_step=1))]
    if cuda:
        variants.append(("0.5 offload", RetentionConfig(retention_ratio=0.5, delay_step=1, offload_to="cpu")))

    gen = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {"contexts": {}, "config": {"layers": text.num_hidden_layers, "steps": args.steps,
                                                           "canvases": args.canvases, "dtype": str(dtype)}}
    # warm-up: kernels, cuBLAS heuristics, the host allocator
    ids = torch.randint(10, text.vocab_size - 10, (1, contexts[0]), generator=gen).to(device)
    warm_cache = prefill(model, ids[:, :-canvas_len], args.chunk)
    warm_args = argparse.Namespace(**{**vars(args), "steps": 2, "new_tokens": canvas_len})
    for _, retention in variants[:3]:
        run_variant(model, warm_cache, ids[:, -canvas_len:], retention, warm_args, device)
    del warm_cache

    for n in contexts:
        try:
            ids = torch.randint(10, text.vocab_size - 10, (1, n), generator=gen).to(device)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            base = prefill(model, ids[:, :-canvas_len], args.chunk)
            if cuda:
                torch.cuda.synchronize()
            prefill_s = time.perf_counter() - start
            tail = ids[:, -canvas_len:]
            row: dict[str, Any] = {"prefill_s": prefill_s, "variants": {}}
            for name, retention in variants:
                r = run_variant(model, base, tail, retention, args, device)
                row["variants"][name] = r
                print(f"  {n:>6} {name:<12} {r['tokens_per_s']:8.1f} tok/s  decoder {r['decoder_ms']:8.1f} ms  "
                      f"attention {r['attention_ms']:8.1f} ms ({100 * r['attention_share']:.0f}%)  "
                      f"peak +{r['peak_mb']:.0f} MB  context KV {r['context_kv_mb']:.1f} MB", flush=True)
            canvas = torch.randint(10, text.vocab_size - 10, (1, canvas_len), generator=gen).to(device)
            row["l1"] = {str(ratio): attention_l1(model, base, ratio, canvas) for ratio in (0.5, 0.3)}
            un = row["variants"]["unpatched"]
            row["ratio1_identical"] = bool(torch.equal(un["sequences"], row["variants"]["1.0"]["sequences"]))
            results["contexts"][n] = row
            del base
        except torch.OutOfMemoryError as err:
            print(f"  {n}: out of memory ({err}); skipped", flush=True)
            results["contexts"][n] = {"error": str(err)}
        if cuda:
            torch.cuda.empty_cache()

    table = markdown(results)
    print("\n" + table, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_diffusion_gemma.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out_dir, "gpu_diffusion_gemma.json"), "w") as f:
            json.dump(results, f, indent=1, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o))
    print(f"total {time.perf_counter() - t0:.0f} s")


def markdown(results: dict[str, Any]) -> str:
    lines = ["| context | variant | tokens/s | x unpatched | decoder x | attention ms | attention x | "
             "attention share | "
             "decoder x allowed (Amdahl) | peak MB | context KV on GPU MB | attn rel L1 mean / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, row in results["contexts"].items():
        if "error" in row:
            lines.append(f"| {n} | error: {row['error'][:60]} ||||||||||")
            continue
        un = row["variants"]["unpatched"]
        for name, r in row["variants"].items():
            attn_x = un["attention_ms"] / r["attention_ms"] if r["attention_ms"] else math.nan
            share = un["attention_share"]
            allowed = 1.0 / ((1.0 - share) + share / attn_x) if attn_x == attn_x else math.nan
            key = name.split()[0]
            l1 = row["l1"].get(key)
            l1_text = f"{sum(l1) / len(l1):.3f} / {max(l1):.3f}" if l1 else "-"
            lines.append(f"| {n} | {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / un['tokens_per_s']:.2f} | "
                         f"{un['decoder_ms'] / r['decoder_ms']:.2f} | "
                         f"{r['attention_ms']:.0f} | {attn_x:.2f} | {100 * r['attention_share']:.0f}% | "
                         f"{allowed:.2f} | {r['peak_mb']:.0f} | {r['context_kv_mb']:.1f} | {l1_text} |")
        lines.append(f"| {n} | prefill {row['prefill_s']:.2f} s (not in tokens/s); retention 1.0 "
                     f"{'bit-identical' if row['ratio1_identical'] else 'DIFFERS'} ||||||||||")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
