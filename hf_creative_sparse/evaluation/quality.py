"""The quality functional Q = alpha * Novelty + beta * Diversity - gamma * Incoherence.

Every component is a per-output number on a documented scale, so the weights mean what
they say: with the defaults (0.4, 0.3, 0.3) a unit of novelty is worth 0.4 and a unit of
incoherence costs 0.3.

Scales (all dimensionless):

- Novelty N_i in [0, 1]: ``1 - max_j cos(e(output_i), e(reference_j))`` clipped to [0, 1],
  where e is a sentence embedding (default all-MiniLM-L6-v2, L2-normalised). 0 means the
  output says what a reference text says (an exact copy scores exactly 0); 1 means it is
  orthogonal to (unrelated to) every reference text. Without reference texts the other
  outputs of the batch are the reference (leave-one-out: novelty relative to the batch).
- Diversity D_i in [0, 1]: the mean of a lexical and a semantic part.
  Lexical: mean over n = 1..4 of distinct-n of the output itself (unique n-grams over
  n-grams; an order the text is too short for counts 0, so one-word answers are not
  rewarded). Semantic: mean cosine distance ``1 - cos`` (clipped to [0, 1]) from output i
  to the other outputs of its group (same prompt). With one output in a group only the
  lexical part is used. The batch mean of the semantic part is the mean pairwise
  embedding distance.
- Incoherence I_i in [0, 1 + lambda]: ``min(1, nll_i / nll_scale) + lambda * v_i``.
  nll_i is the mean token negative log-likelihood (nats) of the output under a scorer LM
  (tokens 2..L given their prefix; default SmolLM2-135M, or the generating model);
  nll_scale defaults to ln(vocab size), the NLL of a uniform guess, so 0 is perfectly
  predictable text and 1 is no better than chance. v_i in [0, 1] is the fraction of the
  constraints the output violates and lambda is ``violation_weight`` (default 0.5).
  An output with no scorable token (empty, one token) gets nll_i = nll_scale.
  Calibrated (`NLLReference`, what the wrapper uses): ln V is the wrong yardstick for one
  model and prompt (a 135M model's fluent text has NLL ~1.5 nats, its word salad ~5, i.e.
  0.14 vs 0.46 of ln V, which novelty outweighs). With a reference, the mean m and standard
  deviation sd of the NLL of the model's own samples for the same prompt (the wrapper
  draws them with its schedule alone), nll_i enters as z_i = (nll_i - m) / sd and ``min(1, max(0, z_i / z_scale))`` (default
  z_scale 3): as predictable as the model's own samples is 0, z_scale standard deviations
  less predictable is 1. The wrapper also rejects candidates with z_i above a bound.
- Coherence C_i = 1 - I_i (the seed API's ``compute_coherence``); Q uses -gamma * I_i,
  i.e. gamma * (C_i - 1), so overriding ``compute_coherence`` changes Q.

Embedders and scorers are plain callables, so other modalities plug in:
``embedder(texts) -> array (n, d)``, ``scorer(texts) -> list of mean NLL in nats``
(give ``nll_scale`` or a ``scorer.vocab_size`` attribute).

Example:
    >>> from hf_creative_sparse.evaluation.quality import QualityFunctional
    >>> qf = QualityFunctional()                 # MiniLM + SmolLM2, loaded on first use
    >>> qf.compute_quality_score(["A comet sang to the sea.", "The cat sat."],
    ...                          reference_data=["The cat sat on the mat."])  # doctest: +SKIP
    [0.27..., 0.02...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .lexical import DEFAULT_NGRAM_ORDERS, _check_groups, distinct_n, lexical_diversity, self_bleu, words
from .scorers import NLLReference, TextEmbedder, TextScorer, load_smollm2_scorer

#: ``constraint(text) -> True when the text satisfies it``.
Constraint = Callable[[str], bool]
DEFAULT_VIOLATION_WEIGHT = 0.5


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class QualityWeights:
    """Weights (alpha, beta, gamma) of Q = alpha*N + beta*D - gamma*I.

    Attributes:
        novelty: alpha, the weight of Novelty (>= 0).
        diversity: beta, the weight of Diversity (>= 0).
        coherence: gamma, the cost of Incoherence (>= 0).
    At least one weight must be positive. They need not sum to 1; the components share
    the scale [0, 1], so the ratios are exchange rates between them.

    Example:
        >>> QualityWeights(novelty=0.5, diversity=0.2, coherence=0.3).as_tuple()
        (0.5, 0.2, 0.3)
    """

    novelty: float = 0.4
    diversity: float = 0.3
    coherence: float = 0.3

    def __post_init__(self) -> None:
        for name in ("novelty", "diversity", "coherence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"QualityWeights.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"QualityWeights.{name} must be finite and >= 0, got {value}")
            object.__setattr__(self, name, float(value))
        if self.novelty + self.diversity + self.coherence <= 0:
            raise ValueError("QualityWeights: at least one of novelty, diversity, coherence must be > 0")

    def as_tuple(self) -> tuple[float, float, float]:
        """(alpha, beta, gamma)."""
        return (self.novelty, self.diversity, self.coherence)

    def to_dict(self) -> dict[str, float]:
        return {"novelty": self.novelty, "diversity": self.diversity, "coherence": self.coherence}

    @classmethod
    def coerce(cls, value: Any) -> "QualityWeights":
        """None -> defaults; a QualityWeights; a mapping with some of the three names; or a
        sequence (alpha, beta, gamma).

        Example:
            >>> QualityWeights.coerce((0.6, 0.2, 0.2)).novelty
            0.6
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"novelty", "diversity", "coherence"}
            if unknown:
                raise ValueError(f"quality weights: unknown keys {sorted(unknown)}; expected novelty, diversity, coherence")
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) == 3:
            return cls(*value)
        raise TypeError("quality weights must be None, QualityWeights, a mapping or a 3-sequence "
                        f"(alpha, beta, gamma), got {value!r}")


