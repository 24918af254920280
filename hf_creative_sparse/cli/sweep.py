"""`hf-creative-sparse sweep`: find the best sparsity s* for a model and task.

Generates at every level, scores with Q, fits the power laws and writes ``sweep.json``
and ``sweep.png`` into ``--out-dir``; prints the per-level table, the fits, the
Corollary-1 bracket and s*. See `hf_creative_sparse.evaluation.sweep.find_optimal_sparsity`.

Example:
    hf-creative-sparse sweep --model smollm2 --task poetry --levels 0.1,0.3,0.5,0.7,0.9
"""

from __future__ import annotations

import argparse
import os

from ._args import float_list, fraction, int_at_least, model_spec
from .score import build_quality, parse_weights, read_texts

HELP = "find the best sparsity s* for a model and task (writes sweep.json and sweep.png)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.sweep import TASK_TYPES

    parser.add_argument("--model", type=model_spec(), default="smollm2",
                        help="'smollm2' (offline), a model folder, a .gguf file or a Hub id")
    parser.add_argument("--task", default="creative_writing", choices=TASK_TYPES, help="built-in prompt set")
    parser.add_argument("--levels", type=float_list(), default=None,
                        help="comma-separated s values in [0, 1] (default 0.1,0.2,...,0.9)")
    parser.add_argument("--budget", type=fraction(low_open=True), default=1.0,
                        help="fraction of dense attention FLOPs allowed, in (0, 1]: levels with s < 1 - budget "
                             "are skipped")
    parser.add_argument("--num-samples", type=int_at_least(1), default=4,
                        help="samples per prompt and level")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64,
                        help="tokens per sample")
    parser.add_argument("--prompts", default=None, help="file of prompts (replaces the task's; score's formats)")
    parser.add_argument("--max-prompts", type=int_at_least(1), default=None,
                        help="use only the first N prompts (default: all)")
    parser.add_argument("--weights", default=None, help="alpha,beta,gamma of Q (default 0.4,0.3,0.3)")
    parser.add_argument("--scorer", type=model_spec(("model", "smollm2")), default="model",
                        help="LM for incoherence: 'model' (the generating model), 'smollm2', or a path")
    parser.add_argument("--no-wrapper", action="store_true",
                        help="plain model.generate with T(s), p(s) instead of CreativeSparseWrapper")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the samples")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--out-dir", default="sweep_out", help="folder for sweep.json and sweep.png")


def format_result(result) -> str:  # noqa: ANN001 (SweepResult, imported lazily)
    lines = [f"{'s':>5}  {'novelty':>8} {'diversity':>9} {'incoher.':>8} {'Q':>8} {'se(Q)':>7}  "
             f"{'T':>5} {'top_p':>5} {'k_attn':>6} {'sec':>6}"]
    for lv in result.levels:
        c = lv.control
        knobs = (f"{c['temperature']:5.3f} {c['top_p']:5.3f} {c['attention_budget']:6.3f}" if c
                 else f"{'-':>5} {'-':>5} {'-':>6}")
        lines.append(f"{lv.s:5.2f}  {lv.novelty:8.4f} {lv.diversity:9.4f} {lv.incoherence:8.4f} {lv.quality:8.4f} "
                     f"{lv.quality_sem:7.4f}  {knobs} {lv.seconds:6.1f}")
    for key, fit in result.fits.items():
        lines.append(f"fit {key:<11} {fit.coefficient:.4g} * s^{fit.exponent:.4g}  (R² in log space {fit.r2:.3f})")
    if result.bounds is not None:
        b = result.bounds
        lines.append(f"Corollary 1: {b.s_lo:.4f} <= s*_fit = {b.s_star:.4f} <= {b.s_hi:.4f}")
    else:
        lines.append(f"Corollary 1: not applicable ({result.bounds_note})")
    lines.append(f"best measured s = {result.best_measured:g}; s* = {result.s_star:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    levels = args.levels
    weights = parse_weights(args.weights)
    prompts = read_texts(args.prompts) if args.prompts else None
    from ..evaluation.sweep import find_optimal_sparsity, load_task
    from ..creative.models import load_model
    from ..evaluation.plots import PLOT_EXTRA_HINT, matplotlib_available
    from ..evaluation.quality import constraints_from_spec

    task = load_task(args.task)
    if prompts is None:
        prompts = list(task["prompts"])
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    model, tokenizer = load_model(args.model)
    model = model.to(args.device)
    quality = build_quality(weights, args.scorer, args.device, constraints_from_spec(task.get("constraints")),
                            model_and_tokenizer=(model, tokenizer))
    result = find_optimal_sparsity(model, args.task, compute_budget=args.budget, quality_weights=weights,
                                   levels=levels, prompts=prompts, num_samples=args.num_samples, tokenizer=tokenizer,
                                   quality=quality, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   use_wrapper=not args.no_wrapper, output_dir=args.out_dir,
                                   plot=matplotlib_available(), progress=not args.no_progress)
    result.settings["model"] = str(args.model)
    result.to_json(os.path.join(args.out_dir, "sweep.json"))
    print(format_result(result))
    json_path = os.path.join(args.out_dir, "sweep.json")
    print(f"wrote {json_path} and {result.plot_path}" if result.plot_path
          else f"wrote {json_path} (no sweep.png: {PLOT_EXTRA_HINT})")
    return 0
