"""Two-stage creative decoding: the logits processor, MoE K(s), constraints, the wrapper."""

import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM,  # noqa: E402
                          OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.ops.config import SparseAttentionConfig  # noqa: E402
from hf_creative_sparse import testing  # noqa: E402
from hf_creative_sparse.creative.constraints import BannedWordsLogitsProcessor, Constraints  # noqa: E402
from hf_creative_sparse.creative.control import (SparsityConfig, SparsityController, TwoStageSchedule,  # noqa: E402
                                        current_sparsity, set_current_sparsity)
from hf_creative_sparse.creative.processor import CreativeSparseLogitsProcessor, nucleus_keep  # noqa: E402
from hf_creative_sparse.creative.wrapper import Candidate, CreativeSparseWrapper  # noqa: E402
from hf_creative_sparse.evaluation.quality import QualityFunctional  # noqa: E402
from hf_creative_sparse.evaluation.scorers import NLLReference  # noqa: E402

#: The seed's manifold constants (the hand-computed values below use them).
SEED = dict(temperature_base=1.0, temperature_gain=0.5, nucleus_base=0.9, nucleus_gain=0.12, nucleus_scale=0.5,
            min_p=0.0)
from hf_creative_sparse.creative.moe import ExpertRouting  # noqa: E402

WORDS = ("the a cat dog moon sea sun star night day red blue green sang ran flew over under and of to in "
         "bright dark cold warm wind rain tree river stone light shadow dream song bird fish ship sky "
         "category dragon drag on at is was were be silver golden old new quiet loud slow fast "
         "whisper glow drift fall rise wave shore cloud fire ice storm path door window house field").split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def tiny_gpt2(vocab: int = 100) -> GPT2LMHeadModel:
    model = testing.tiny_gpt2(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    model.config._attn_implementation_internal = "sdpa"
    return model


@pytest.fixture(autouse=True)
def _clear_dial():
    yield
    set_current_sparsity(None)


# ------------------------------------------------------------------------- the warpers

PROBS = [0.5, 0.3, 0.12, 0.05, 0.02, 0.01]


def test_processor_applies_hand_computed_temperature_and_nucleus():
    """Step 0 is stage A (s=0.7): T = 1.255457, p = 0.974370. Tempered probabilities
    0.44098, 0.29357, 0.14149, 0.07045, 0.03396, 0.01955 have mass 0.98045 before the
    last token: 5 kept. Step 2 is stage B (s=0.3): T = 1.135985, p = 0.919334; mass
    before the 5th token is 0.95769: 4 kept."""
    logits = torch.log(torch.tensor([PROBS, PROBS[::-1]]))
    proc = CreativeSparseLogitsProcessor(prompt_length=3, max_new_tokens=4, config=SparsityConfig(**SEED),
                                         schedule=TwoStageSchedule(0.7, 0.3, switch=0.5), publish=False)
    for length, t, kept in ((3, 1.255457, 5), (5, 1.135985, 4)):
        out = proc(torch.zeros(2, length, dtype=torch.long), logits.clone())
        for row in range(2):
            finite = torch.isfinite(out[row])
            order = logits[row].argsort(descending=True)
            assert finite[order[:kept]].all() and not finite[order[kept:]].any()
            assert torch.allclose(out[row][finite], logits[row][finite] / t, atol=1e-5)
    assert [(r.step, r.stage) for r in proc.history] == [(0, "diverge"), (2, "refine")]
    assert proc.history[0].top_p == pytest.approx(0.974370, abs=1e-6)
    assert proc.history[1].temperature == pytest.approx(1.135985, abs=1e-6)


def test_nucleus_keeps_at_least_one_token_and_everything_at_p1():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    kept = nucleus_keep(logits, 0.01)
    assert kept[0].tolist() == [True, False, False] and int(kept[1].sum()) == 1  # one of the tied tokens
    assert nucleus_keep(logits, 1.0).all()


def test_token_pruning_rate_intersects_the_nucleus():
    proc = CreativeSparseLogitsProcessor(0, 1, sparsity_level=0.7, publish=False,
                                         config=SparsityConfig(token_pruning_rate=0.5, **SEED))
    out = proc(torch.zeros(1, 0, dtype=torch.long), torch.log(torch.tensor([PROBS])))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False, False]  # ceil(0.5 * 6) = 3


