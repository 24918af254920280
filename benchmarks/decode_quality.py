"""Perplexity with decode-time KV-block sparsity vs dense decoding on SmolLM2-135M (offline).

Teacher-forced, one token a step through a DynamicCache: the first ``--start`` tokens of a
held-out text are prefilled densely, then every later token is fed as a decode step and the
model's log-likelihood of the next token is summed. The dense run decodes with SDPA; each
sparse run keeps a fraction (``--budgets``) of the key blocks at every decode step
(`DecodeSparsityConfig` with its defaults but for the options given: sink + recent blocks
included, dense below ``min_context`` = 2048 cached keys). The same positions (context >=
``--start``) are scored in every run.

The prompt sets (`TEXT_SETS`): texts shipped with Debian (licences) and Python (pydoc
topics); "tuning" chose the defaults, "held_out" is reported. Prints markdown tables.
`benchmarks/decode_selection_sim.py` compares many selection policies far faster.

    python benchmarks/decode_quality.py --set held_out --budgets 0.25 --dense-forward --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

#: Two disjoint prompt sets: "tuning" chose the defaults (block size, dense layers, forced
#: blocks, score); "held_out" chose nothing and is the one reported. Every text has at least
#: 5,200 SmolLM2 tokens (MPL-1.1 stands in for the earlier MPL-2.0, which has only 3,712).
TEXT_SETS = {
    "held_out": {
        "GPL-3 licence": "/usr/share/common-licenses/GPL-3",
        "MPL-1.1 licence": "/usr/share/common-licenses/MPL-1.1",
        "Python docs (special method names)": "pydoc:specialnames",
        "Python docs (compound statements)": "pydoc:compound",
    },
    "tuning": {
        "GFDL-1.3 licence": "/usr/share/common-licenses/GFDL-1.3",
        "LGPL-2.1 licence": "/usr/share/common-licenses/LGPL-2.1",
        "Python docs (built-in types)": "pydoc:types",
        "Python docs (format strings)": "pydoc:formatstrings",
    },
}


def load_text(source: str) -> str:
    if source.startswith("pydoc:"):
        from pydoc_data.topics import topics

        return topics[source.split(":", 1)[1]]
    with open(source, encoding="utf-8") as f:
        return f.read()


def load_ids(tokenizer, text_set: str, context: int) -> tuple[list[str], torch.Tensor]:
    """(labels, token ids [texts, context]) of the first ``context`` tokens of every text of
    ``text_set`` found on this machine (a missing licence file is skipped with a message)."""
    if text_set not in TEXT_SETS:
        raise ValueError(f"text_set must be one of {sorted(TEXT_SETS)}, got {text_set!r}")
    labels, rows = [], []
    for label, source in TEXT_SETS[text_set].items():
        if not source.startswith("pydoc:") and not os.path.exists(source):
            print(f"skipping {label}: {source} not found")
            continue
        ids = tokenizer(load_text(source), return_tensors="pt").input_ids[0, :context]
        if ids.numel() < context:
            raise ValueError(f"{label} has {ids.numel()} tokens < --context {context}")
        labels.append(label)
        rows.append(ids)
    if not rows:
        raise ValueError(f"no text of the set {text_set!r} was found")
    return labels, torch.stack(rows)  # equal lengths: no padding


def nll_of_decode(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Summed NLL per text [B] of tokens start+1 .. len-1, each predicted by a decode step
    (the texts run as one batch: a decode step reads the weights once for all of them)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    with torch.no_grad():
        model(ids[:, :start], past_key_values=cache, use_cache=True)
        for t in range(start, ids.shape[1] - 1):
            logits = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[:, t + 1], reduction="none").double()
    return total


def nll_of_forward(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The dense run's `nll_of_decode` in one teacher-forced forward (the same positions; dense
    attention over the prefix is the same math as dense decode steps, up to float rounding)."""
    with torch.no_grad():
        logits = model(ids).logits[:, start:-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, start + 1:], reduction="none").double().sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(TEXT_SETS), default="held_out",
                        help="prompt set (tuning chose the defaults; held_out is reported)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per text")
    parser.add_argument("--start", type=int, default=2048, help="prefilled tokens; decode steps score the rest")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[None],
                        help="one sparse run per value (default: DecodeSparsityConfig's)")
    parser.add_argument("--scores", nargs="+", default=[None], help="mass, bound (default: the config's)")
    parser.add_argument("--dense-layers", type=int, nargs="+", default=[None],
                        help="first layers decoded dense (Quest: 2); one sparse run per value")
    parser.add_argument("--min-context", type=int, default=None,
                        help="decode steps with fewer cached keys run dense (default: the config's, 2048)")
    parser.add_argument("--skip-dense", action="store_true",
                        help="no dense run (its perplexity is deterministic: take it from another run)")
    parser.add_argument("--dense-forward", action="store_true",
                        help="score the dense run in one forward instead of step by step (same math, far cheaper)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import hf_creative_sparse as hcs
    from hf_creative_sparse.ops.config import SparseAttentionConfig
    from hf_creative_sparse.ops.decode import DecodeSparsityConfig
    from hf_creative_sparse.patches import transformers_attention as ta
    from hf_creative_sparse.creative.models import load_smollm2

    model, tok = load_smollm2()
    hcs.enable_creative_sparse(model, SparseAttentionConfig.dense())  # dense prefill: decode is what is measured
    runs = [] if args.skip_dense else [("dense (SDPA)", DecodeSparsityConfig(enabled=False))]
    for bs in args.block_sizes:
        for score in args.scores:
            for budget in args.budgets:
                for dense_layers in args.dense_layers:
                    changes = {k: v for k, v in (("block_size", bs), ("score", score), ("dense_layers", dense_layers),
                                                 ("min_context", args.min_context)) if v is not None}
                    cfg = DecodeSparsityConfig(budget=budget, **changes)
                    name = (f"k_attn {budget:.0%}, blocks of {cfg.block_size}, score {cfg.score}"
                            + (f", first {cfg.dense_layers} layers dense" if cfg.dense_layers else ""))
                    runs.append((name, cfg))
    labels, ids = load_ids(tok, args.set, args.context)
    scored = ids.shape[1] - 1 - args.start
    nll, kept = {}, {}
    for name, cfg in runs:
        ta.set_decode_config(cfg, model)
        for st in ta.decode_states(model).values():
            st.reset_stats()
        t0 = time.perf_counter()
        if args.dense_forward and not cfg.enabled:
            nll[name] = nll_of_forward(model, ids, args.start)
        else:
            nll[name] = nll_of_decode(model, ids, args.start)
        reports = [st.report() for st in ta.decode_states(model).values()]
        kept[name] = sum(r["mean_kept_fraction"] for r in reports) / len(reports)
        ppl = math.exp(float(nll[name].sum()) / (scored * len(labels)))
        print(f"{name:28s} ppl {ppl:8.3f}  kept {kept[name]:.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    sparse_from = max((cfg.min_context for _, cfg in runs if cfg.enabled), default=0)
    print(f"\nSmolLM2-135M-Instruct, set {args.set}: {len(labels)} texts x {args.context} tokens, the first "
          f"{args.start} prefilled densely, {scored} decode steps scored per text (sparse where the cache holds "
          f">= {sparse_from} keys)")
    print("\n| text | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i, label in enumerate(labels):
        print(f"| {label} | " + " | ".join(f"{math.exp(float(nll[name][i]) / scored):.3f}" for name, _ in runs) + " |")
    dense = math.exp(float(nll[runs[0][0]].sum()) / (scored * len(labels))) if not args.skip_dense else math.nan
    print("\n| run | perplexity (all texts) | vs dense | mean kept fraction of blocks |")
    print("|---|---|---|---|")
    for name, _ in runs:
        ppl = math.exp(float(nll[name].sum()) / (scored * len(labels)))
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / dense - 1):+.2f}% | {kept[name]:.3f} |")

if __name__ == "__main__":
    main()
