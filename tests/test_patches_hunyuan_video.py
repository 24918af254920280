"""HunyuanVideo patch: video first, text last, padded text keys masked."""

import pytest
import torch

pytest.importorskip("diffusers")

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.ops.config import BLOCK_M, BLOCK_N  # noqa: E402
from hf_creative_sparse.ops.masks import attendable_blocks  # noqa: E402
from _tiny_diffusers import (SPARSE, assert_dense_config_reproduces, assert_text_dense,  # noqa: E402
                             assert_true_cfg_pipeline, capture_calls, family_fixtures, run)

LAYERS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
VIDEO, TEXT, VALID0 = 512, 20, 12  # sample 0 has 12 real text tokens, 8 padded


model, inputs = family_fixtures("hunyuan_video")


def _masked_reference(call) -> torch.Tensor:
    """float64 attention over the kept blocks and the unpadded keys (HND)."""
    inp = call.inputs
    q, k, v = (t.double() for t in (inp.q, inp.k, inp.v))
    scores = q @ k.transpose(-1, -2) * inp.scale
    blocks = call.stats.block_mask.repeat_interleave(BLOCK_M, 2).repeat_interleave(BLOCK_N, 3)
    allowed = blocks[:, :, : inp.len_q, : inp.len_k] & inp.key_padding_mask[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def test_only_the_joint_attention_is_patched(model):
    originals = dict(model.attn_processors)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    try:
        assert sorted(handle.layer_states()) == sorted(LAYERS)
        refiner = [n for n in originals if n.startswith("context_embedder")]
        assert refiner and all(model.attn_processors[n] is originals[n] for n in refiner)
    finally:
        hcs.disable_creative_sparse(model)


def test_dense_config_reproduces_original_with_padding(model, inputs):
    assert_dense_config_reproduces(model, inputs)


def test_sparse_padded_text_keys_get_zero_weight(model, inputs):
    ref = run(model, inputs)
    originals = dict(model.attn_processors)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    calls = capture_calls(handle)
    out = run(model, inputs)
    report = hcs.sparsity_report(model)
    # the video output does not depend on what the padded text tokens hold
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][0, VALID0:] = 100.0
    out_changed = run(model, changed)
    hcs.disable_creative_sparse(model)

    assert torch.isfinite(out).all()
    assert all(r["calls"] == 1 and r["mean_kept_fraction"] < 1.0 for r in report.rows)
    torch.testing.assert_close(out_changed[0], out[0], atol=1e-5, rtol=0)
    assert torch.equal(out_changed[1], out[1])
    for name in LAYERS:
        call = calls[name][0]
        inp = call.inputs
        assert inp.len_k == VIDEO + TEXT
        expected = torch.ones(2, VIDEO + TEXT, dtype=torch.bool)
        expected[0, VIDEO + VALID0:] = False
        assert torch.equal(inp.key_padding_mask, expected)
        assert call.config.dense_suffix == TEXT
        assert_text_dense(call.stats.block_mask, inp.len_q, inp.len_k, suffix=TEXT, attendable=attendable_blocks(inp))
        torch.testing.assert_close(call.output.double(), _masked_reference(call), atol=1e-5, rtol=0)
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(run(model, inputs), ref)


def test_pipeline_true_cfg():
    assert_true_cfg_pipeline("hunyuan_video", LAYERS[0])
