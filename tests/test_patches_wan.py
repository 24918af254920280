"""Wan patch: video self-attention (attn1) only, cross-attention untouched."""

import pytest
import torch

pytest.importorskip("diffusers")

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations.state import PatchOptions  # noqa: E402
from _tiny_diffusers import (DENSE, DENSE_SDPA, SPARSE, assert_dense_config_reproduces, capture_calls,  # noqa: E402
                             family_fixtures, pipeline_kwargs, run, run_pipeline, tiny_pipeline, tiny_transformer,
                             transformer_inputs)

LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]


model, inputs = family_fixtures("wan")


def test_only_self_attention_is_patched(model, inputs):
    originals = dict(model.attn_processors)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    try:
        assert sorted(handle.layer_states()) == LAYERS
        for name, proc in model.attn_processors.items():
            if ".attn2." in name:
                assert proc is originals[name]  # cross-attention keeps diffusers' processor
            else:
                assert proc is not originals[name]
    finally:
        hcs.disable_creative_sparse(model)


def test_dense_config_reproduces_original(model, inputs):
    assert_dense_config_reproduces(model, inputs)


def test_sparse_config_drops_blocks_and_disable_restores(model, inputs):
    ref = run(model, inputs)
    originals = dict(model.attn_processors)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    calls = capture_calls(handle)
    out = run(model, inputs)
    report = hcs.sparsity_report(model)
    hcs.disable_creative_sparse(model)
    assert torch.isfinite(out).all()
    assert all(r["calls"] == 1 and r["mean_kept_fraction"] < 1.0 for r in report.rows)
    for name in LAYERS:
        (call,) = calls[name]
        assert call.inputs.len_q == call.inputs.len_k == 1024 and call.inputs.batch == 2
        assert call.config.dense_prefix == call.config.dense_suffix == 0  # no text in attn1
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(run(model, inputs), ref)


def test_bare_transformer_steps_from_timesteps_dense_steps_and_mask_refresh(model):
    """Without a pipeline the step comes from the timestep argument; the first
    ``dense_steps`` run dense; a mask is predicted every ``mask_refresh`` steps per call
    slot (cond / uncond never share one)."""
    single = transformer_inputs("wan", batch=1)
    handle = hcs.enable_creative_sparse(model, SPARSE, options=PatchOptions(dense_steps=1, mask_refresh=2))
    calls = capture_calls(handle)
    try:
        for t in (900.0, 600.0, 300.0, 100.0):
            for _ in range(2):  # two passes per step, as CFG in the Wan pipeline
                run(model, dict(single, timestep=torch.full((1,), t)))
    finally:
        hcs.disable_creative_sparse(model)
    layer = calls[LAYERS[0]]
    assert [c.step for c in layer] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.stats.fallback_reason is not None for c in layer] == [True, True] + [False] * 6
    assert [c.mask_reused for c in layer] == [False, False, False, False, True, True, False, False]
    assert layer[4].stats.block_mask is layer[2].stats.block_mask  # slot 0 reuses slot 0's mask
    assert layer[5].stats.block_mask is layer[3].stats.block_mask


def test_pipeline_cfg_two_calls_per_step_with_schedule():
    from hf_creative_sparse.creative.control import SparsityConfig, SparsityController, TwoStageSchedule

    pipe = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    kwargs = pipeline_kwargs("wan", cfg=True, steps=4)
    ref = run_pipeline(pipe, kwargs)

    hcs.enable_creative_sparse(pipe, DENSE_SDPA)
    dense = run_pipeline(pipe, kwargs)
    hcs.disable_creative_sparse(pipe)
    torch.testing.assert_close(dense, ref, atol=1e-4, rtol=0)

    controller = SparsityController(SparsityConfig(simthreshd1=-1.0))
    schedule = TwoStageSchedule(diverge=0.7, refine=0.3, switch=0.5)
    handle = hcs.enable_creative_sparse(pipe, SPARSE, schedule=schedule, options=PatchOptions(controller=controller))
    calls = capture_calls(handle)
    out = run_pipeline(pipe, kwargs)
    hcs.disable_creative_sparse(pipe)
    assert torch.isfinite(out).all()
    layer = calls[LAYERS[0]]
    assert [c.step for c in layer] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.s for c in layer] == [0.7] * 4 + [0.3] * 4  # progress 0, .25 | .5, .75
    budgets = [controller.get_sparsity_params(c.s).attention_budget for c in layer]
    assert [c.config.topk for c in layer] == pytest.approx(budgets)
    # the diverge stage (larger s) keeps fewer blocks than the refine stage
    kept = [c.stats.kept_fraction for c in layer]
    assert max(kept[:4]) < min(kept[4:]) < 1.0
    assert torch.equal(run_pipeline(pipe, kwargs), ref)


def test_wan22_pipeline_patches_both_transformers():
    """Wan 2.2 runs ``transformer`` for the high-noise steps and ``transformer_2`` after the
    boundary; both are patched, share one step clock, and report under their names."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=tiny_transformer("wan"), transformer_2=tiny_transformer("wan"), boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(pipeline_kwargs("wan", cfg=False, steps=4), height=128, width=256)
    ref = run_pipeline(pipe, kwargs)
    handle = hcs.enable_creative_sparse(pipe, SPARSE)
    calls = capture_calls(handle)
    out = run_pipeline(pipe, kwargs)
    hcs.disable_creative_sparse(pipe)
    assert sorted(handle.patches) == ["transformer", "transformer_2"]
    steps_1 = [c.step for c in calls["transformer.blocks.0.attn1"]]
    steps_2 = [c.step for c in calls["transformer_2.blocks.0.attn1"]]
    assert steps_1 and steps_2 and sorted(steps_1 + steps_2) == [0, 1, 2, 3] and max(steps_1) < min(steps_2)
    assert torch.isfinite(out).all()
    assert torch.equal(run_pipeline(pipe, kwargs), ref)


def test_offloaded_model_with_accelerate_hooks():
    """A model whose weights live off the execution device (accelerate's cpu_offload: the
    parameters are on "meta" until each module runs) patches and restores like any other."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_transformer("wan")
    single = transformer_inputs("wan", batch=1)
    ref = run(model, single)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"
    handle = hcs.enable_creative_sparse(model, DENSE)
    out = run(model, single)
    hcs.disable_creative_sparse(model)
    assert all(r["calls"] == 1 and r["fallbacks"] == 0 for r in handle.report().rows)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert torch.equal(run(model, single), ref)
