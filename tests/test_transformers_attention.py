"""The ``creative_sparse`` attention implementation on tiny random GPT-2 and Llama (GQA)."""

import os
import subprocess
import sys

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.creative.control import SparsityConfig, SparsityController, set_current_sparsity
from hf_creative_sparse.integrations.registry import find_patch
from hf_creative_sparse.integrations.state import PatchOptions

transformers = pytest.importorskip("transformers")
from hf_creative_sparse.testing import tiny_gpt2, tiny_llama  # noqa: E402

from hf_creative_sparse.patches import transformers_attention as ta  # noqa: E402  (after registry import)

VOCAB = 100
# Every block kept, run by the blockwise reference kernel (not the dense fallback), so the
# glue (layout, GQA, causal, padding) is what is compared with SDPA.
KERNEL_DENSE = SparseAttentionConfig.dense(backend="reference", min_seq_len=0)


def make_model(kind: str) -> torch.nn.Module:
    if kind == "gpt2":
        model = tiny_gpt2(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    else:
        model = tiny_llama(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.config._attn_implementation_internal = "sdpa"
    return model


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    m = make_model(request.param)
    yield m
    if hcs.integrations.enable.get_handle(m) is not None:
        hcs.disable_creative_sparse(m)
    set_current_sparsity(None)


def padded_batch(length: int, pad: int, side: str = "left"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    if side == "left":
        mask[1, :pad] = 0
    else:
        mask[1, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


def logits(model, ids, mask, position_ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefill_matches_sdpa_at_s0(model, side):
    ids, mask, pos = padded_batch(150, 37, side)
    ref = logits(model, ids, mask, pos)
    handle = hcs.enable_creative_sparse(model, KERNEL_DENSE)
    assert model.config._attn_implementation == "creative_sparse"
    set_current_sparsity(0.0)
    out = logits(model, ids, mask, pos)
    valid = mask.bool()
    assert (out - ref).abs()[valid].max() < 1e-4
    rows = [s.report_row() for s in handle.layer_states().values()]
    assert len(rows) == 2 and all(r["backend"] == "reference" and r["sparse_calls"] == 1 for r in rows)
    assert all(r["last_s"] == 0.0 for r in rows)
    hcs.disable_creative_sparse(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids, mask, pos), ref)


def test_generation_matches_sdpa_at_s0(model):
    ids, mask, _ = padded_batch(24, 5, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
    handle = hcs.enable_creative_sparse(model, KERNEL_DENSE)
    set_current_sparsity(0.0)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() < 1e-4
    reasons = [s.report_row()["fallback_reasons"] for s in handle.layer_states().values()]
    assert all(r == {"decode step": 7} for r in reasons)  # prefill sparse kernel, 7 cached decode steps SDPA


def test_padded_row_equals_the_row_alone(model):
    ids, mask, pos = padded_batch(150, 37, "left")
    hcs.enable_creative_sparse(model, KERNEL_DENSE)
    set_current_sparsity(0.0)
    batch = logits(model, ids, mask, pos)
    alone = logits(model, ids[1:, 37:], mask[1:, 37:], pos[1:, 37:])
    assert (batch[1, 37:] - alone[0]).abs().max() < 1e-4


def test_published_s_sets_the_kept_fraction():
    model = make_model("llama")
    # 1024 tokens: 8 query blocks, so the forced diagonal and recent window leave room for the budget
    ids = torch.randint(1, VOCAB, (1, 1024), generator=torch.Generator().manual_seed(2))
    # simthreshd1=-1: every block counts as self-similar, so the top-k budget alone decides
    # (random weights give dissimilar blocks, which the predictor would always keep).
    controller = SparsityController(SparsityConfig(simthreshd1=-1.0))
    handle = hcs.enable_creative_sparse(model, SparseAttentionConfig(backend="reference", min_seq_len=0),
                                        options=PatchOptions(controller=controller))
    kept = {}
    try:
        for s in (0.3, 0.7):
            set_current_sparsity(s)
            with torch.no_grad():
                out = model(ids).logits
            assert torch.isfinite(out).all()
            stats = [st.last_stats for st in handle.layer_states().values()]
            assert all(st.fallback_reason is None and st.backend == "reference" for st in stats)
            kept[s] = sum(st.kept_fraction for st in stats) / len(stats)
            budget = controller.get_sparsity_params(s).attention_budget
            assert all(st.config_for(s).topk == pytest.approx(budget) for st in handle.layer_states().values())
    finally:
        set_current_sparsity(None)
        hcs.disable_creative_sparse(model)
    # k_attn(0.7) = 0.50 keeps fewer blocks than k_attn(0.3) = 0.71 (the predictor adds the
    # causal diagonal blocks on top of the top-k budget, so the fractions sit above it).
    assert kept[0.7] < kept[0.3] < 1.0


def test_mask_parts():
    tril = torch.ones(4, 4, dtype=torch.bool).tril()
    assert ta.plain_mask_parts(None, 2, 4, 4, True) == (True, None)
    assert ta.plain_mask_parts(tril[None, None], 2, 4, 4, True) == (True, None)
    pad = torch.tensor([[True] * 4, [False, True, True, True]])
    causal, found = ta.plain_mask_parts((tril & pad[:, None, :])[:, None], 2, 4, 4, True)
    assert causal is True and torch.equal(found, pad)
    causal, found = ta.plain_mask_parts(pad[:, None, None, :].expand(2, 1, 4, 4), 2, 4, 4, False)
    assert causal is False and torch.equal(found, pad)
    window = tril & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)
    assert "sliding window" in ta.plain_mask_parts(window[None, None], 1, 4, 4, True)
    assert "bool" in ta.plain_mask_parts(torch.zeros(1, 1, 4, 4), 1, 4, 4, True)
    assert "shape" in ta.plain_mask_parts(tril[None, None].expand(1, 2, 4, 4), 1, 4, 4, True)


def test_non_plain_mask_falls_back_to_sdpa_and_says_so():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attn(torch.nn.Module):
        is_causal = True
        layer_idx = 0
        num_key_value_groups = 2

    module = Attn()
    q = torch.randn(1, 4, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    window = (tril & ~torch.ones(6, 6, dtype=torch.bool).tril(-3))[None, None]
    out, weights = ta.creative_sparse_attention_forward(module, q, k, v, window, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, window, scaling=0.3)
    assert weights is None and out.shape == (1, 6, 4, 8)
    assert torch.equal(out, ref)
    state = ta.layer_states(torch.nn.Sequential(module))["0"]
    assert "sliding window" in state.last_stats.fallback_reason
    assert state.report_row()["fallbacks"] == 1


def test_output_layout_and_gqa_on_the_sparse_path():
    """(B, S, H, D) output equal to float64 dense attention with repeated K/V heads."""

    class Attn(torch.nn.Module):
        is_causal = True
        layer_idx = 3

    module = Attn()
    ta._state_of(module).config = KERNEL_DENSE
    q = torch.randn(2, 4, 130, 16)
    k, v = torch.randn(2, 2, 130, 16), torch.randn(2, 2, 130, 16)
    out, _ = ta.creative_sparse_attention_forward(module, q, k, v, None, scaling=0.25)
    k64, v64 = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(~torch.ones(130, 130, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v64).transpose(1, 2)
    assert out.shape == (2, 130, 4, 16) and out.is_contiguous()
    assert (out.double() - ref).abs().max() < 1e-5
    assert module._hcs_layer_state.last_stats.backend == "reference"


def test_patch_registry_and_exact_restore():
    model = make_model("gpt2")
    model.config._attn_implementation_internal = "eager"
    assert find_patch(model) is ta.TransformersAttentionPatch
    assert not ta.TransformersAttentionPatch.matches(torch.nn.Linear(2, 2))
    ids = torch.randint(1, VOCAB, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    hcs.enable_creative_sparse(model)
    report = hcs.sparsity_report(model)
    assert "transformer.h.0.attn" in str(report)
    hcs.disable_creative_sparse(model)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_hcs_layer_state") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_attn_implementation_name_works_after_importing_the_package():
    """In a fresh interpreter: import the package first, transformers after, then ask for
    attn_implementation="creative_sparse" by name."""
    code = (
        "import hf_creative_sparse, torch\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,\n"
        "                  num_key_value_heads=1, vocab_size=50)\n"
        "m = AutoModelForCausalLM.from_config(cfg, attn_implementation='creative_sparse')\n"
        "assert m.config._attn_implementation == 'creative_sparse'\n"
        "m(torch.randint(0, 50, (1, 9)))\n"
        "from hf_creative_sparse.patches.transformers_attention import layer_states\n"
        "print(sorted(layer_states(m)), layer_states(m)['model.layers.0.self_attn'].report_row()['calls'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['model.layers.0.self_attn'] 1" in result.stdout


def test_patch_module_imports_from_a_source_checkout_before_transformers():
    """A source checkout that was not pip-installed (the editable install's finder removed):
    `hf_creative_sparse.patches.transformers_attention` imports with transformers not yet
    imported (setup.py's mapping of patches/ does not exist there)."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()\n"
        "                    and 'editable' not in getattr(f, '__module__', '').lower()]\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "assert 'transformers' not in sys.modules\n"
        "import hf_creative_sparse.patches.transformers_attention as ta\n"
        "print(ta.ATTN_IMPLEMENTATION, ta.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("creative_sparse ") and "patches" in result.stdout
