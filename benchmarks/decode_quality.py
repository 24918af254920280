"""Perplexity with decode-time KV-block sparsity vs dense decoding on SmolLM2-135M (offline).

Teacher-forced, one token a step through a DynamicCache: the first ``--start`` tokens of a
held-out text are prefilled densely, then every later token is fed as a decode step and the
model's log-likelihood of the next token is summed. The dense run decodes with SDPA; each
sparse run keeps a fraction (``--budgets``) of the key blocks at every decode step
(`DecodeSparsityConfig`, sink + recent blocks included). Only positions where the sparse
runs are sparse are scored (context >= ``--start``), in every run alike.

The prompt set: texts shipped with Debian (licences) and Python (pydoc topics), which a
135M model was not tuned on for this purpose. Prints a markdown table.

    python benchmarks/decode_quality.py --context 2048 --start 512 --budgets 0.25
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

TEXTS = {
    "GPL-3 licence": "/usr/share/common-licenses/GPL-3",
    "MPL-2.0 licence": "/usr/share/common-licenses/MPL-2.0",
    "Python docs (datamodel)": "pydoc:datamodel",
}


def load_text(source: str) -> str:
    if source.startswith("pydoc:"):
        from pydoc_data.topics import topics

        return topics[source.split(":", 1)[1]]
    with open(source, encoding="utf-8") as f:
        return f.read()


def nll_of_decode(model, ids: torch.Tensor, start: int) -> tuple[float, int]:
    """Summed NLL of tokens start+1 .. len-1, each predicted by a decode step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    total, count = 0.0, 0
    with torch.no_grad():
        model(ids[:, :start], past_key_values=cache, use_cache=True)
        for t in range(start, ids.shape[1] - 1):
            logits = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1].float()
            total += float(torch.nn.functional.cross_entropy(logits[None], ids[:, t + 1]))
            count += 1
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=2048, help="tokens per text")
    parser.add_argument("--start", type=int, default=512, help="prefilled tokens; decode steps score the rest")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import hf_creative_sparse as hcs
    from hf_creative_sparse.config import SparseAttentionConfig
    from hf_creative_sparse.ops.decode import DecodeSparsityConfig
    from hf_creative_sparse.patches import transformers_attention as ta
    from hf_creative_sparse.quality import load_smollm2

    model, tok = load_smollm2()
    hcs.enable_creative_sparse(model, SparseAttentionConfig.dense())  # dense prefill: decode is what is measured
    runs = [("dense (SDPA)", DecodeSparsityConfig(enabled=False))]
    for bs in args.block_sizes:
        for budget in args.budgets:
            runs.append((f"k_attn {budget:.0%}, blocks of {bs}",
                         DecodeSparsityConfig(budget=budget, block_size=bs, min_context=args.start)))
    totals = {name: [0.0, 0] for name, _ in runs}
    kept = {name: [] for name, _ in runs}
    per_text = []
    for label, source in TEXTS.items():
        if not source.startswith("pydoc:") and not os.path.exists(source):
            print(f"skipping {label}: {source} not found")
            continue
        ids = tok(load_text(source), return_tensors="pt").input_ids[:, :args.context]
        row = [label, str(ids.shape[1])]
        for name, cfg in runs:
            ta.set_decode_config(cfg, model)
            for st in ta.decode_states(model).values():
                st.reset_stats()
            t0 = time.perf_counter()
            nll, n = nll_of_decode(model, ids, args.start)
            reports = [st.report() for st in ta.decode_states(model).values()]
            kept[name].append(sum(r["mean_kept_fraction"] for r in reports) / len(reports))
            totals[name][0] += nll
            totals[name][1] += n
            row.append(f"{math.exp(nll / n):.3f}")
            print(f"{label:28s} {name:28s} ppl {math.exp(nll / n):8.3f}  kept {kept[name][-1]:.3f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        per_text.append(row)
    dense_ppl = math.exp(totals[runs[0][0]][0] / totals[runs[0][0]][1])
    print("\n| text | tokens | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for row in per_text:
        print("| " + " | ".join(row) + " |")
    print("\n| run | perplexity (all texts) | vs dense | mean kept fraction of blocks |")
    print("|---|---|---|---|")
    for name, _ in runs:
        ppl = math.exp(totals[name][0] / totals[name][1])
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.2f}% | {sum(kept[name]) / len(kept[name]):.3f} |")


if __name__ == "__main__":
    main()
