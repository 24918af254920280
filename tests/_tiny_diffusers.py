"""Inputs, configs and checks of the diffusers patch tests. The tiny models and pipelines
themselves are `hf_creative_sparse.testing`'s (configs from diffusers' own tests); sizes
are chosen so the joint sequences span several 128 x 64 blocks while a forward pass stays
in the milliseconds. ``tiny_transformer`` here is `testing.tiny_random_transformer`."""

from __future__ import annotations

from typing import Any

import torch

from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.testing import tiny_pipeline
# the patch tests run the transformers as diffusers' configs make them (attention not localised)
from hf_creative_sparse.testing import tiny_random_transformer as tiny_transformer

# DENSE and SPARSE name the reference backend so the tests do not depend on (or wait for
# the JIT build of) the compiled kernels; the kernels have their own tests against it.
#: Keeps every block and runs the reference kernel (not the SDPA fallback), so a match
#: with the original model checks the processors' math, not just the fallback.
DENSE = SparseAttentionConfig.dense(min_seq_len=0, backend="reference")
#: Keeps every block; the dense policy then runs SDPA through the patched processors (fast;
#: checks the processors' math and the step clock in pipeline runs).
DENSE_SDPA = SparseAttentionConfig.dense(min_seq_len=0)
#: Drops blocks on random weights: simthreshd1=-1 makes every block "self-similar", so
#: the top-k selection decides (random data is rarely self-similar).
SPARSE = SparseAttentionConfig(min_seq_len=0, topk=0.3, simthreshd1=-1.0, backend="reference")


