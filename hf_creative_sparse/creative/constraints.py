"""Constraint-aware decoding: banned words, required words, a user violation score.

- Banned words are enforced during decoding (`BannedWordsLogitsProcessor`): a banned word
  never appears in the generated text, as a case-insensitive substring (stricter than a
  whole-word ban: banning "cat" also bans "category"; that is the price of a guarantee
  that holds whatever the tokenisation).
- Required words are encouraged during decoding (`RequiredWordsLogitsProcessor`: a logit
  bonus for the first token of each still-missing word that grows towards the end) and
  counted as violations when still missing.
- ``violation_fn(text) -> float`` scores anything else (0 = fine).

`Constraints.violations(text)` is the number the wrapper subtracts, times ``penalty``,
from the quality score when it ranks candidates.

Example:
    >>> c = Constraints(banned_words=["dragon"], required_words=["moon"])
    >>> c.violations("A dragon flew.")   # one banned word present, one required missing
    2.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor


def _check_words(name: str, words: Any) -> tuple[str, ...]:
    if isinstance(words, str) or not isinstance(words, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a list of strings, got {type(words).__name__}")
    out = []
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {w!r}")
        out.append(w.strip())
    return tuple(out)


@dataclass
class Constraints:
    """What a generated text must and must not contain.

    Attributes:
        banned_words: never generated (case-insensitive substrings).
        required_words: should appear (case-insensitive whole words).
        violation_fn: ``text -> float``, extra violations (0 = none), e.g. a length rule.
        penalty: score cost of one violation in the wrapper's ranking (Q units).
        required_bias: logit bonus (nats) for a missing required word's first token at
            the last step; it grows linearly from 0 over the steps.
    """

    banned_words: Sequence[str] = ()
    required_words: Sequence[str] = ()
    violation_fn: Callable[[str], float] | None = None
    penalty: float = 1.0
    required_bias: float = 4.0
    _required_res: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.banned_words = _check_words("banned_words", self.banned_words)
        self.required_words = _check_words("required_words", self.required_words)
        if self.violation_fn is not None and not callable(self.violation_fn):
            raise TypeError(f"violation_fn must be callable (text -> float), got {type(self.violation_fn).__name__}")
        for name in ("penalty", "required_bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self._required_res = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.required_words]

    @classmethod
    def coerce(cls, value: Any) -> "Constraints | None":
        """None, a `Constraints`, or a mapping of its fields (``banned_words``,
        ``required_words``, ``violation_fn``, ``penalty``, ``required_bias``)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"banned_words", "required_words", "violation_fn", "penalty", "required_bias"}
            if unknown:
                raise ValueError(f"constraints: unknown keys {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"constraints must be None, a Constraints or a dict, got {type(value).__name__}")

    @property
    def active(self) -> bool:
        return bool(self.banned_words or self.required_words or self.violation_fn)

    def banned_present(self, text: str) -> list[str]:
        low = text.lower()
        return [w for w in self.banned_words if w.lower() in low]

    def required_missing(self, text: str) -> list[str]:
        return [w for w, rx in zip(self.required_words, self._required_res) if not rx.search(text)]

    def violations(self, text: str) -> float:
        """Banned words present + required words missing + ``violation_fn(text)``."""
        count = float(len(self.banned_present(text)) + len(self.required_missing(text)))
        if self.violation_fn is not None:
            extra = float(self.violation_fn(text))
            if not math.isfinite(extra) or extra < 0:
                raise ValueError(f"violation_fn must return a finite number >= 0, got {extra}")
            count += extra
        return count


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The lower-cased decoded text of every token id < ``vocab_size`` ('' past the tokenizer)."""
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [t.lower() for t in texts] + [""] * (vocab_size - n)


class BannedWordsLogitsProcessor(LogitsProcessor):
    """Forbids every token that would make a banned word appear in the text.

    A banned word w appears either inside one token (those tokens are always banned) or
    across a boundary: the text so far ends with w[:k] and the next token starts with
    w[k:]. Each step checks the decoded tail of every row against each split k.

    Args:
        tokenizer: the model's tokenizer; vocab_size: the logits width.
        words: the banned words (case-insensitive).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, words: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.words = [w.lower() for w in _check_words("words", list(words))]
        texts = token_texts(tokenizer, vocab_size)
        always = [i for i, t in enumerate(texts) if any(w in t for w in self.words)]
        self.always = torch.tensor(always, dtype=torch.long)
        # completions[w][k] = ids whose text starts with w[k:] (needed after text ending in w[:k])
        self.completions: list[list[torch.Tensor]] = []
        for w in self.words:
            per_split = [torch.empty(0, dtype=torch.long)]
            for k in range(1, len(w)):
                rest = w[k:]
                per_split.append(torch.tensor([i for i, t in enumerate(texts) if t.startswith(rest)], dtype=torch.long))
            self.completions.append(per_split)
        self.tail_tokens = max(len(w) for w in self.words) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        if self.always.numel():
            scores[:, self.always.to(scores.device)] = -math.inf
        for b in range(input_ids.shape[0]):
            tail = self.tokenizer.decode(input_ids[b, -self.tail_tokens:].tolist(), skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False).lower()
            for w, per_split in zip(self.words, self.completions):
                for k in range(1, len(w)):
                    if tail.endswith(w[:k]) and per_split[k].numel():
                        scores[b, per_split[k].to(scores.device)] = -math.inf
        return scores


class RequiredWordsLogitsProcessor(LogitsProcessor):
    """Adds ``bias * progress`` to the first token of every required word that the row's
    generated text does not contain yet (progress = (step + 1) / total_steps).

    Args:
        tokenizer: the model's tokenizer.
        words: the required words.
        text_start: index in input_ids where the generated text (whose content counts) starts.
        prompt_length: length of the input_ids handed to generate (the first call sees that many).
        step_offset: global step of the first token this processor sees; total_steps: the
            length of the whole generation.
        bias: logit bonus at the last step.
    """

    def __init__(self, tokenizer: Any, words: Sequence[str], *, text_start: int, prompt_length: int,
                 step_offset: int, total_steps: int, bias: float) -> None:
        self.tokenizer = tokenizer
        self.words = _check_words("words", list(words))
        self.patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.words]
        self.first_ids: list[torch.Tensor] = []
        for w in self.words:
            ids = set()
            for variant in (w, " " + w, w.capitalize(), " " + w.capitalize()):
                enc = tokenizer.encode(variant, add_special_tokens=False)
                if enc:
                    ids.add(enc[0])
            self.first_ids.append(torch.tensor(sorted(ids), dtype=torch.long))
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.text_start, self.prompt_length = text_start, prompt_length
        self.step_offset, self.total_steps, self.bias = step_offset, total_steps, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = self.step_offset + input_ids.shape[1] - self.prompt_length
        strength = self.bias * min(1.0, (step + 1) / self.total_steps)
        if strength <= 0:
            return scores
        scores = scores.clone()
        for b in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[b, self.text_start:].tolist(), skip_special_tokens=True)
            for rx, ids in zip(self.patterns, self.first_ids):
                if not rx.search(text):
                    scores[b, ids.to(scores.device)] += strength
        return scores
