"""`hf-creative-sparse score FILE`: score a file of texts with the quality functional Q.

FILE formats: ``.json`` (a list of strings, or of objects with a "text" field),
``.jsonl`` (one string or {"text": ...} per line), anything else plain text with one text
per line (``--blocks``: texts separated by blank lines, for poems and multi-line code).
Prints a table (or ``--json``) of Novelty, Diversity, Incoherence and Q per text and their
means; see `hf_creative_sparse.evaluation.quality` for the scales.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ._args import model_spec, positive

HELP = "score a file of texts with the quality functional Q (novelty, diversity, incoherence)"


def read_texts(path: str, blocks: bool = False) -> list[str]:
    """Texts from a .json / .jsonl / plain-text file (see the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    if path.endswith(".json"):
        items: list[Any] = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of strings or {{'text': ...}} objects")
    elif path.endswith(".jsonl"):
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif blocks:
        items = [b.strip("\n") for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    else:
        items = [line for line in raw.splitlines() if line.strip()]
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise ValueError(f"{path}: item {i} is not a string or an object with a 'text' string")
        texts.append(item)
    if not texts:
        raise ValueError(f"{path}: no texts found")
    return texts


def parse_weights(text: str | None) -> tuple[float, float, float] | None:
    """"0.4,0.3,0.3" -> (0.4, 0.3, 0.3) (alpha, beta, gamma)."""
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 3:
        raise ValueError(f"--weights takes three numbers alpha,beta,gamma, got {text!r}")
    return (float(parts[0]), float(parts[1]), float(parts[2]))


def build_quality(weights: Any, scorer_spec: str, device: str, constraints: Any = (),
                  nll_scale: float | None = None, model_and_tokenizer: Any = None) -> Any:
    """A QualityFunctional with MiniLM and the scorer named by ``scorer_spec``: "smollm2",
    "model" (``model_and_tokenizer``, the generating model) or a model path."""
    from ..creative.models import load_minilm_embedder
    from ..evaluation.quality import QualityFunctional
    from ..evaluation.scorers import LMScorer

    if scorer_spec == "model":
        if model_and_tokenizer is None:
            raise ValueError("--scorer model needs a generating model")
        model, tokenizer = model_and_tokenizer
    else:
        from ..creative.models import load_model

        model, tokenizer = load_model(scorer_spec)
        model = model.to(device)
    return QualityFunctional(weights, embedder=load_minilm_embedder(device), scorer=LMScorer(model, tokenizer),
                             constraints=constraints, nll_scale=nll_scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="texts: .json list, .jsonl, or plain text (one per line)")
    parser.add_argument("--blocks", action="store_true", help="plain text: texts separated by blank lines")
    parser.add_argument("--reference", default=None,
                        help="reference texts for novelty (same formats; default: the other texts)")
    parser.add_argument("--weights", default=None, help="alpha,beta,gamma of Q (default 0.4,0.3,0.3)")
    parser.add_argument("--scorer", type=model_spec(), default="smollm2",
                        help="LM for incoherence: 'smollm2' (offline default), a model folder, a .gguf file or a "
                             "Hub id")
    parser.add_argument("--nll-scale", type=positive(), default=None,
                        help="nats mapped to incoherence 1 (default ln V)")
    parser.add_argument("--device", default="cpu", help="torch device for the embedder and scorer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")


def format_report(texts: list[str], report: Any) -> str:
    lines = [f"{'#':>3}  {'novelty':>8} {'diversity':>9} {'incoher.':>8} {'Q':>8}  text"]
    for i, text in enumerate(texts):
        preview = " ".join(text.split())
        preview = preview if len(preview) <= 60 else preview[:57] + "..."
        lines.append(f"{i:>3}  {report.novelty[i]:8.4f} {report.diversity[i]:9.4f} {report.incoherence[i]:8.4f} "
                     f"{report.quality[i]:8.4f}  {preview}")
    lines.append(f"{'mean':>3}  {report.mean_novelty:8.4f} {report.mean_diversity:9.4f} "
                 f"{report.mean_incoherence:8.4f} {report.mean_quality:8.4f}")
    distinct = ", ".join(f"distinct-{n} {v:.3f}" for n, v in report.distinct.items())
    lines.append(f"corpus: {distinct}; self-BLEU {report.self_bleu:.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args.file, args.blocks)
    reference = read_texts(args.reference) if args.reference else None
    weights = parse_weights(args.weights)
    if reference is None and len(texts) < 2:
        raise ValueError("one text needs --reference: without it novelty compares the texts with each other")
    quality = build_quality(weights, args.scorer, args.device, nll_scale=args.nll_scale)
    report = quality.evaluate(texts, reference)
    payload = dict(report.to_dict(), texts=texts, scales={"nll_scale": quality.nll_scale,
                                                          "violation_weight": quality.violation_weight})
    from ..evaluation.sweep import _json_safe

    text = json.dumps(_json_safe(payload), indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(text if args.json else format_report(texts, report))
    return 0