def transformer_inputs(family: str, batch: int = 1, *, seed: int = 1) -> dict[str, Any]:
    """Forward kwargs for `tiny_transformer(family)`; sequences of 500-1100 tokens."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 500.0)
    if family == "cogvideox":  # 8 text + 3 frames x 16 x 16 = 776 tokens, RoPE as the pipeline makes it
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_transformer(family),
                                 scheduler=None)
        rope = pipe._prepare_rotary_positional_embeddings(256, 256, 3, torch.device("cpu"))
        return dict(hidden_states=randn(batch, 3, 4, 32, 32), encoder_hidden_states=randn(batch, 8, 8),
                    timestep=t.long(), image_rotary_emb=rope)
    if family == "flux":  # 24 text + 1024 image tokens
        return dict(hidden_states=randn(batch, 1024, 4), encoder_hidden_states=randn(batch, 24, 32),
                    pooled_projections=randn(batch, 32), img_ids=randn(1024, 3), txt_ids=torch.zeros(24, 3),
                    timestep=t / 1000)
    if family == "wan":  # 2 x 16 x 32 = 1024 video tokens
        return dict(hidden_states=randn(batch, 4, 2, 32, 64), encoder_hidden_states=randn(batch, 12, 16), timestep=t)
    if family == "hunyuan_video":  # 2 x 16 x 16 = 512 video + 20 text tokens (last 8 padded in sample 0)
        mask = torch.ones(batch, 20, dtype=torch.long)
        mask[0, 12:] = 0
        return dict(hidden_states=randn(batch, 4, 2, 16, 16), timestep=t, encoder_hidden_states=randn(batch, 20, 16),
                    pooled_projections=randn(batch, 8), encoder_attention_mask=mask, guidance=torch.full((batch,), 3.5))
    raise ValueError(f"unknown family {family!r}")


def family_fixtures(family: str) -> tuple[Any, Any]:
    """Module-scoped ``model`` and ``inputs`` (batch 2) fixtures for a family's test file:
    ``model, inputs = family_fixtures("wan")``."""
    import pytest

    @pytest.fixture(scope="module")
    def model() -> torch.nn.Module:
        return tiny_transformer(family)

    @pytest.fixture(scope="module")
    def inputs() -> dict[str, Any]:
        return transformer_inputs(family, batch=2)

    return model, inputs


def run(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def pipeline_kwargs(family: str, *, cfg: bool, steps: int = 2) -> dict[str, Any]:
    """Call kwargs with precomputed embeddings; ``cfg`` turns classifier-free guidance on."""
    g = torch.Generator().manual_seed(3)
    common = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    if family == "cogvideox":  # CFG: one call on a batch of 2 (uncond, cond)
        kw = dict(prompt_embeds=torch.randn(1, 8, 8, generator=g), height=256, width=256, num_frames=9,
                  guidance_scale=6.0 if cfg else 1.0)
        if cfg:
            kw["negative_prompt_embeds"] = torch.randn(1, 8, 8, generator=g)
        return {**common, **kw}
    if family == "flux":  # true CFG: two calls per step
        kw = dict(prompt_embeds=torch.randn(1, 24, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  height=256, width=256)  # 24 text + 256 image tokens
        if cfg:
            kw.update(true_cfg_scale=4.0, negative_prompt_embeds=torch.randn(1, 24, 32, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))
        return {**common, **kw}
    if family == "wan":  # CFG: two calls per step
        kw = dict(prompt_embeds=torch.randn(1, 12, 16, generator=g), height=256, width=256, num_frames=5,  # 512 tokens
                  guidance_scale=5.0 if cfg else 1.0)
        if cfg:
            kw["negative_prompt_embeds"] = torch.randn(1, 12, 16, generator=g)
        return {**common, **kw}
    if family == "hunyuan_video":  # true CFG: two calls per step
        mask = torch.ones(1, 20, dtype=torch.long)
        mask[0, 14:] = 0
        kw = dict(prompt_embeds=torch.randn(1, 20, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  prompt_attention_mask=mask, height=128, width=128, num_frames=5)
        if cfg:
            kw.update(true_cfg_scale=4.0, negative_prompt_embeds=torch.randn(1, 20, 16, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g), negative_prompt_attention_mask=mask)
        return {**common, **kw}
    raise ValueError(f"unknown family {family!r}")


def run_pipeline(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(kwargs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe(**kwargs, return_dict=False)[0]
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def assert_text_dense(mask: torch.Tensor, len_q: int, len_k: int, *, prefix: int = 0, suffix: int = 0,
                      attendable: torch.Tensor | None = None) -> None:
    """Every 128 x 64 block holding a text query row or a text key column is kept (among
    the attendable blocks, when given: a key block of padding only is never kept)."""
    import math

    allowed = torch.ones_like(mask) if attendable is None else attendable.expand_as(mask)
    rows, cols = torch.zeros(mask.shape[2], dtype=torch.bool), torch.zeros(mask.shape[3], dtype=torch.bool)
    if prefix:
        rows[: math.ceil(prefix / 128)] = True
        cols[: math.ceil(prefix / 64)] = True
    if suffix:
        rows[(len_q - suffix) // 128:] = True
        cols[(len_k - suffix) // 64:] = True
    text = rows[None, None, :, None] | cols[None, None, None, :]
    assert text.any(), "no text blocks to check"
    assert bool((mask | ~(text & allowed)).all()), "a text block was dropped"


def capture_calls(handle: Any) -> dict[str, list]:
    """layer name -> list of `AttentionCall` it made (hooks on every layer)."""
    calls: dict[str, list] = {name: [] for name in handle.layer_states()}
    for name, state in handle.layer_states().items():
        state.add_hook(calls[name].append)
    return calls


def assert_dense_config_reproduces(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """The forced-dense config through the patched processors (reference kernel, no
    fallback) equals the unpatched model to 1e-4; returns the sparsity report."""
    import hf_creative_sparse as hcs

    ref = run(model, inputs)
    hcs.enable_creative_sparse(model, DENSE)
    try:
        out = run(model, inputs)
        report = hcs.sparsity_report(model)
    finally:
        hcs.disable_creative_sparse(model)
    assert all(r["backend"] == "reference" and r["fallbacks"] == 0 for r in report.rows)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    return report


def assert_true_cfg_pipeline(family: str, layer: str) -> None:
    """A pipeline that runs the transformer twice per step (true CFG): the dense config
    reproduces it and counts one step per pair of calls; the sparse config keeps < 1 of
    the blocks on every layer; disable restores bit-identical outputs."""
    import hf_creative_sparse as hcs

    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    kwargs = pipeline_kwargs(family, cfg=True, steps=2)
    ref = run_pipeline(pipe, kwargs)

    handle = hcs.enable_creative_sparse(pipe, DENSE_SDPA)
    calls = capture_calls(handle)
    dense = run_pipeline(pipe, kwargs)
    hcs.disable_creative_sparse(pipe)
    torch.testing.assert_close(dense, ref, atol=1e-4, rtol=0)
    assert [c.step for c in calls[layer]] == [0, 0, 1, 1]  # cond + uncond per step
    assert handle.clock.num_steps == 2

    hcs.enable_creative_sparse(pipe, SPARSE)
    sparse = run_pipeline(pipe, kwargs)
    report = hcs.sparsity_report(pipe)
    hcs.disable_creative_sparse(pipe)
    assert torch.isfinite(sparse).all()
    assert all(r["calls"] == 4 and r["mean_kept_fraction"] < 1.0 for r in report.rows)
    assert torch.equal(run_pipeline(pipe, kwargs), ref)