def test_processor_filters_with_transformers_warpers_and_min_p(monkeypatch):
    """Issue 16: the processor runs transformers' own warpers (a spy counts their calls);
    min_p = 0.15 at T = 1 keeps the tokens with p >= 0.15 * 0.5 = 0.075: 3 of 6."""
    from hf_creative_sparse.creative import processor

    calls = []

    def spy(base):
        class Spy(base):
            def __call__(self, input_ids, scores):
                calls.append(base.__name__)
                return super().__call__(input_ids, scores)
        return Spy

    for name in ("TemperatureLogitsWarper", "MinPLogitsWarper"):
        monkeypatch.setattr(processor, name, spy(getattr(processor, name)))
    cfg = SparsityConfig(temperature_base=1.0, temperature_gain=0.0, nucleus_adaptation=False, min_p=0.15)
    proc = CreativeSparseLogitsProcessor(0, 1, sparsity_level=0.5, publish=False, config=cfg)
    out = proc(torch.zeros(1, 0, dtype=torch.long), torch.log(torch.tensor([PROBS])))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False, False]
    assert calls == ["TemperatureLogitsWarper", "MinPLogitsWarper"]


def test_processor_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        CreativeSparseLogitsProcessor(3, 0)
    with pytest.raises(ValueError, match="either schedule or sparsity_level"):
        CreativeSparseLogitsProcessor(3, 5, schedule=TwoStageSchedule(), sparsity_level=0.5)
    with pytest.raises(ValueError, match="prompt_length"):
        CreativeSparseLogitsProcessor(3, 5)(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="schedule"):
        CreativeSparseLogitsProcessor(3, 5, schedule=(0.7, 0.3))


# ------------------------------------------------------------------ inside model.generate


def test_stage_switch_at_the_exact_step_and_s_published_for_each_forward():
    model = tiny_gpt2()
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.register_forward_pre_hook(lambda *a: seen.append(current_sparsity()))
    proc = CreativeSparseLogitsProcessor(6, 7, schedule=TwoStageSchedule(0.7, 0.3, switch=0.5), model=model)
    assert proc.switch_step == 4  # first i with i / 7 >= 0.5
    with proc:
        model.generate(ids, **proc.generate_kwargs(pad_token_id=0))
    hook.remove()
    assert [r.stage for r in proc.history] == ["diverge"] * 4 + ["refine"] * 3
    assert [r.step for r in proc.history] == list(range(7))
    assert seen == [0.7] * 4 + [0.3] * 3  # the forward that produces token i runs at s(i)
    assert current_sparsity() is None  # restored on exit


