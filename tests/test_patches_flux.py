"""Flux patch: double-stream (text joined in the processor) and single-stream blocks
(text already joined; its length taken from the transformer's call)."""

import pytest
import torch

pytest.importorskip("diffusers")

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.ops.masks import attendable_blocks  # noqa: E402
from _tiny_diffusers import (SPARSE, assert_dense_config_reproduces, assert_text_dense,  # noqa: E402
                             assert_true_cfg_pipeline, capture_calls, family_fixtures, pipeline_kwargs, run,
                             run_pipeline, tiny_transformer, transformer_inputs)

LAYERS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


model, inputs = family_fixtures("flux")


def test_dense_config_reproduces_original(model, inputs):
    report = assert_dense_config_reproduces(model, inputs)
    assert [r["layer"] for r in report.rows] == LAYERS


@pytest.mark.parametrize("text_len", [24, 150])
def test_sparse_config_keeps_text_dense_in_both_block_kinds(model, text_len):
    kwargs = transformer_inputs("flux", batch=2)
    kwargs["encoder_hidden_states"] = torch.randn(2, text_len, 32)
    kwargs["txt_ids"] = torch.zeros(text_len, 3)
    ref = run(model, kwargs)
    originals = dict(model.attn_processors)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    calls = capture_calls(handle)
    out = run(model, kwargs)
    report = hcs.sparsity_report(model)
    hcs.disable_creative_sparse(model)

    assert torch.isfinite(out).all()
    assert all(r["calls"] == 1 and r["mean_kept_fraction"] < 1.0 for r in report.rows)
    for name in LAYERS:
        (call,) = calls[name]
        inp = call.inputs
        assert inp.len_q == text_len + 1024
        assert call.config.dense_prefix == text_len  # the single-stream block knows it too
        assert_text_dense(call.stats.block_mask, inp.len_q, inp.len_k, prefix=text_len,
                          attendable=attendable_blocks(inp))
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(run(model, kwargs), ref)


def test_single_stream_outside_the_forward_falls_back_to_original(model, inputs):
    """Without the transformer's call the text length is unknown: no guess, the original
    processor runs the call."""
    hcs.enable_creative_sparse(model, SPARSE)
    try:
        attn = model.single_transformer_blocks[0].attn
        x = torch.randn(1, 300, attn.query_dim)
        out = attn(hidden_states=x)
        row = hcs.sparsity_report(model).rows[1]
        assert row["layer"] == LAYERS[1]
        assert row["fallback_reasons"] == {"text length unknown": 1}
    finally:
        hcs.disable_creative_sparse(model)
    torch.testing.assert_close(out, attn(hidden_states=x), atol=0, rtol=0)


def test_pipeline_true_cfg_counts_one_step_per_pair_of_calls():
    assert_true_cfg_pipeline("flux", LAYERS[1])


def test_pipeline_with_vae_decodes_images():
    """The full pipeline (tiny VAE, no text encoders) produces finite images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tiny_transformer("flux"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(pipeline_kwargs("flux", cfg=False, steps=2), height=64, width=64, output_type="pt")
    ref = run_pipeline(pipe, kwargs)
    hcs.enable_creative_sparse(pipe, SPARSE)
    out = run_pipeline(pipe, kwargs)
    report = hcs.sparsity_report(pipe)
    hcs.disable_creative_sparse(pipe)
    assert out.shape == ref.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    assert all(r["mean_kept_fraction"] < 1.0 for r in report.rows)
