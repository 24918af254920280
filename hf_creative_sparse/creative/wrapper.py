"""Draft, pick, refine: `CreativeSparseWrapper`, two-stage creative generation around a
causal LM, and the `Candidate` it returns.

One concern: the search over candidates. It drafts several openings at s_A, keeps the best
``num_openings`` by the quality functional Q, continues them at s_B under constraint-aware
decoding and reranks with incoherence calibrated against the model's own samples of the
prompt. The per-step filters and the published dial are `processor`'s.

One file because it is one search: drafting, judging (novelty's reference, the calibrated
incoherence) and reranking share the candidates' token ids and the per-call references.

Example:
    >>> wrapper = CreativeSparseWrapper()                                   # doctest: +SKIP
    >>> wrapper.generate_creative("Write a line about the sea.", max_new_tokens=40)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from ..evaluation.quality import QualityFunctional
from ..evaluation.scorers import LMScorer, NLLReference
from .constraints import BannedWordsLogitsProcessor, Constraints, RequiredWordsLogitsProcessor
from .control import SparsityConfig, SparsityController, TwoStageSchedule, use_sparsity
from .models import load_model
from .processor import NEUTRAL_SAMPLING, CreativeSparseLogitsProcessor

#: `CreativeSparseWrapper.generate_creative`'s default number of new tokens.
DEFAULT_MAX_NEW_TOKENS = 200
#: Candidates whose NLL lies more than this many standard deviations above the model's own
#: samples of the prompt (the schedule alone) rank last (`CreativeSparseWrapper`).
DEFAULT_INCOHERENCE_BOUND = 2.0


@dataclass
class Candidate:
    """One generated text and how it was judged.

    Attributes:
        text: the generated text (without the prompt).
        score: the ranking score: quality - penalty * violations.
        quality: Q from the scorer.
        violations: constraint violations (see `Constraints.violations`).
        components: novelty / diversity / incoherence when the scorer is a QualityFunctional.
        opening: the stage-A opening this text continues ('' for a single-stage run).
        opening_score: that opening's quality among the drafts (NaN for a single stage).
        s: the dial of each stage, (s_A, s_B), or (s, s) for a single stage.
        within_bound: whether its NLL lies within the wrapper's ``incoherence_bound``
            (candidates outside rank after every candidate inside).
    """

    text: str
    score: float
    quality: float
    violations: float = 0.0
    components: dict[str, float] | None = None
    opening: str = ""
    opening_score: float = math.nan
    s: tuple[float, float] = (math.nan, math.nan)
    within_bound: bool = True



Scorer = Callable[[list[str]], Sequence[float]]


def _renamed(where: str, name: str, value: Any, old_name: str, old_value: Any) -> Any:
    """``value``, or the value given under the deprecated name ``old_name`` (warns; both given
    is an error)."""
    if old_value is None:
        return value
    warnings.warn(f"{where}({old_name}=...) is deprecated: pass {name}= (the same meaning)", DeprecationWarning,
                  stacklevel=3)
    if value is not None:
        raise ValueError(f"give {name} or its deprecated alias {old_name}, not both")
    return old_value


def _coerce_schedule(schedule: TwoStageSchedule | tuple[float, float] | None, switch: float | None) -> TwoStageSchedule:
    """A `TwoStageSchedule` from a schedule, an (s_A, s_B) pair (with ``switch``) or None
    (the defaults, with ``switch`` when given)."""
    if isinstance(schedule, TwoStageSchedule):
        if switch is not None:
            raise ValueError("switch is part of the TwoStageSchedule: give it there, not as switch=")
        return schedule
    default = TwoStageSchedule()
    if schedule is None:
        return TwoStageSchedule(default.diverge, default.refine, default.switch if switch is None else switch)
    if not (isinstance(schedule, (tuple, list)) and len(schedule) == 2):
        raise ValueError(f"schedule must be a TwoStageSchedule or (s_A, s_B), got {schedule!r}")
    return TwoStageSchedule(float(schedule[0]), float(schedule[1]), default.switch if switch is None else switch)


#: What novelty is measured against when no reference texts are given.
NOVELTY_REFERENCES = ("candidates", "greedy")


class CreativeSparseWrapper:
    """Draft, pick, refine: two-stage creative generation around a causal LM.

    Args:
        model_or_path: a transformers causal LM, a path (folder or .gguf), or None for the
            offline default SmolLM2-135M-Instruct.
        tokenizer: its tokenizer (loaded from the path when None).
        schedule: a `TwoStageSchedule`, or (s_A, s_B) with ``switch``; default
            `TwoStageSchedule()`.
        quality_weights: `QualityWeights` (or a 3-tuple / dict) of the default scorer.
        config: `SparsityConfig` of the controller (manifold constants).
        switch: fraction of ``max_new_tokens`` generated in stage A (the opening) when
            ``schedule`` is a pair or None.
        scorer: ``texts -> list of scores`` (higher is better) or a `QualityFunctional`;
            default a QualityFunctional with ``quality_weights`` that scores NLL with this
            model (no second LM) and embeds with MiniLM.
        reference_data: reference texts for novelty (default: the other candidates).
        novelty_reference: without ``reference_data``, what a `QualityFunctional` scorer
            measures novelty against: "greedy" (default: the model's greedy answer to the
            prompt, `generate_greedy`, one more generation per call; on SmolLM2 the
            best-of-5's novelty to the greedy answer went 0.504 -> 0.624 on held-out
            prompts at NLL 1.43 -> 1.39, BENCHMARKS.md) or "candidates" (each candidate
            against the others, which favours the odd one out).
        seed: base seed; every call with the same seed gives the same candidates.
        batch_size: sequences generated at once.
        sparse_attention: route the model's attention through ``creative_sparse``
            (k_attn(s) per stage; sequences below the kernel's ``min_seq_len`` stay dense).
        attention_config: base `SparseAttentionConfig` of the attention patch.
        chat_template: wrap the prompt in the tokenizer's chat template (None: when it has one).
        progress: show a progress bar (None: when stderr is a terminal).
        num_openings: m, how many of the best stage-A openings stage B continues (the
            candidates are dealt round-robin among them).
        calibration_samples: samples of the prompt drawn with the schedule alone (the
            processor's own output) whose NLL calibrates the incoherence term
            (`quality.NLLReference`, `reference_nll`); 0: uncalibrated (ln V scale).
        incoherence_bound: candidates whose NLL lies more than this many standard
            deviations above those samples rank after all others (inf: no bound).
        sparsity_schedule, sparsity_config: deprecated aliases of ``schedule`` and ``config``.

    Example:
        >>> wrapper = CreativeSparseWrapper()                                   # doctest: +SKIP
        >>> wrapper.generate_creative("Write a line about the sea.", max_new_tokens=40)  # doctest: +SKIP
    """

    def __init__(self, model_or_path: Any = None, tokenizer: Any = None,
                 schedule: TwoStageSchedule | tuple[float, float] | None = None, quality_weights: Any = None,
                 config: SparsityConfig | None = None, *, switch: float | None = None,
                 scorer: Scorer | Any = None, reference_data: Sequence[str] | None = None,
                 novelty_reference: str = "greedy",
                 seed: int | None = None, batch_size: int = 8, sparse_attention: bool = True,
                 attention_config: Any = None, chat_template: bool | None = None,
                 progress: bool | None = None, num_openings: int = 3, calibration_samples: int = 4,
                 incoherence_bound: float = DEFAULT_INCOHERENCE_BOUND,
                 sparsity_schedule: tuple[float, float] | None = None,
                 sparsity_config: SparsityConfig | None = None) -> None:
        schedule = _renamed("CreativeSparseWrapper", "schedule", schedule, "sparsity_schedule", sparsity_schedule)
        config = _renamed("CreativeSparseWrapper", "config", config, "sparsity_config", sparsity_config)
        self.schedule = _coerce_schedule(schedule, switch)
        for name, value, low in (("batch_size", batch_size, 1), ("num_openings", num_openings, 1),
                                 ("calibration_samples", calibration_samples, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if calibration_samples == 1:
            raise ValueError("calibration_samples must be 0 (no calibration) or >= 2 (a mean and a spread)")
        if isinstance(incoherence_bound, bool) or not isinstance(incoherence_bound, (int, float)) \
                or math.isnan(incoherence_bound):
            raise ValueError(f"incoherence_bound must be a number of standard deviations (inf: no bound), "
                             f"got {incoherence_bound!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if scorer is not None and not callable(scorer) and not hasattr(scorer, "evaluate"):
            raise TypeError(f"scorer must be callable (texts -> scores) or a QualityFunctional, got {type(scorer).__name__}")
        self.num_openings, self.calibration_samples = num_openings, calibration_samples
        self.incoherence_bound = float(incoherence_bound)
        self.model, self.tokenizer = load_model(model_or_path, tokenizer)
        self.model.eval()
        self.controller = SparsityController.for_model(self.model, config)
        self.quality_weights = quality_weights
        self.reference_data = list(reference_data) if reference_data is not None else None
        if novelty_reference not in NOVELTY_REFERENCES:
            raise ValueError(f"novelty_reference must be one of {NOVELTY_REFERENCES}, got {novelty_reference!r}")
        self.novelty_reference = novelty_reference
        self.seed, self.batch_size, self.progress = seed, batch_size, progress
        self._scorer = scorer
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        if self.chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self._banned_cache: dict[tuple[str, ...], BannedWordsLogitsProcessor] = {}
        self._lm: Any = None
        #: (opening text, Q) of every stage-A draft of the last two-stage call.
        self.last_openings: list[tuple[str, float]] = []
        #: The NLL yardstick of the last call's prompt (None without calibration).
        self.last_reference: NLLReference | None = None
        self._patch = None
        if sparse_attention:
            self._enable_attention(attention_config)

    # -- set-up ----------------------------------------------------------------------

    def _enable_attention(self, attention_config: Any) -> None:
        from ..integrations.enable import enable_creative_sparse, get_handle
        from ..ops.config import SparseAttentionConfig
        from ..integrations.state import PatchOptions

        if get_handle(self.model) is not None or \
                getattr(self.model.config, "_attn_implementation", None) == "creative_sparse":
            return  # already patched by the user: keep their settings
        cfg = attention_config if attention_config is not None else SparseAttentionConfig()
        self._patch = enable_creative_sparse(self.model, cfg, options=PatchOptions(controller=self.controller))

    def close(self) -> None:
        """Restore the model's original attention implementation (when this wrapper patched it)."""
        if self._patch is not None:
            self._patch.disable()
            self._patch = None

    @property
    def scorer(self) -> Any:
        """The quality scorer (built on first use)."""
        if self._scorer is None:
            self._scorer = QualityFunctional(self.quality_weights, scorer=LMScorer(self.model, self.tokenizer))
        return self._scorer

    def layer_report(self) -> list[dict[str, Any]]:
        """Per-layer attention statistics of the patch (empty without one)."""
        if self._patch is None:
            return []
        return [state.report_row() for state in self._patch.layer_states().values()]

    # -- pieces ----------------------------------------------------------------------

    def _encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if self.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.model.device)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = sorted(self._eos_ids())
            pad = eos[0] if eos else 0
        return int(pad)

    def _banned(self, constraints: Constraints | None) -> list[LogitsProcessor]:
        if constraints is None or not constraints.banned_words:
            return []
        key = tuple(constraints.banned_words)
        if key not in self._banned_cache:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._banned_cache[key] = BannedWordsLogitsProcessor(self.tokenizer, vocab, constraints.banned_words)
        return [self._banned_cache[key]]

    def _trim(self, ids: list[int]) -> list[int]:
        stop = self._eos_ids() | {self._pad_id()}
        for i, t in enumerate(ids):
            if t in stop:
                return ids[:i]
        return ids

    @contextlib.contextmanager
    def _rng(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _sample(self, input_ids: torch.Tensor, n: int, *, schedule: TwoStageSchedule, total_steps: int,
                step_offset: int, new_tokens: int, min_new_tokens: int, extra: list[LogitsProcessor],
                seed: int | None, bar: Any) -> list[list[int]]:
        """``n`` samples of ``new_tokens`` tokens continuing ``input_ids``: [1, L] (n samples of
        one prefix) or [n, L] (one sample per row), batched."""
        if input_ids.shape[0] not in (1, n):
            raise ValueError(f"input_ids must have 1 or n = {n} rows, got {input_ids.shape[0]}")
        out: list[list[int]] = []
        length = input_ids.shape[1]
        for index, start in enumerate(range(0, n, self.batch_size)):
            rows = min(self.batch_size, n - start)
            ids = input_ids.expand(rows, -1) if input_ids.shape[0] == 1 else input_ids[start:start + rows]
            proc = CreativeSparseLogitsProcessor(length, total_steps, schedule=schedule, controller=self.controller,
                                                 model=self.model, step_offset=step_offset)
            kwargs = dict(NEUTRAL_SAMPLING, max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
                          pad_token_id=self._pad_id(), attention_mask=torch.ones_like(ids),
                          logits_processor=LogitsProcessorList(extra + [proc]))
            with self._rng(None if seed is None else seed + index), proc, torch.no_grad():
                seqs = self.model.generate(ids, **kwargs)
            out.extend(self._trim(row[length:].tolist()) for row in seqs)
            if bar is not None:
                bar.update(rows)
        return out

    def _nll(self, prompt_ids: torch.Tensor, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token NLL of each continuation given the prompt (the generating model)."""
        if self._lm is None:
            scorer = getattr(self.scorer, "scorer", None) if hasattr(self.scorer, "evaluate") else None
            self._lm = scorer if isinstance(scorer, LMScorer) else LMScorer(self.model, self.tokenizer)
        return self._lm.continuation_token_nll(prompt_ids[0].tolist(), continuations)

    def _uses_own_nll(self) -> bool:
        """Whether the scorer's NLL may be replaced by the prompt-conditioned one (the default
        scorer, or a QualityFunctional over an `LMScorer`); a user's own NLL scorer is kept."""
        inner = getattr(self.scorer, "_scorer", None)
        return hasattr(self.scorer, "evaluate") and (inner is None or isinstance(inner, LMScorer))

    def reference_nll(self, prompt_ids: torch.Tensor, new_tokens: int, seed: int | None) -> list[np.ndarray] | None:
        """Per-token NLL of ``calibration_samples`` samples of the prompt drawn with the
        wrapper's schedule alone (what `CreativeSparseLogitsProcessor` gives without drafts,
        selection or reranking): the model's own yardstick for this prompt, against which
        the candidates' NLL is z-scored (None without calibration)."""
        if self.calibration_samples == 0 or not self._uses_own_nll():
            return None
        refs = self._sample(prompt_ids, self.calibration_samples, schedule=self.schedule, total_steps=new_tokens,
                            step_offset=0, new_tokens=new_tokens, min_new_tokens=0, extra=[],
                            seed=None if seed is None else seed + 200_003, bar=None)
        return self._nll(prompt_ids, refs)

    def score(self, texts: list[str], prompt: str = "", *, nll: Sequence[float] | None = None,
              nll_reference: NLLReference | None = None,
              references: Sequence[str] | None = None) -> tuple[list[float], list[dict[str, float]] | None]:
        """(Q per text, components per text or None) from the scorer; ``nll`` and
        ``nll_reference`` go to a `QualityFunctional` (see `QualityFunctional.evaluate`);
        ``references`` (novelty's reference texts) replace ``reference_data`` for this call."""
        scorer = self.scorer
        if hasattr(scorer, "evaluate"):
            refs = list(references) if references is not None else self.reference_data
            if refs is None and len(texts) < 2:
                refs = [prompt] if prompt else None
            report = scorer.evaluate(texts, refs, nll=nll, nll_reference=nll_reference)
            comps = [{"novelty": n, "diversity": d, "incoherence": i}
                     for n, d, i in zip(report.novelty, report.diversity, report.incoherence)]
            return [float(q) for q in report.quality], comps
        scores = [float(x) for x in scorer(list(texts))]
        if len(scores) != len(texts):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(texts)} texts")
        return scores, None

    def _judge(self, texts: list[str], ids: list[list[int]], prompt: str, prompt_ids: torch.Tensor,
               reference: list[np.ndarray] | None, references: list[str] | None = None
               ) -> tuple[list[float], list[dict[str, float]] | None, list[float]]:
        """(Q, components, z of the NLL against the reference) for texts of token ids ``ids``.
        Reference and candidates are compared over the same number of leading tokens."""
        if not self._uses_own_nll():
            quality, comps = self.score(texts, prompt, references=references)
            return quality, comps, [0.0] * len(texts)
        token_nll = self._nll(prompt_ids, ids)
        nll = [float(x.mean()) if len(x) else math.nan for x in token_nll]
        ref = None
        if reference is not None:
            span = max((len(x) for x in token_nll), default=0)
            ref_nll = [float(r[:span].mean()) for r in reference if len(r)]
            if len(ref_nll) >= 2 and span > 0:
                ref = NLLReference.from_samples(ref_nll)
        self.last_reference = ref
        quality, comps = self.score(texts, prompt, nll=nll, nll_reference=ref, references=references)
        z = [ref.z(x) if ref is not None else 0.0 for x in nll]
        if comps is not None:
            for c, x, zi in zip(comps, nll, z):
                c["nll"], c["nll_z"] = x, zi
        return quality, comps, z

    # -- the public call -------------------------------------------------------------

    def generate_creative(self, prompt: str, max_new_tokens: int | None = None, num_candidates: int = 5,
                          return_best: bool = True, sparsity_level: float | None = None,
                          constraints: Constraints | dict | None = None, *, seed: int | None = None,
                          progress: bool | None = None, max_length: int | None = None) -> str | list[Candidate]:
        """Two-stage creative generation.

        Stage A drafts ``num_candidates`` openings (``switch * max_new_tokens`` new tokens)
        at s_A and ranks them by Q; stage B continues the best ``num_openings`` of them at
        s_B, ``num_candidates`` continuations in all, dealt round-robin (banned words
        forbidden in both stages, missing required words encouraged); the full texts are
        reranked by Q - penalty * violations. Incoherence is calibrated against
        ``calibration_samples`` samples of the same prompt drawn with the schedule alone
        (`reference_nll`, `NLLReference`), and
        candidates whose NLL lies more than ``incoherence_bound`` standard deviations above
        them rank after every candidate within the bound. With ``sparsity_level`` a single
        stage samples ``num_candidates`` texts at that s instead.

        Args:
            prompt: the user prompt (wrapped in the chat template when enabled).
            max_new_tokens: new tokens in all (both stages); default 200.
            num_candidates: drafts per stage.
            return_best: return the best text; False returns every `Candidate`, best first
                (texts repeated exactly are returned once).
            sparsity_level: a single-stage run at this s.
            constraints: `Constraints` or a dict of its fields.
            seed: overrides the wrapper's seed for this call.
            max_length: deprecated alias of ``max_new_tokens``.

        Returns:
            The best text, or the list of `Candidate` sorted by rank (best first).
        """
        max_new_tokens = _renamed("generate_creative", "max_new_tokens", max_new_tokens, "max_length", max_length)
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        for name, value in (("max_new_tokens", max_new_tokens), ("num_candidates", num_candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        constraints = Constraints.coerce(constraints)
        seed = self.seed if seed is None else seed
        ids = self._encode(prompt)
        # every wrapper call takes seconds on a CPU: show progress by default where a person watches
        show = progress if progress is not None else (self.progress if self.progress is not None else sys.stderr.isatty())
        from tqdm.auto import tqdm

        reference = self.reference_nll(ids, max_new_tokens, seed)
        novelty_refs = [self.generate_greedy(prompt, max_new_tokens)] if (
            self.novelty_reference == "greedy" and self.reference_data is None and hasattr(self.scorer, "evaluate")
        ) else None
        if sparsity_level is not None:
            single = TwoStageSchedule(sparsity_level, sparsity_level, switch=1.0)
            bar = tqdm(total=num_candidates, desc="candidates", disable=not show)
            extra = self._banned(constraints) + self._required(constraints, ids.shape[1], ids.shape[1], 0,
                                                               max_new_tokens)
            drafts = self._sample(ids, num_candidates, schedule=single, total_steps=max_new_tokens, step_offset=0,
                                  new_tokens=max_new_tokens, min_new_tokens=0, extra=extra, seed=seed, bar=bar)
            bar.close()
            return self._finish(drafts, prompt, ids, reference, constraints, return_best,
                                openings=[""] * len(drafts), opening_scores=[math.nan] * len(drafts),
                                s=(single.diverge, single.refine), unique=False, references=novelty_refs)

        n_a = min(max_new_tokens, max(1, round(self.schedule.switch * max_new_tokens)))
        n_b = max_new_tokens - n_a
        bar = tqdm(total=num_candidates * (2 if n_b else 1), desc="candidates", disable=not show)
        openings = self._sample(ids, num_candidates, schedule=self.schedule, total_steps=max_new_tokens,
                                step_offset=0, new_tokens=n_a, min_new_tokens=n_a, extra=self._banned(constraints),
                                seed=seed, bar=bar)
        opening_texts = [self._decode(o) for o in openings]
        opening_q, _, opening_z = self._judge(opening_texts, openings, prompt, ids, reference, novelty_refs)
        self.last_openings = list(zip(opening_texts, opening_q))
        s_pair = (self.schedule.diverge, self.schedule.refine)
        if n_b == 0:
            bar.close()
            return self._finish(openings, prompt, ids, reference, constraints, return_best, openings=opening_texts,
                                opening_scores=opening_q, s=s_pair, unique=True, references=novelty_refs)
        ranked = sorted(range(len(openings)), key=lambda i: (opening_z[i] > self.incoherence_bound, -opening_q[i]))
        kept = ranked[: min(self.num_openings, len(ranked))]
        owner = [kept[j % len(kept)] for j in range(num_candidates)]  # dealt round-robin
        owner.sort(key=kept.index)
        conts: list[list[int]] = []
        same_length = len({len(openings[o]) for o in kept}) == 1
        groups = [owner] if same_length else [[o] * owner.count(o) for o in kept]  # one batch when rows align
        for k, group in enumerate(groups):
            base = torch.cat([ids.expand(len(group), -1),
                              torch.tensor([openings[o] for o in group], dtype=ids.dtype, device=ids.device)], dim=1)
            extra = self._banned(constraints) + self._required(constraints, ids.shape[1], base.shape[1], n_a,
                                                               max_new_tokens)
            conts.extend(self._sample(base, len(group), schedule=self.schedule, total_steps=max_new_tokens,
                                      step_offset=n_a, new_tokens=n_b, min_new_tokens=0, extra=extra,
                                      seed=None if seed is None else seed + 100_003 * (k + 1), bar=bar))
        bar.close()
        full = [openings[o] + c for o, c in zip(owner, conts)]
        return self._finish(full, prompt, ids, reference, constraints, return_best,
                            openings=[opening_texts[o] for o in owner], opening_scores=[opening_q[o] for o in owner],
                            s=s_pair, unique=True, references=novelty_refs)

    def generate_greedy(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """The model's greedy answer to ``prompt`` at s = 0 (dense attention): what it says by
        default, the reference of novelty."""
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids = self._encode(prompt)
        with use_sparsity(0.0), torch.no_grad():
            seq = self.model.generate(ids, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                      max_new_tokens=max_new_tokens, pad_token_id=self._pad_id(),
                                      attention_mask=torch.ones_like(ids))
        return self._decode(self._trim(seq[0, ids.shape[1]:].tolist()))

    def _required(self, constraints: Constraints | None, text_start: int, prompt_length: int, step_offset: int,
                  total_steps: int) -> list[LogitsProcessor]:
        if constraints is None or not constraints.required_words or constraints.required_bias == 0:
            return []
        return [RequiredWordsLogitsProcessor(self.tokenizer, constraints.required_words, text_start=text_start,
                                             prompt_length=prompt_length, step_offset=step_offset,
                                             total_steps=total_steps, bias=constraints.required_bias)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _finish(self, ids: list[list[int]], prompt: str, prompt_ids: torch.Tensor,
                reference: list[np.ndarray] | None, constraints: Constraints | None, return_best: bool, *,
                openings: list[str], opening_scores: list[float], s: tuple[float, float],
                unique: bool, references: list[str] | None = None) -> str | list[Candidate]:
        texts = [self._decode(x) for x in ids]
        if unique:  # the same text twice is one candidate
            first = {t: i for i, t in reversed(list(enumerate(texts)))}
            keep = sorted(first.values())
            ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
            openings, opening_scores = [openings[i] for i in keep], [opening_scores[i] for i in keep]
        quality, comps, z = self._judge(texts, ids, prompt, prompt_ids, reference, references)
        violations = [constraints.violations(t) if constraints is not None else 0.0 for t in texts]
        penalty = constraints.penalty if constraints is not None else 0.0
        cands = [Candidate(text=t, score=q - penalty * v, quality=q, violations=v,
                           components=None if comps is None else comps[i], opening=openings[i],
                           opening_score=opening_scores[i], s=s, within_bound=z[i] <= self.incoherence_bound)
                 for i, (t, q, v) in enumerate(zip(texts, quality, violations))]
        cands.sort(key=lambda c: (not c.within_bound, -c.score))
        return cands[0].text if return_best else cands