def test_prefill_and_every_step_see_the_dial_without_with_block(monkeypatch):
    """Issue 15: with model.generate(..., logits_processor=[proc]) and no ``with proc:``, the
    attention of a model loaded with attn_implementation="creative_sparse" sees s_A at the
    prefill and s(i) at the forward of step i; generation stopping before the end of the
    schedule restores the dial all the same."""
    from hf_creative_sparse.integrations.state import LayerState

    model = testing.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                               attn_implementation="creative_sparse")
    assert model.config._attn_implementation == "creative_sparse"
    seen = []
    original = LayerState.current_s
    monkeypatch.setattr(LayerState, "current_s", lambda self: seen.append(original(self)) or seen[-1])
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    proc = CreativeSparseLogitsProcessor(5, 6, schedule=TwoStageSchedule(0.8, 0.2, switch=0.5))
    model.generate(ids, logits_processor=[proc], max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    per_forward = [seen[i:i + 2] for i in range(0, len(seen), 2)]
    assert per_forward == [[0.8, 0.8]] * 3 + [[0.2, 0.2]] * 3  # prefill (step 0), then steps 1..5
    assert current_sparsity() is None
    seen.clear()
    set_current_sparsity(0.4)  # a value from before the call comes back after it
    short = CreativeSparseLogitsProcessor(5, 8, schedule=TwoStageSchedule(0.8, 0.2, switch=0.5))
    model.generate(ids, None, [short], max_new_tokens=3, do_sample=True, top_k=0, pad_token_id=0)  # positional
    assert seen[:2] == [0.8, 0.8] and current_sparsity() == 0.4


def test_seeded_generation_is_reproducible():
    model = tiny_gpt2()
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def run(seed):
        proc = CreativeSparseLogitsProcessor(5, 12, model=model)
        torch.manual_seed(seed)
        with proc:
            return model.generate(ids, **proc.generate_kwargs(pad_token_id=0))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_padding_in_a_batch_is_respected():
    model = tiny_gpt2()
    hcs.enable_creative_sparse(model, SparseAttentionConfig.dense(backend="reference", min_seq_len=0))
    try:
        g = torch.Generator().manual_seed(3)
        short, long = torch.randint(1, 100, (1, 4), generator=g), torch.randint(1, 100, (1, 9), generator=g)
        batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
        mask = torch.ones_like(batch)
        mask[0, :5] = 0

        def greedy(ids, attention_mask):
            proc = CreativeSparseLogitsProcessor(ids.shape[1], 6, model=model)
            with warnings.catch_warnings(), proc:
                warnings.simplefilter("ignore")  # greedy is deliberate: argmax survives T and the nucleus
                kwargs = proc.generate_kwargs(do_sample=False, pad_token_id=0, attention_mask=attention_mask)
                return model.generate(ids, **kwargs)[:, ids.shape[1]:]

        together = greedy(batch, mask)
        assert torch.equal(together[0], greedy(short, torch.ones_like(short))[0])
        assert torch.equal(together[1], greedy(long, torch.ones_like(long))[0])
    finally:
        hcs.disable_creative_sparse(model)


def test_warns_when_generate_warpers_stack():
    model = tiny_gpt2()
    ids = torch.randint(1, 100, (1, 4))
    proc = CreativeSparseLogitsProcessor(4, 3, model=model)
    with pytest.warns(UserWarning, match="top_k=50"), proc:
        model.generate(ids, logits_processor=[proc], do_sample=True, max_new_tokens=3, pad_token_id=0)
    with pytest.warns(UserWarning, match="temperature=0.7"):
        proc.generate_kwargs(temperature=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with proc:
            model.generate(ids, **proc.generate_kwargs(pad_token_id=0))


# ------------------------------------------------------------------------------- MoE


def tiny_mixtral(k: int = 2) -> MixtralForCausalLM:
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=k, vocab_size=100,
                        bos_token_id=0, eos_token_id=0)
    return MixtralForCausalLM(cfg).eval()


def test_moe_expert_count_takes_effect():
    torch.manual_seed(0)
    model = tiny_mixtral(2)
    routing = ExpertRouting.for_model(model)
    assert (routing.num_experts, routing.default_k) == (8, 2)
    assert len([m for m in routing.routers if hasattr(m, "weight")]) == 2  # one router per layer
    ids = torch.randint(1, 100, (1, 10))
    with torch.no_grad():
        base = model(ids).logits
        with routing.use(4):
            four = model(ids).logits
        assert torch.equal(model(ids).logits, base)  # restored
    reference = tiny_mixtral(4)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(four, reference(ids).logits, atol=1e-6)
        assert not torch.allclose(four, base, atol=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        routing.set(9)
    assert ExpertRouting.for_model(tiny_gpt2()) is None


def test_processor_sets_k_of_s_for_every_forward():
    torch.manual_seed(0)
    model = tiny_mixtral(2)
    widths = []
    router = next(m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter")
    hook = router.register_forward_hook(lambda mod, args, out: widths.append(out[2].shape[-1]))
    proc = CreativeSparseLogitsProcessor(5, 6, schedule=TwoStageSchedule(0.7, 0.3, switch=0.5), model=model)
    ctl = SparsityController(num_experts=8, experts_per_token=2)
    k_a, k_b = ctl.get_sparsity_params(0.7).num_experts, ctl.get_sparsity_params(0.3).num_experts
    assert (k_a, k_b) == (4, 3)
    with proc:
        model.generate(torch.randint(1, 100, (1, 5)), **proc.generate_kwargs(pad_token_id=0))
    hook.remove()
    assert widths == [k_a] * 3 + [k_b] * 3
    assert [r.num_experts for r in proc.history] == [k_a] * 3 + [k_b] * 3
    assert router.top_k == 2  # restored


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_other_moe_families_follow_k(family):
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, vocab_size=100)
    if family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                                   **common))
    else:
        model = OlmoeForCausalLM(OlmoeConfig(**common))
    model.eval()
    routing = ExpertRouting.for_model(model)
    assert (routing.num_experts, routing.default_k) == (6, 2)
    ids = torch.randint(1, 100, (1, 8))
    with torch.no_grad():
        base = model(ids).logits
        with routing.use(5):
            assert not torch.allclose(model(ids).logits, base, atol=1e-5)
        assert torch.equal(model(ids).logits, base)


