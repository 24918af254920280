"""Lexical measures of a set of texts: word tokens, n-grams, distinct-n, self-BLEU.

One concern: counting surface forms, with no model. The quality functional (`quality`)
uses `lexical_diversity` in its diversity term; the sweep reports distinct-n and
self-BLEU as diagnostics.

Example:
    >>> from hf_creative_sparse.evaluation.lexical import distinct_n, words
    >>> words("The cat, the hat!"), distinct_n("the cat the cat", 1)
    (['the', 'cat', ',', 'the', 'hat', '!'], 0.5)
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

#: The n of distinct-n in the lexical diversity (orders a text is too short for count 0).
DEFAULT_NGRAM_ORDERS = (1, 2, 3, 4)

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: the unit of distinct-n and self-BLEU.

    Example:
        >>> words("The cat, the hat!")
        ['the', 'cat', ',', 'the', 'hat', '!']
    """
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (empty when shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: str | Sequence[str], n: int) -> float:
    """distinct-n (Li et al., 2016): unique n-grams / total n-grams over ``texts``.

    Pass one text for its own lexical variety, a list for the corpus value. 0.0 when there
    is no n-gram at all.

    Example:
        >>> distinct_n("the cat the cat", 1), distinct_n(["a b", "a b"], 2)
        (0.5, 0.5)
    """
    if isinstance(texts, str):
        texts = [texts]
    grams: list[tuple[str, ...]] = []
    for text in texts:
        grams.extend(ngrams(words(text), n))
    return len(set(grams)) / len(grams) if grams else 0.0


def lexical_diversity(text: str, orders: Sequence[int] = DEFAULT_NGRAM_ORDERS) -> float:
    """Mean of distinct-n of one text over ``orders`` (orders it is too short for count 0).

    Example:
        >>> lexical_diversity("a b a b")   # (2/4 + 2/3 + 2/2 + 1/1) / 4
        0.7916666666666666
    """
    if not orders:
        raise ValueError("orders must name at least one n-gram order")
    return sum(distinct_n(text, n) for n in orders) / len(orders)


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> float:
    """BLEU of one text against references, through NLTK's ``sentence_bleu`` with
    ``SmoothingFunction().method2`` (add one to the counts of orders n >= 2, Lin & Och 2004)
    and the closest-reference brevity penalty, over `words` tokens. In [0, 1].

    Each order n <= max_n weighs 1 / max_n; an order the hypothesis is too short for is
    left out (it counts as a precision of 1) rather than smoothed to 1/2 as NLTK would,
    so a three-word text is not penalised for having no 4-grams.

    Example:
        >>> sentence_bleu("the cat sat on the mat", ["the cat sat on the mat"])
        1.0
    """
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    hyp = words(hypothesis)
    refs = [words(r) for r in references]
    if not hyp or not refs:
        return 0.0
    weights = (1.0 / max_n,) * min(max_n, len(hyp))
    return float(nltk_sentence_bleu(refs, hyp, weights=weights, smoothing_function=SmoothingFunction().method2))


def self_bleu(texts: Sequence[str], groups: Sequence[Any] | None = None, max_n: int = 4) -> float:
    """Mean BLEU of each text against the other texts of its group (Zhu et al., 2018).

    Higher means more alike (1.0 for identical texts): a diagnostic, reported by the sweep
    but not part of Q. NaN when no group has two texts.

    Example:
        >>> self_bleu(["the cat sat on the mat"] * 3)
        1.0
    """
    groups = _check_groups(texts, groups)
    scores = []
    for i, text in enumerate(texts):
        others = [t for j, t in enumerate(texts) if j != i and groups[j] == groups[i]]
        if others:
            scores.append(sentence_bleu(text, others, max_n))
    return float(np.mean(scores)) if scores else float("nan")


def _check_groups(texts: Sequence[str], groups: Sequence[Any] | None) -> list[Any]:
    if groups is None:
        return [0] * len(texts)
    groups = list(groups)
    if len(groups) != len(texts):
        raise ValueError(f"groups must have one entry per output ({len(texts)}), got {len(groups)}")
    return groups
