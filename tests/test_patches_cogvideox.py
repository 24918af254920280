"""CogVideoX patch: joint attention, text first, RoPE on the video part only."""

import pytest
import torch

pytest.importorskip("diffusers")

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.ops.masks import attendable_blocks  # noqa: E402
from _tiny_diffusers import (DENSE, DENSE_SDPA, SPARSE, assert_dense_config_reproduces, assert_text_dense,  # noqa: E402
                             capture_calls, family_fixtures, pipeline_kwargs, run, run_pipeline, tiny_pipeline)

TEXT = 8  # max_text_seq_length of the tiny config


model, inputs = family_fixtures("cogvideox")


def test_dense_config_reproduces_original(model, inputs):
    report = assert_dense_config_reproduces(model, inputs)
    assert [r["layer"] for r in report.rows] == ["transformer_blocks.0.attn1"]


def test_sparse_config_drops_blocks_keeps_text_and_restores(model, inputs):
    ref = run(model, inputs)
    originals = {name: p for name, p in model.attn_processors.items()}
    handle = hcs.enable_creative_sparse(model, SPARSE)
    calls = capture_calls(handle)
    out = run(model, inputs)
    report = hcs.sparsity_report(model)
    hcs.disable_creative_sparse(model)

    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 0  # blocks were really dropped
    for row in report.rows:
        assert row["calls"] == 1 and row["mean_kept_fraction"] < 1.0
    for layer_calls in calls.values():
        for call in layer_calls:
            inp = call.inputs
            assert inp.len_q == TEXT + 3 * 16 * 16
            assert_text_dense(call.stats.block_mask, inp.len_q, inp.len_k, prefix=TEXT,
                              attendable=attendable_blocks(inp))
    # restored exactly: the same processor objects, bit-identical outputs
    assert all(model.attn_processors[name] is p for name, p in originals.items())
    assert torch.equal(run(model, inputs), ref)


def test_kernel_sees_the_original_qkv(model, inputs, monkeypatch):
    """q/k/v handed to the kernel equal those the original processor gives SDPA: text
    first, RoPE on the video rows only (the text rows are not rotated)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.clone(), k.clone(), v.clone()))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    run(model, inputs)
    monkeypatch.undo()
    (q_ref, k_ref, v_ref), = seen

    handle = hcs.enable_creative_sparse(model, DENSE)
    calls = capture_calls(handle)
    run(model, inputs)
    hcs.disable_creative_sparse(model)
    inp = calls["transformer_blocks.0.attn1"][0].inputs
    torch.testing.assert_close(inp.q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(inp.k, k_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(inp.v, v_ref, atol=1e-6, rtol=0)

    # the RoPE really is there on the video rows and not on the text rows: with a rotary
    # embedding of zero angle (cos 1, sin 0) the video rows change, the text rows do not
    cos, sin = inputs["image_rotary_emb"]
    flat = dict(inputs, image_rotary_emb=(torch.ones_like(cos), torch.zeros_like(sin)))
    handle = hcs.enable_creative_sparse(model, DENSE)
    calls = capture_calls(handle)
    run(model, flat)
    hcs.disable_creative_sparse(model)
    q_flat = calls["transformer_blocks.0.attn1"][0].inputs.q
    assert torch.equal(q_flat[:, :, :TEXT], inp.q[:, :, :TEXT])
    assert not torch.allclose(q_flat[:, :, TEXT:], inp.q[:, :, TEXT:])


def test_pipeline_with_cfg_batch(model):
    pipe = tiny_pipeline("cogvideox")
    pipe.set_progress_bar_config(disable=True)
    kwargs = pipeline_kwargs("cogvideox", cfg=True, steps=2)
    ref = run_pipeline(pipe, kwargs)

    handle = hcs.enable_creative_sparse(pipe, DENSE_SDPA)
    calls = capture_calls(handle)
    dense = run_pipeline(pipe, kwargs)
    hcs.disable_creative_sparse(pipe)
    torch.testing.assert_close(dense, ref, atol=1e-4, rtol=0)
    # CFG runs one call on a batch of 2 per step; the steps come from the scheduler
    assert [(c.step, c.inputs.batch) for c in calls["transformer_blocks.0.attn1"]] == [(0, 2), (1, 2)]

    hcs.enable_creative_sparse(pipe, SPARSE)
    sparse = run_pipeline(pipe, kwargs)
    report = hcs.sparsity_report(pipe)
    hcs.disable_creative_sparse(pipe)
    assert torch.isfinite(sparse).all()
    assert all(r["mean_kept_fraction"] < 1.0 for r in report.rows)
    assert torch.equal(run_pipeline(pipe, kwargs), ref)