# ------------------------------------------------------------------------ constraints


class CharTokenizer:
    """Tokens that split words anywhere, so a banned word can span token boundaries."""

    pieces = ["<e>", "drag", "on", "the", " ", "dragon", "onward", "d", "ra", "gon", "x"]

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids, **kw):
        return "".join(self.pieces[i] for i in ids if i != 0)

    def batch_decode(self, seqs, **kw):
        return [self.decode(s) for s in seqs]


def test_banned_word_across_token_boundaries():
    tok = CharTokenizer()
    proc = BannedWordsLogitsProcessor(tok, len(tok), ["Dragon"])
    ids = {p: i for i, p in enumerate(tok.pieces)}
    ctx = torch.tensor([[ids["the"], ids[" "], ids["drag"]],      # "the drag" -> no "on..."
                        [ids["the"], ids[" "], ids["the"]],       # nothing to complete
                        [ids["x"], ids["d"], ids["ra"]]])         # "xdra" -> no "gon"
    out = proc(ctx, torch.zeros(3, len(tok)))
    banned = [{tok.pieces[j] for j in range(len(tok)) if out[r, j] == -math.inf} for r in range(3)]
    assert banned[0] == {"dragon", "on", "onward"}
    assert banned[1] == {"dragon"}
    assert banned[2] == {"dragon", "gon"}


def test_constraints_count_violations():
    c = Constraints(banned_words=["dragon"], required_words=["moon", "sea"],
                    violation_fn=lambda t: float(len(t.split()) > 4))
    assert c.violations("the moon and the sea") == 1.0  # five words
    assert c.violations("a dragon") == 3.0
    assert c.violations("moonlight sea") == 1.0  # required words are whole words
    with pytest.raises(ValueError, match="banned_words"):
        Constraints(banned_words=[""])
    with pytest.raises(TypeError, match="banned_words"):
        Constraints(banned_words="dragon")
    with pytest.raises(ValueError, match="unknown keys"):
        Constraints.coerce({"banned": ["x"]})


# ---------------------------------------------------------------------------- wrapper


def distinct_scorer(texts):
    return [len(set(t.split())) / max(1, len(t.split())) for t in texts]


@pytest.fixture(scope="module")
def wrapper():
    tok = word_tokenizer()
    w = CreativeSparseWrapper(tiny_gpt2(len(tok)), tok, scorer=distinct_scorer, seed=3, batch_size=3)
    yield w
    w.close()


def test_wrapper_returns_scored_candidates_and_honours_banned_words(wrapper):
    banned = ["sea", "dragon", "moon"]
    cands = wrapper.generate_creative("the cat sang", max_new_tokens=16, num_candidates=5, return_best=False,
                                      constraints={"banned_words": banned})
    assert len(cands) == 5 and all(isinstance(c, Candidate) for c in cands)
    assert all(math.isfinite(c.score) for c in cands)
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    assert all(c.score == pytest.approx(distinct_scorer([c.text])[0]) for c in cands)  # no violations
    assert all(not any(b in c.text for b in banned) for c in cands)
    assert all(c.text.startswith(c.opening) for c in cands)
    assert all(c.s == (wrapper.schedule.diverge, wrapper.schedule.refine) for c in cands)
    n_a = round(wrapper.schedule.switch * 16)
    assert all(len(c.opening.split()) == n_a for c in cands)  # EOS suppressed in stage A
    best = wrapper.generate_creative("the cat sang", max_new_tokens=16, num_candidates=5,
                                     constraints={"banned_words": banned})
    assert best == cands[0].text  # seeded


