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

import math
import re
from collections import Counter
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
    """BLEU of one text against references, add-one smoothing for orders n >= 2 (Lin & Och
    2004, NLTK's ``method2``), closest-reference brevity penalty. In [0, 1].

    Example:
        >>> sentence_bleu("the cat sat on the mat", ["the cat sat on the mat"])
        1.0
    """
    hyp = words(hypothesis)
    refs = [words(r) for r in references]
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hyp, n))
        max_ref: Counter = Counter()
        for ref in refs:
            for gram, c in Counter(ngrams(ref, n)).items():
                max_ref[gram] = max(max_ref[gram], c)
        matched = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = sum(counts.values())
        if n == 1:
            if matched == 0:
                return 0.0
            p = matched / total
        else:
            p = (matched + 1) / (total + 1)
        log_p += math.log(p) / max_n
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(log_p)


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