# ---------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class WordCountConstraint:
    """Satisfied when the number of words (``words`` tokens that are alphanumeric) lies in
    [minimum, maximum] (None: unbounded)."""

    minimum: int | None = None
    maximum: int | None = None

    def __call__(self, text: str) -> bool:
        count = sum(1 for w in words(text) if w[0].isalnum() or w[0] == "_")
        return (self.minimum is None or count >= self.minimum) and (self.maximum is None or count <= self.maximum)


@dataclass(frozen=True)
class MinLinesConstraint:
    """Satisfied when the text has at least ``minimum`` non-blank lines (verse, lists)."""

    minimum: int

    def __call__(self, text: str) -> bool:
        return sum(1 for line in text.splitlines() if line.strip()) >= self.minimum


def constraints_from_spec(spec: Mapping[str, Any] | None) -> list[Constraint]:
    """Constraints from a JSON-able spec: ``min_words``, ``max_words``, ``min_lines``.

    Example:
        >>> [c("one two three") for c in constraints_from_spec({"min_words": 2, "max_words": 2})]
        [False]
    """
    if not spec:
        return []
    unknown = set(spec) - {"min_words", "max_words", "min_lines"}
    if unknown:
        raise ValueError(f"constraints: unknown keys {sorted(unknown)}; expected min_words, max_words, min_lines")
    out: list[Constraint] = []
    if "min_words" in spec or "max_words" in spec:
        out.append(WordCountConstraint(spec.get("min_words"), spec.get("max_words")))
    if "min_lines" in spec:
        out.append(MinLinesConstraint(int(spec["min_lines"])))
    return out


# ------------------------------------------------------------------------- the functional


def _check_texts(name: str, texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(t).__name__}")
    return texts


def _normalise_text(text: str) -> str:
    return " ".join(text.split())


@dataclass
class QualityReport:
    """Per-output components and Q, their means, and corpus diagnostics.

    ``distinct`` maps n to the corpus distinct-n of all outputs; ``self_bleu`` is within
    groups (NaN when no group has two outputs).
    """

    novelty: list[float]
    diversity: list[float]
    incoherence: list[float]
    quality: list[float]
    weights: QualityWeights
    distinct: dict[int, float] = field(default_factory=dict)
    self_bleu: float = float("nan")

    @staticmethod
    def _mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    @property
    def mean_novelty(self) -> float:
        return self._mean(self.novelty)

    @property
    def mean_diversity(self) -> float:
        return self._mean(self.diversity)

    @property
    def mean_incoherence(self) -> float:
        return self._mean(self.incoherence)

    @property
    def mean_quality(self) -> float:
        return self._mean(self.quality)

    def to_dict(self) -> dict[str, Any]:
        return {"novelty": self.mean_novelty, "diversity": self.mean_diversity,
                "incoherence": self.mean_incoherence, "quality": self.mean_quality,
                "distinct": {str(k): v for k, v in self.distinct.items()},
                "self_bleu": self.self_bleu, "weights": self.weights.to_dict(),
                "per_output": {"novelty": self.novelty, "diversity": self.diversity,
                               "incoherence": self.incoherence, "quality": self.quality}}


