"""What the quality functional measures texts with: a sentence embedder and a causal LM's NLL.

One concern: models that turn texts into numbers. `SentenceEmbedder` (sentence
embeddings through sentence-transformers, for novelty and the semantic part of
diversity), `LMScorer` (mean token NLL, for incoherence), `NLLReference` (the NLL
yardstick of one prompt, from the model's own samples). The offline models themselves
are loaded by `creative.models`.

Embedders and scorers are plain callables, so other modalities plug in:
``embedder(texts) -> array (n, d)``, ``scorer(texts) -> list of mean NLL in nats``.

Example:
    >>> ref = NLLReference.from_samples([1.2, 1.6, 1.4])
    >>> round(ref.z(2.2), 3)
    4.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

#: ``embedder(texts) -> (len(texts), d)`` array-like of sentence embeddings.
TextEmbedder = Callable[[Sequence[str]], Any]
#: ``scorer(texts) -> mean token NLL in nats per text`` (NaN where nothing was scored).
TextScorer = Callable[[Sequence[str]], Sequence[float]]


class SentenceEmbedder:
    """Sentence embeddings through sentence-transformers: ``model.encode(texts,
    normalize_embeddings=True)`` of a ``SentenceTransformer`` (for MiniLM: the mean of the
    last hidden states over the attention mask, L2-normalised). sentence-transformers owns
    the tokenising, padding, pooling and batching, so none of it is written here.

    Calling it on n texts returns a float32 numpy array (n, d).

    Example:
        >>> from sentence_transformers import SentenceTransformer          # doctest: +SKIP
        >>> SentenceEmbedder(SentenceTransformer(folder))(["hello"]).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size

    @property
    def dimension(self) -> int:
        """The embedding width d."""
        return int(self.model.get_embedding_dimension())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


class LMScorer:
    """Mean token NLL (nats) of texts under a causal LM: tokens 2..L given their prefix.

    ``vocab_size`` (for the default scale ln V) comes from the model config. Texts are
    tokenised one by one without special tokens, right-padded by hand (the tokenizer is
    never modified) and truncated to ``max_length`` tokens. NaN for texts with fewer than
    two tokens.

    Example:
        >>> model, tok = load_smollm2()                       # doctest: +SKIP
        >>> LMScorer(model, tok)(["The cat sat on the mat."])  # doctest: +SKIP
        [4.1...]
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 512) -> None:
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        self.vocab_size = int(vocab)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] for t in texts]
        return [float(x.mean()) if len(x) else float("nan") for x in self.token_nll(ids, [1] * len(ids))]

    def continuation_nll(self, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int] | str]) -> list[float]:
        """Mean NLL (nats) of each continuation's tokens given ``prefix_ids`` (the prompt,
        chat template included): the coherence the model assigns to what it was asked to
        continue. Continuations are token-id lists or texts (tokenised without special
        tokens); NaN for an empty one.

        Example:
            >>> scorer = LMScorer(model, tok)                                        # doctest: +SKIP
            >>> scorer.continuation_nll(tok("Once upon")["input_ids"], [" a time"])  # doctest: +SKIP
            [0.4...]
        """
        per_token = self.continuation_token_nll(prefix_ids, continuations)
        return [float(x.mean()) if len(x) else float("nan") for x in per_token]

    def continuation_token_nll(self, prefix_ids: Sequence[int],
                               continuations: Sequence[Sequence[int] | str]) -> list[np.ndarray]:
        """Per-token NLL (nats) of each continuation given ``prefix_ids`` (see
        `continuation_nll`); an empty array for an empty continuation."""
        prefix = [int(t) for t in prefix_ids]
        if not prefix:
            raise ValueError("prefix_ids must hold at least one token (the prompt)")
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else [int(t) for t in c]
                 for c in continuations]
        room = max(0, self.max_length - len(prefix))
        rows = [prefix + c[:room] for c in conts]
        return self.token_nll(rows, [len(prefix)] * len(rows))

    def token_nll(self, rows: Sequence[Sequence[int]], starts: Sequence[int]) -> list[np.ndarray]:
        """Per-token NLL (nats) of ``rows[i][starts[i]:]``, each token given everything before
        it, batched with right padding (``starts[i] >= 1``). One forward per batch."""
        import torch

        if len(rows) != len(starts):
            raise ValueError(f"rows and starts must have the same length, got {len(rows)} and {len(starts)}")
        out = [np.zeros(0) for _ in rows]
        order = [i for i in range(len(rows)) if len(rows[i]) > starts[i] >= 1]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(rows[i]) for i in batch)
                input_ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for r, i in enumerate(batch):
                    input_ids[r, : len(rows[i])] = torch.tensor(list(rows[i]), dtype=torch.long)
                    mask[r, : len(rows[i])] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                with torch.no_grad():
                    logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                token_nll = (-logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)).double().cpu().numpy()
                for r, i in enumerate(batch):
                    out[i] = token_nll[r, starts[i] - 1: len(rows[i]) - 1]
        finally:
            self.model.train(was_training)
        return out


def load_smollm2_scorer(device: str = "cpu") -> LMScorer:
    """An `LMScorer` over the cached SmolLM2 model."""
    from ..creative.models import load_smollm2

    model, tokenizer = load_smollm2(device)
    return LMScorer(model, tokenizer)


@dataclass(frozen=True)
class NLLReference:
    """The NLL yardstick of one prompt: mean and standard deviation (nats) of the NLL of the
    model's own samples for it (module docstring, "Calibrated").

    Attributes:
        mean: mean NLL of the reference samples (nats / token).
        std: their standard deviation, at least ``min_std`` (nats).
        z_scale: z at which incoherence reaches 1 (> 0).

    Example:
        >>> ref = NLLReference.from_samples([1.2, 1.6, 1.4])
        >>> round(ref.z(2.2), 3), ref.incoherence(1.0), ref.incoherence(9.0)
        (4.0, 0.0, 1.0)
    """

    mean: float
    std: float
    z_scale: float = 3.0

    #: Smallest standard deviation (nats): two near-identical samples must not make every
    #: other text look incoherent.
    MIN_STD = 0.1

    def __post_init__(self) -> None:
        for name in ("mean", "std", "z_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
                raise ValueError(f"NLLReference.{name} must be a finite number, got {value!r}")
        if self.std <= 0 or self.z_scale <= 0:
            raise ValueError(f"NLLReference.std and z_scale must be > 0, got {self.std}, {self.z_scale}")

    @classmethod
    def from_samples(cls, nll: Sequence[float], *, min_std: float = MIN_STD, z_scale: float = 3.0) -> "NLLReference":
        """From the NLLs of the reference samples (NaN ignored; at least two finite)."""
        values = np.asarray([x for x in nll if math.isfinite(x)], dtype=np.float64)
        if len(values) < 2:
            raise ValueError(f"NLLReference needs at least two finite reference NLLs, got {list(nll)}")
        return cls(float(values.mean()), max(float(values.std(ddof=1)), min_std), z_scale)

    def z(self, nll: float) -> float:
        """Standard deviations above the reference mean (NaN: +inf, nothing was scorable)."""
        return math.inf if math.isnan(nll) else (nll - self.mean) / self.std

    def incoherence(self, nll: float) -> float:
        """min(1, max(0, z / z_scale))."""
        return min(1.0, max(0.0, self.z(nll) / self.z_scale))