def test_wrapper_continues_the_best_m_openings_and_returns_texts_that_differ(wrapper):
    """Issue 14: stage B continues the best ``num_openings`` openings (not one), dealt
    round-robin, and return_best=False gives texts that differ."""
    cands = wrapper.generate_creative("the cat sang", max_new_tokens=16, num_candidates=5, return_best=False)
    openings = sorted(wrapper.last_openings, key=lambda x: -x[1])
    best_three = {text for text, _ in openings[:3]}
    assert {c.opening for c in cands} == best_three
    counts = sorted(sum(c.opening == o for c in cands) for o in best_three)
    assert counts == [1, 2, 2]
    assert len({c.text for c in cands}) == len(cands) == 5
    one = CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, scorer=distinct_scorer, seed=3, batch_size=3,
                                num_openings=1, sparse_attention=False)
    assert len({c.opening for c in one.generate_creative("the cat sang", max_new_tokens=16, num_candidates=5,
                                                         return_best=False)}) == 1


def test_generate_creative_names_and_deprecated_aliases(wrapper):
    """Issue 16: max_new_tokens (max_length a deprecated alias) and schedule= (sparsity_schedule
    a deprecated alias) mean the same."""
    new = wrapper.generate_creative("the cat", max_new_tokens=6, num_candidates=2, return_best=False)
    with pytest.warns(DeprecationWarning, match="max_new_tokens"):
        old = wrapper.generate_creative("the cat", max_length=6, num_candidates=2, return_best=False)
    assert [c.text for c in new] == [c.text for c in old]
    with pytest.raises(ValueError, match="not both"):
        wrapper.generate_creative("the cat", 6, max_length=6)
    w = CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, schedule=TwoStageSchedule(0.9, 0.1, switch=0.25),
                              scorer=distinct_scorer, sparse_attention=False)
    assert (w.schedule.diverge, w.schedule.refine, w.schedule.switch) == (0.9, 0.1, 0.25)
    with pytest.warns(DeprecationWarning, match="schedule="):
        old_w = CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, sparsity_schedule=(0.9, 0.1), switch=0.25,
                                      scorer=distinct_scorer, sparse_attention=False)
    assert old_w.schedule == w.schedule
    with pytest.raises(ValueError, match="switch"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, schedule=TwoStageSchedule(), switch=0.3,
                              scorer=distinct_scorer, sparse_attention=False)


def test_wrapper_penalises_missing_required_words(wrapper):
    cands = wrapper.generate_creative("the cat sang", max_new_tokens=6, num_candidates=4, return_best=False,
                                      constraints=Constraints(required_words=["zebra"], penalty=2.0))
    assert all(c.violations == 1.0 for c in cands)  # "zebra" is not in the vocabulary
    assert all(c.score == pytest.approx(c.quality - 2.0) for c in cands)


def test_wrapper_single_stage_and_runs_the_schedule_through_attention(wrapper):
    seen = []
    removers = [st.add_hook(lambda call: seen.append(call.s)) for st in wrapper._patch.layer_states().values()]
    try:
        cands = wrapper.generate_creative("the cat", max_new_tokens=8, num_candidates=4, return_best=False,
                                          sparsity_level=0.5, progress=True)
    finally:
        for remove in removers:
            remove()
    assert len(cands) == 4 and all(c.s == (0.5, 0.5) and c.opening == "" for c in cands)
    assert seen == [0.5, 0.5] * 2  # the prefill of each of the 2 batches, in both layers, at s = 0.5
    rows = wrapper.layer_report()
    assert len(rows) == 2 and all(r["calls"] > 0 and r["fallback_reasons"].get("decode step") for r in rows)


def test_wrapper_with_a_quality_functional_reports_components():
    from hf_creative_sparse.evaluation.quality import QualityFunctional

    tok = word_tokenizer()
    rng = np.random.default_rng(0)
    qf = QualityFunctional(embedder=lambda texts: rng.normal(size=(len(texts), 8)),
                           scorer=lambda texts: [2.0] * len(texts), nll_scale=4.0)
    w = CreativeSparseWrapper(tiny_gpt2(len(tok)), tok, scorer=qf, seed=0, sparse_attention=False)
    cands = w.generate_creative("the cat sang", max_new_tokens=6, num_candidates=3, return_best=False)
    assert len(cands) == 3
    for c in cands:
        assert set(c.components) == {"novelty", "diversity", "incoherence"}
        assert c.components["incoherence"] == pytest.approx(0.5)
        q = 0.4 * c.components["novelty"] + 0.3 * c.components["diversity"] - 0.3 * 0.5
        assert c.quality == pytest.approx(q)