class QualityFunctional:
    """Q = alpha * Novelty + beta * Diversity - gamma * Incoherence, per output.

    Args:
        weights: `QualityWeights` (or anything `QualityWeights.coerce` takes).
        embedder: ``embedder(texts) -> (n, d)``; default all-MiniLM-L6-v2 (loaded on use).
        scorer: ``scorer(texts) -> mean NLL (nats)``; default SmolLM2-135M (loaded on use).
        reference_data: default reference texts for novelty.
        constraints: callables ``text -> bool`` (True: satisfied); their violation rate
            enters incoherence with weight ``violation_weight`` (lambda).
        nll_scale: nats mapped to incoherence 1; default ln(scorer.vocab_size).
        ngram_orders: the n of distinct-n in the lexical diversity.

    Subclass and override ``compute_novelty`` / ``compute_diversity`` /
    ``compute_coherence`` to change a component; ``compute_quality_score`` uses them.

    Example:
        >>> import numpy as np
        >>> qf = QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=lambda t: [0.0] * len(t),
        ...                        nll_scale=1.0)
        >>> qf.compute_novelty(["a b"], reference_data=["a b"])
        [0.0]
    """

    def __init__(self, weights: Any = None, *, embedder: TextEmbedder | None = None, scorer: TextScorer | None = None,
                 reference_data: Sequence[str] | None = None, constraints: Sequence[Constraint] = (),
                 violation_weight: float = DEFAULT_VIOLATION_WEIGHT, nll_scale: float | None = None,
                 ngram_orders: Sequence[int] = DEFAULT_NGRAM_ORDERS) -> None:
        self.weights = QualityWeights.coerce(weights)
        if embedder is not None and not callable(embedder):
            raise TypeError(f"embedder must be callable (texts -> (n, d) array), got {type(embedder).__name__}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"scorer must be callable (texts -> mean NLL per text), got {type(scorer).__name__}")
        for i, c in enumerate(constraints):
            if not callable(c):
                raise TypeError(f"constraints[{i}] must be callable (text -> bool), got {type(c).__name__}")
        if not math.isfinite(violation_weight) or violation_weight < 0:
            raise ValueError(f"violation_weight must be finite and >= 0, got {violation_weight}")
        if nll_scale is not None and not (math.isfinite(nll_scale) and nll_scale > 0):
            raise ValueError(f"nll_scale must be a positive number of nats, got {nll_scale}")
        if not ngram_orders or any(int(n) != n or n < 1 for n in ngram_orders):
            raise ValueError(f"ngram_orders must be positive integers, got {ngram_orders!r}")
        self._embedder = embedder
        self._scorer = scorer
        self.reference_data = None if reference_data is None else _check_texts("reference_data", reference_data)
        self.constraints = list(constraints)
        self.violation_weight = float(violation_weight)
        self._nll_scale = nll_scale
        self.ngram_orders = tuple(int(n) for n in ngram_orders)

    # -- pluggable parts, loaded on first use
    @property
    def embedder(self) -> TextEmbedder:
        if self._embedder is None:
            from ..creative.models import load_minilm_embedder  # creative imports evaluation at import time

            self._embedder = load_minilm_embedder()
        return self._embedder

    @property
    def scorer(self) -> TextScorer:
        if self._scorer is None:
            self._scorer = load_smollm2_scorer()
        return self._scorer

    @property
    def nll_scale(self) -> float:
        """Nats of mean NLL that map to incoherence 1 (default ln of the scorer's vocab)."""
        if self._nll_scale is not None:
            return float(self._nll_scale)
        vocab = getattr(self.scorer, "vocab_size", None)
        if not vocab or vocab < 2:
            raise ValueError("nll_scale: give QualityFunctional(nll_scale=...) or a scorer with a vocab_size attribute")
        return math.log(vocab)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float64 embeddings (n, d) of ``texts`` (zero rows stay zero)."""
        if not texts:
            return np.zeros((0, 1))
        emb = self.embedder(list(texts))
        if hasattr(emb, "detach"):
            emb = emb.detach().cpu().double().numpy()
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"embedder must return shape ({len(texts)}, d), got {emb.shape}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.where(norms > 0, norms, 1.0)

    # -- components
    def compute_novelty(self, outputs: Sequence[str], reference_data: Sequence[str] | None = None, *,
                        groups: Sequence[Any] | None = None) -> list[float]:
        """N_i = clip(1 - max_j cos(e_i, e(ref_j)), 0, 1); exactly 0 for a copy of a
        reference text (whitespace-normalised).

        Reference: ``reference_data``, else the constructor's, else the other outputs
        (of the same group when ``groups`` is given).
        """
        outputs = _check_texts("outputs", outputs)
        groups = _check_groups(outputs, groups)
        refs = reference_data if reference_data is not None else self.reference_data
        if not outputs:
            return []
        if refs is not None:
            refs = _check_texts("reference_data", refs)
            if not refs:
                raise ValueError("reference_data must hold at least one text")
            emb = self.embed(outputs + refs)
            out_e, ref_e = emb[: len(outputs)], emb[len(outputs):]
            best = (out_e @ ref_e.T).max(axis=1)
            copies = {_normalise_text(r) for r in refs}
            return [0.0 if _normalise_text(o) in copies else float(np.clip(1.0 - b, 0.0, 1.0))
                    for o, b in zip(outputs, best)]
        # leave-one-out: novelty relative to the rest of the batch
        emb = self.embed(outputs)
        sims = emb @ emb.T
        result = []
        for i, text in enumerate(outputs):
            others = [j for j in range(len(outputs)) if j != i and groups[j] == groups[i]]
            if not others:
                raise ValueError("novelty needs reference_data, or at least two outputs per group to compare")
            if any(_normalise_text(outputs[j]) == _normalise_text(text) for j in others):
                result.append(0.0)
            else:
                result.append(float(np.clip(1.0 - sims[i, others].max(), 0.0, 1.0)))
        return result

    def compute_diversity(self, outputs: Sequence[str], *, groups: Sequence[Any] | None = None) -> list[float]:
        """D_i = (lexical_i + semantic_i) / 2, or lexical_i alone in a group of one (see the
        module docstring)."""
        outputs = _check_texts("outputs", outputs)
        groups = _check_groups(outputs, groups)
        if not outputs:
            return []
        lexical = [lexical_diversity(t, self.ngram_orders) for t in outputs]
        emb = self.embed(outputs)
        dist = np.clip(1.0 - emb @ emb.T, 0.0, 1.0)
        result = []
        for i in range(len(outputs)):
            others = [j for j in range(len(outputs)) if j != i and groups[j] == groups[i]]
            if others:
                result.append(0.5 * lexical[i] + 0.5 * float(dist[i, others].mean()))
            else:
                result.append(lexical[i])
        return result

    def compute_violations(self, outputs: Sequence[str]) -> list[float]:
        """Fraction of ``constraints`` each output violates (0 with no constraints)."""
        outputs = _check_texts("outputs", outputs)
        if not self.constraints:
            return [0.0] * len(outputs)
        return [sum(0 if c(t) else 1 for c in self.constraints) / len(self.constraints) for t in outputs]

    def compute_nll(self, outputs: Sequence[str]) -> list[float]:
        """Mean token NLL (nats) of each output under the scorer; NaN where unscorable."""
        outputs = _check_texts("outputs", outputs)
        if not outputs:
            return []
        nll = [float(x) for x in self.scorer(outputs)]
        if len(nll) != len(outputs):
            raise ValueError(f"scorer must return one NLL per text ({len(outputs)}), got {len(nll)}")
        return nll

    def compute_incoherence(self, outputs: Sequence[str], *, nll: Sequence[float] | None = None,
                            nll_reference: NLLReference | None = None) -> list[float]:
        """I_i = min(1, nll_i / nll_scale) + lambda * violations_i (NaN nll counts as 1), or
        with ``nll_reference`` the calibrated ``nll_reference.incoherence(nll_i)`` in place of
        the first term. ``nll``: the outputs' NLLs when already known (for example given the
        prompt); default the scorer's."""
        outputs = _check_texts("outputs", outputs)
        if nll is None:
            nll = self.compute_nll(outputs)
        else:
            nll = [float(x) for x in nll]
            if len(nll) != len(outputs):
                raise ValueError(f"nll must have one value per output ({len(outputs)}), got {len(nll)}")
        if nll_reference is not None and not isinstance(nll_reference, NLLReference):
            raise TypeError(f"nll_reference must be an NLLReference or None, got {type(nll_reference).__name__}")
        violations = self.compute_violations(outputs)
        if nll_reference is not None:
            first = [nll_reference.incoherence(x) for x in nll]
        else:
            scale = self.nll_scale
            first = [1.0 if math.isnan(x) else min(1.0, max(0.0, x / scale)) for x in nll]
        return [f + self.violation_weight * v for f, v in zip(first, violations)]

    def compute_coherence(self, outputs: Sequence[str], *, nll: Sequence[float] | None = None,
                          nll_reference: NLLReference | None = None) -> list[float]:
        """C_i = 1 - I_i (the seed API's name; Q uses gamma * (C_i - 1) = -gamma * I_i)."""
        return [1.0 - x for x in self.compute_incoherence(outputs, nll=nll, nll_reference=nll_reference)]

    # -- the functional
    def compute_quality_score(self, outputs: Sequence[str], novelty_weight: float | None = None,
                              diversity_weight: float | None = None, coherence_weight: float | None = None,
                              reference_data: Sequence[str] | None = None, *,
                              groups: Sequence[Any] | None = None) -> list[float]:
        """Q_i = alpha * N_i + beta * D_i - gamma * I_i for every output.

        Weights left as None come from ``self.weights`` (default 0.4, 0.3, 0.3).

        Example:
            >>> import numpy as np
            >>> qf = QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=lambda t: [0.0] * len(t),
            ...                        nll_scale=1.0)
            >>> qf.compute_quality_score(["a b c d", "e f g h"])   # N=1, D=(1+1)/2, I=0
            [0.7, 0.7]
        """
        return self.evaluate(outputs, reference_data, groups=groups,
                             weights=self._weights(novelty_weight, diversity_weight, coherence_weight)).quality

    def _weights(self, a: float | None, b: float | None, g: float | None) -> QualityWeights:
        w = self.weights
        return QualityWeights(w.novelty if a is None else a, w.diversity if b is None else b,
                              w.coherence if g is None else g)

    def evaluate(self, outputs: Sequence[str], reference_data: Sequence[str] | None = None, *,
                 groups: Sequence[Any] | None = None, weights: Any = None, nll: Sequence[float] | None = None,
                 nll_reference: NLLReference | None = None) -> QualityReport:
        """All components, Q and diagnostics for ``outputs`` in one `QualityReport`
        (``nll`` / ``nll_reference``: see `compute_incoherence`)."""
        outputs = _check_texts("outputs", outputs)
        w = self.weights if weights is None else QualityWeights.coerce(weights)
        novelty = self.compute_novelty(outputs, reference_data, groups=groups)
        diversity = self.compute_diversity(outputs, groups=groups)
        if nll is None and nll_reference is None:  # the seed signature, which subclasses may override
            coherence = self.compute_coherence(outputs)
        else:
            coherence = self.compute_coherence(outputs, nll=nll, nll_reference=nll_reference)
        incoherence = [1.0 - c for c in coherence]
        quality = [w.novelty * n + w.diversity * d - w.coherence * i
                   for n, d, i in zip(novelty, diversity, incoherence)]
        return QualityReport(novelty=novelty, diversity=diversity, incoherence=incoherence, quality=quality,
                             weights=w, distinct={n: distinct_n(outputs, n) for n in self.ngram_orders},
                             self_bleu=self_bleu(outputs, groups) if len(outputs) > 1 else float("nan"))


def compute_quality_score(outputs: Sequence[str], novelty_weight: float | None = None,
                          diversity_weight: float | None = None, coherence_weight: float | None = None,
                          reference_data: Sequence[str] | None = None, *,
                          functional: QualityFunctional | None = None) -> list[float]:
    """Q_i for every output with the default MiniLM embedder and SmolLM2 scorer (or
    ``functional``'s). Weights left as None come from ``functional.weights`` (default
    0.4, 0.3, 0.3), so a functional's own weights are honoured.

    Example:
        >>> compute_quality_score(["A comet sang to the sea."], reference_data=["The cat sat."])  # doctest: +SKIP
        [0.1...]
    """
    if functional is not None and not isinstance(functional, QualityFunctional):
        raise TypeError(f"functional must be a QualityFunctional or None, got {type(functional).__name__}")
    functional = functional or QualityFunctional()
    return functional.compute_quality_score(outputs, novelty_weight, diversity_weight, coherence_weight,
                                            reference_data)
