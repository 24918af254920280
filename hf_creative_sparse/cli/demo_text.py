"""The creative-writing section of ``hf-creative-sparse demo`` (called by commands/demo.py).

Same prompt, same model (SmolLM2-135M-Instruct, offline), same number of texts, two ways:

- dense top-p: plain ``model.generate`` with SDPA attention, temperature 1, top-p 0.9;
- two-stage: `CreativeSparseWrapper`: openings drafted at s_A = 0.7, the best (by Q)
  continued at s_B = 0.3 with ``creative_sparse`` attention, reranked by Q.

Every text is scored by one `QualityFunctional` (MiniLM embeddings, SmolLM2 NLL), within
its own method's set, and the table shows the components: N (novelty against the other
texts of the set), D (diversity), I (incoherence) and Q = 0.4 N + 0.3 D - 0.3 I; then
each method's pick scored together, with novelty measured against the prompt.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PROMPT = "Write the opening of a short story about a lighthouse keeper who finds a door in the sea."
TOP_P = 0.9


def _dense_top_p(model: Any, tokenizer: Any, prompt: str, n: int, max_new_tokens: int, seed: int) -> list[str]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(ids.expand(n, -1), attention_mask=torch.ones(n, ids.shape[1], dtype=torch.long),
                             do_sample=True, temperature=1.0, top_k=0, top_p=TOP_P, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def format_rows(method: str, texts: list[str], report: Any, width: int = 64) -> list[str]:
    """Table rows of one method's texts, best Q first, then the method's means."""
    order = sorted(range(len(texts)), key=lambda i: report.quality[i], reverse=True)
    rows = [f"{method:<12} {report.novelty[i]:5.3f} {report.diversity[i]:5.3f} {report.incoherence[i]:5.3f} "
            f"{report.quality[i]:6.3f}  {_short(texts[i], width)}" for i in order]
    rows.append(f"{'  mean':<12} {report.mean_novelty:5.3f} {report.mean_diversity:5.3f} "
                f"{report.mean_incoherence:5.3f} {report.mean_quality:6.3f}")
    return rows


def run_text_demo(max_new_tokens: int = 60, num_candidates: int = 3, seed: int = 0,
                  prompt: str = PROMPT) -> str:
    """Dense top-p against two-stage decoding on SmolLM2, side by side with Q components.

    Returns the printed table as text (or one line saying why the section cannot run).
    """
    from ..creative.models import load_smollm2
    from ..evaluation.quality import QualityFunctional
    from ..evaluation.scorers import LMScorer

    try:
        t0 = time.time()
        model, tokenizer = load_smollm2()
        load_s = time.time() - t0
    except ImportError as err:
        return f"(skipped: {err})"
    from ..creative.wrapper import CreativeSparseWrapper

    qf = QualityFunctional(scorer=LMScorer(model, tokenizer))
    t0 = time.time()
    dense = _dense_top_p(model, tokenizer, prompt, num_candidates, max_new_tokens, seed)
    dense_s = time.time() - t0
    wrapper = CreativeSparseWrapper(model, tokenizer, scorer=qf, seed=seed)
    try:
        t0 = time.time()
        cands = wrapper.generate_creative(prompt, max_new_tokens=max_new_tokens, num_candidates=num_candidates,
                                          return_best=False)
        two_stage_s = time.time() - t0
        attention = wrapper.layer_report()
    finally:
        wrapper.close()
    two_stage = [c.text for c in cands]
    dense_report, staged_report = qf.evaluate(dense), qf.evaluate(two_stage)
    cp_a = wrapper.controller.get_sparsity_params(wrapper.schedule.diverge)
    cp_b = wrapper.controller.get_sparsity_params(wrapper.schedule.refine)
    fallback = sorted({r for row in attention for r in row["fallback_reasons"]})
    lines = [
        f"prompt: {prompt!r}",
        f"{num_candidates} texts of {max_new_tokens} new tokens per method, seed {seed} "
        f"(model loaded in {load_s:.0f} s)",
        f"dense top-p: T=1.00, top_p={TOP_P}, SDPA; {dense_s:.0f} s",
        f"two-stage:   stage A s={cp_a.s:.1f} (T={cp_a.temperature:.2f}, p={cp_a.top_p:.3f}, "
        f"k_attn={cp_a.attention_budget:.2f}) for {round(wrapper.schedule.switch * max_new_tokens)} tokens, best "
        f"opening by Q; stage B s={cp_b.s:.1f} (T={cp_b.temperature:.2f}, p={cp_b.top_p:.3f}, "
        f"k_attn={cp_b.attention_budget:.2f}); {two_stage_s:.0f} s",
        f"attention: creative_sparse, calls ran {', '.join(fallback) or 'sparse'}"
        + (" (prompts are shorter than min_seq_len: the kernel policy keeps them dense)"
           if "short sequence" in fallback else ""),
        "",
        f"{'method':<12} {'N':>5} {'D':>5} {'I':>5} {'Q':>6}  text",
    ]
    lines += format_rows("dense top-p", dense, dense_report)
    openings = [text for text, _ in wrapper.last_openings]
    lines += format_rows("A: openings", openings, qf.evaluate(openings))
    lines += format_rows("B: final", two_stage, staged_report)
    # Head to head: each method's pick (best Q in its set), novelty against the prompt,
    # diversity of the text itself, incoherence under SmolLM2.
    picks = [dense[max(range(len(dense)), key=lambda i: dense_report.quality[i])], two_stage[0]]
    head = qf.evaluate(picks, reference_data=[prompt], groups=[0, 1])
    lines += ["", "picks, scored together (N against the prompt):",
              f"{'method':<12} {'N':>5} {'D':>5} {'I':>5} {'Q':>6}  text"]
    for i, method in enumerate(("dense top-p", "two-stage")):
        lines.append(f"{method:<12} {head.novelty[i]:5.3f} {head.diversity[i]:5.3f} {head.incoherence[i]:5.3f} "
                     f"{head.quality[i]:6.3f}  {_short(picks[i], 64)}")
    lines += ["", "N, D within a set: the two-stage finals share their opening by design, so they are "
              "compared with each other less than the dense samples are."]
    return "\n".join(lines)