def test_wrapper_validation(wrapper):
    with pytest.raises(ValueError, match="num_candidates"):
        wrapper.generate_creative("the cat", num_candidates=0)
    with pytest.raises(ValueError, match="prompt"):
        wrapper.generate_creative("")
    with pytest.raises(ValueError, match="schedule"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, schedule=(0.7,))
    with pytest.raises(ValueError, match="refine"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, schedule=(0.3, 0.7))
    with pytest.raises(ValueError, match="num_openings"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, num_openings=0)
    with pytest.raises(ValueError, match="calibration_samples"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, calibration_samples=1)
    with pytest.raises(ValueError, match="incoherence_bound"):
        CreativeSparseWrapper(wrapper.model, wrapper.tokenizer, incoherence_bound=float("nan"))


class FakeLM:
    """A stand-in NLL scorer: per-token NLL 1.0 for continuations with an even token sum,
    6.0 for odd ones (the "salad")."""

    def continuation_token_nll(self, prefix, continuations):
        return [np.full(max(1, len(c)), 1.0 if sum(c) % 2 == 0 else 6.0) for c in continuations]


def test_wrapper_rerank_calibrates_incoherence_and_rejects_above_the_bound():
    """Issue 14: incoherence is z-scored against the model's own dense samples of the prompt,
    and candidates above ``incoherence_bound`` rank after every candidate within it, whatever
    their novelty."""
    tok = word_tokenizer()
    qf = QualityFunctional(embedder=lambda texts: np.random.default_rng(len(texts)).normal(size=(len(texts), 8)),
                           weights=(1.0, 0.0, 0.3))
    w = CreativeSparseWrapper(tiny_gpt2(len(tok)), tok, scorer=qf, seed=1, sparse_attention=False,
                              calibration_samples=4, incoherence_bound=2.0)
    w._lm = FakeLM()
    w.reference_nll = lambda *a: [np.full(12, x) for x in (0.9, 1.0, 1.1, 1.0)]  # mean 1, sd 0.0816 -> 0.1
    cands = w.generate_creative("the cat sang", max_new_tokens=12, num_candidates=6, return_best=False)
    ref = NLLReference(1.0, 0.1)
    flags = [c.within_bound for c in cands]
    assert flags == sorted(flags, reverse=True) and any(flags)  # every candidate within comes first
    for c in cands:
        assert c.components["nll"] in (1.0, 6.0)
        assert c.within_bound == (ref.z(c.components["nll"]) <= 2.0)
        assert c.components["incoherence"] == pytest.approx(ref.incoherence(c.components["nll"]))
    inside = [c.score for c in cands if c.within_bound]
    assert inside == sorted(inside, reverse=True)
    assert w.last_reference == NLLReference.from_samples([0.9, 1.0, 1.1, 1.0])
    free = CreativeSparseWrapper(w.model, tok, scorer=qf, seed=1, sparse_attention=False, incoherence_bound=math.inf)
    free._lm, free.reference_nll = w._lm, w.reference_nll
    scores = [c.score for c in free.generate_creative("the cat sang", max_new_tokens=12, num_candidates=6,
                                                      return_best=False)]
    assert scores == sorted(scores, reverse=True)  # no bound: Q alone


def test_wrapper_measures_novelty_against_the_greedy_answer_when_asked():
    from types import SimpleNamespace

    tok = word_tokenizer()
    seen = []

    class Recorder:  # a QualityFunctional stand-in that records novelty's references
        def evaluate(self, texts, refs, nll=None, nll_reference=None):
            seen.append(refs)
            n = len(texts)
            return SimpleNamespace(quality=[float(i) for i in range(n)], novelty=[0.0] * n, diversity=[0.0] * n,
                                   incoherence=[0.0] * n)

    model = tiny_gpt2(len(tok))
    for mode in ("greedy", "candidates"):
        seen.clear()
        w = CreativeSparseWrapper(model, tok, scorer=Recorder(), seed=0, sparse_attention=False,
                                  novelty_reference=mode, calibration_samples=0)
        w.generate_creative("the cat sang", max_new_tokens=6, num_candidates=3, return_best=False)
        assert len(seen) == 2  # the openings, then the full texts
        expected = [w.generate_greedy("the cat sang", 6)] if mode == "greedy" else None
        assert all(refs == expected for refs in seen), (mode, seen)
    with pytest.raises(ValueError, match="novelty_reference"):
        CreativeSparseWrapper(model, tok, novelty_reference="prompt")
