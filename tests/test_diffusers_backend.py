"""The creative_sparse diffusers attention backend in one process (installed diffusers).

References: float64 SDPA for direct backend calls; diffusers' own native backend (the
unpatched model) for whole transformers. The kernels run on the reference backend so the
tests neither depend on nor wait for the compiled kernels (they have their own tests).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations import context_parallel as cp  # noqa: E402
from hf_creative_sparse.integrations import diffusers_backend as db  # noqa: E402
from hf_creative_sparse.integrations.state import LayerState, PatchOptions  # noqa: E402

from _tiny_diffusers import DENSE, DENSE_SDPA, SPARSE, tiny_transformer, transformer_inputs  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _default_config():
    """Each test starts (and leaves) the backend's default layer on a fresh dense config."""
    db.register_diffusers_backend(DENSE)
    yield
    db.register_diffusers_backend(DENSE)


def _sdpa64(q, k, v, *, mask=None, is_causal=False, scale=None, gqa=False):
    """Dense attention in float64 on (B, S, H, D); mask: bool [B, Sk] (True = attend)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    attn = None if mask is None else mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def _qkv(b=2, s=300, h=4, hkv=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, h, d, generator=g), torch.randn(b, s, hkv, d, generator=g),
            torch.randn(b, s, hkv, d, generator=g))


# -- registry -------------------------------------------------------------------------------


def test_version_check_names_the_supported_range() -> None:
    import diffusers

    assert db.check_diffusers_version() == diffusers.__version__
    for bad in ("0.30.0", "0.43.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"supports diffusers >= 0\.36\.0, < 0\.43\.0.*found " + bad):
            db.check_diffusers_version(bad)
    db.check_diffusers_version("0.36.0")


def test_registered_once_as_a_context_parallel_backend() -> None:
    assert db.register_diffusers_backend() == "creative_sparse"
    db.register_diffusers_backend()
    member = AttentionBackendName("creative_sparse")
    assert member is AttentionBackendName.CREATIVE_SPARSE
    assert [m for m in AttentionBackendName if m.value == "creative_sparse"] == [member]
    assert "creative_sparse" in {m.value for m in AttentionBackendName.__members__.values()}
    assert _AttentionBackendRegistry._backends[member] is db.creative_sparse_attention
    assert _AttentionBackendRegistry._is_context_parallel_available(member)
    with pytest.raises(TypeError, match="config must be a SparseAttentionConfig"):
        db.register_diffusers_backend({"topk": 0.5})


# -- the backend function ---------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_float64_sdpa(causal: bool) -> None:
    q, k, v = _qkv()
    scale = 0.3
    out = db.creative_sparse_attention(q, k, v, is_causal=causal, scale=scale)
    assert out.shape == q.shape
    assert torch.allclose(out.double(), _sdpa64(q, k, v, is_causal=causal, scale=scale), atol=TOL)
    # the scale is honoured: the default differs
    assert not torch.allclose(db.creative_sparse_attention(q, k, v, is_causal=causal), out, atol=1e-3)


def test_gqa_needs_enable_gqa() -> None:
    q, k, v = _qkv(h=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        db.creative_sparse_attention(q, k, v)
    out = db.creative_sparse_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(out.double(), _sdpa64(q, k, v, gqa=True), atol=TOL)


def test_key_padding_masks_in_every_accepted_form() -> None:
    q, k, v = _qkv(s=200)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[0, 150:] = False
    keep[1, :40] = False
    expected = _sdpa64(q, k, v, mask=keep)
    additive = torch.zeros(2, 200).masked_fill(~keep, -math.inf)
    for mask in (keep, keep[:, None, None, :], additive, additive[:, None, None, :]):
        out = db.creative_sparse_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(out.double(), expected, atol=TOL)
    assert db.default_state().report_row()["fallbacks"] == 0


def test_general_mask_runs_dense_with_it_and_counts_a_fallback() -> None:
    q, k, v = _qkv(s=100)
    bias = torch.randn(2, 1, 100, 100)
    out = db.creative_sparse_attention(q, k, v, attn_mask=bias)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)),
                                                           attn_mask=bias.double()).transpose(1, 2)
    assert torch.allclose(out.double(), ref, atol=TOL)
    row = db.default_state().report_row()
    assert row["fallbacks"] == 1 and list(row["fallback_reasons"]) == ["attention mask"]


def test_refused_arguments() -> None:
    q, k, v = _qkv(s=64)
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        db.creative_sparse_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_lse"):
        db.creative_sparse_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="not a key padding mask"):
        db.key_padding_mask_from(torch.tensor([[0.0, -1.0]]), 1, 2, 2)
    with pytest.raises(ValueError, match="key length"):
        db.key_padding_mask_from(torch.ones(1, 3, dtype=torch.bool), 1, 2, 2)


def test_default_config_is_honoured() -> None:
    q, k, v = _qkv(b=1, s=1024, d=16)
    db.register_diffusers_backend(SPARSE)
    out = db.creative_sparse_attention(q, k, v)
    row = db.default_state().report_row()
    assert row["calls"] == 1 and row["mean_kept_fraction"] < 0.5
    assert not torch.allclose(out.double(), _sdpa64(q, k, v), atol=1e-3)


# -- head shards ------------------------------------------------------------------------------


def test_ulysses_head_range() -> None:
    assert [cp.ulysses_head_range(12, r, 2) for r in range(2)] == [(0, 6), (6, 12)]
    assert [cp.ulysses_head_range(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    # "Ulysses anything": 30 heads padded to 32 over 8 ranks, the last rank drops the padding
    assert [cp.ulysses_head_range(30, r, 8) for r in (0, 6, 7)] == [(0, 4), (24, 28), (28, 30)]
    with pytest.raises(ValueError, match="rank must lie"):
        cp.ulysses_head_range(12, 2, 2)
    with pytest.raises(TypeError, match="world must be an int"):
        cp.ulysses_head_range(12, 0, 2.0)


def test_shard_config_slices_every_per_head_tensor() -> None:
    cfg = hcs.SparseAttentionConfig(topk=torch.tensor([0.1, 0.2, 0.3, 0.4]), simthreshd1=torch.tensor([0.5] * 4),
                                    pvthreshd=torch.tensor([10.0, 20.0, 30.0, 40.0]), min_seq_len=0)
    shard = cp.shard_config(cfg, 1, 3, 4)
    assert shard.topk.tolist() == pytest.approx([0.2, 0.3])
    assert shard.pvthreshd.tolist() == [20.0, 30.0]
    assert shard.simthreshd1.tolist() == [0.5, 0.5]
    assert shard.min_seq_len == 0 and cfg.topk.numel() == 4
    assert cp.shard_config(cfg, 0, 4, 4) is cfg
    scalar = hcs.SparseAttentionConfig(topk=0.25)
    assert cp.shard_config(scalar, 2, 4, 4).topk == 0.25
    with pytest.raises(ValueError, match="4 per-head values but the layer has 6"):
        cp.shard_config(cfg, 0, 3, 6)
    with pytest.raises(ValueError, match="head range"):
        cp.shard_config(cfg, 3, 3, 4)


def test_head_shard_state_runs_its_heads_with_their_budgets() -> None:
    """A shard's output equals the full layer's output on those heads (per-head top-k)."""
    q, k, v = _qkv(b=1, s=640, h=4, d=16)
    cfg = SPARSE.replace(topk=torch.tensor([0.1, 0.3, 0.6, 0.9]))
    layer = cp.BackendLayer(LayerState("blocks.0.attn1", cfg))
    full = layer.for_heads(0, 4, 4).attend(q, k, v, layout="NHD")
    for start, stop in ((0, 2), (2, 4)):
        shard = layer.for_heads(start, stop, 4)
        part = shard.attend(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], layout="NHD")
        assert torch.allclose(part, full[:, :, start:stop], atol=TOL)
        assert shard.config.topk.tolist() == pytest.approx(cfg.topk[start:stop].tolist())
    assert sorted(layer.shards) == [(0, 2), (2, 4)]


def test_replicated_keys_are_attended_once() -> None:
    """Wan's unsplit text gathered by Ulysses 2: two identical copies become one."""
    q, k, v = _qkv(b=1, s=300, d=16)
    text_k, text_v = k[:, :40], v[:, :40]
    key, value = torch.cat([text_k, text_k], 1), torch.cat([text_v, text_v], 1)
    mask = torch.ones(1, 80, dtype=torch.bool)
    k1, v1, m1 = cp.drop_replicated_keys(key, value, mask, 2, len_q=300)
    assert torch.equal(k1, text_k) and torch.equal(v1, text_v) and m1.shape == (1, 40)
    # the same softmax over one copy as over both
    assert torch.allclose(_sdpa64(q, k1, v1), _sdpa64(q, key, value), atol=1e-10)
    different = torch.cat([text_k, text_k + 1e-3], 1)
    assert cp.drop_replicated_keys(different, value, None, 2, len_q=300)[0] is different
    assert cp.drop_replicated_keys(key, value, None, 2, len_q=80)[0] is key  # self-attention: left alone
    assert cp.drop_replicated_keys(key, value, None, 3, len_q=300)[0] is key  # 80 keys do not split in 3


# -- whole models -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["wan", "flux", "hunyuan_video"])
def test_dense_backend_matches_native_and_restores(family: str) -> None:
    # batch 2 where it matters: HunyuanVideo pads the text of one sample only
    model, inputs = tiny_transformer(family), transformer_inputs(family, batch=2 if family == "hunyuan_video" else 1)
    if family == "wan":  # 2 x 8 x 16 = 256 video tokens: the reference kernel is slow on a busy CPU
        inputs["hidden_states"] = inputs["hidden_states"][..., :16, :32]
    elif family == "flux":  # 24 text + 256 image tokens
        inputs["hidden_states"], inputs["img_ids"] = inputs["hidden_states"][:, :256], inputs["img_ids"][:256]
    with torch.no_grad():
        native = model(**inputs, return_dict=False)[0]
        handle = hcs.enable_diffusers_backend(model, DENSE)
        out = model(**inputs, return_dict=False)[0]
        report = hcs.sparsity_report(model)
        hcs.disable_creative_sparse(model)
        again = model(**inputs, return_dict=False)[0]
    assert torch.allclose(out, native, atol=1e-4), (out - native).abs().max()
    assert torch.equal(again, native)
    assert not handle.active
    assert report.calls >= 2 and all(r["calls"] >= 1 for r in report.rows)
    sparse_calls = sum(r["sparse_calls"] for r in report.rows)
    assert sparse_calls >= 1  # the reference kernel ran (masks included for HunyuanVideo's padded text)


def test_plain_set_attention_backend_uses_the_default_layer() -> None:
    model, inputs = tiny_transformer("wan"), transformer_inputs("wan")
    with torch.no_grad():
        native = model(**inputs, return_dict=False)[0]
        db.register_diffusers_backend(SPARSE)
        model.set_attention_backend("creative_sparse")
        try:
            out = model(**inputs, return_dict=False)[0]
        finally:
            model.set_attention_backend("native")
    row = db.default_state().report_row()
    assert row["calls"] == 4  # 2 blocks x (attn1, attn2)
    assert row["mean_kept_fraction"] < 1.0
    assert not torch.allclose(out, native, atol=1e-4)


def test_per_layer_calibration_and_options() -> None:
    model, inputs = tiny_transformer("wan"), transformer_inputs("wan")
    calibration = {"blocks.1.attn1": {"topk": 0.2, "simthreshd1": -1.0, "backend": "reference"}}
    handle = hcs.enable_diffusers_backend(model, DENSE_SDPA, calibration=calibration,
                                          options=PatchOptions(dense_steps=1))
    states = handle.layer_states()
    assert states["blocks.1.attn1"].config.topk == 0.2 and states["blocks.0.attn1"].config.topk is None
    with torch.no_grad():
        model(**inputs)                                       # step 0: dense by dense_steps
        model(**{**inputs, "timestep": inputs["timestep"] - 100})  # step 1
    rows = {r["layer"]: r for r in hcs.sparsity_report(model).rows}
    assert rows["blocks.1.attn1"]["fallback_reasons"] == {"dense step": 1}
    assert rows["blocks.1.attn1"]["sparse_calls"] == 1 and rows["blocks.1.attn1"]["mean_kept_fraction"] < 0.7
    assert rows["blocks.0.attn1"]["mean_kept_fraction"] == 1.0
    hcs.disable_creative_sparse(model)


def test_bad_targets_and_arguments() -> None:
    with pytest.raises(ValueError, match="attention dispatch"):
        hcs.enable_diffusers_backend(tiny_transformer("cogvideox"))
    model = tiny_transformer("wan")
    with pytest.raises(ValueError, match="num_inference_steps"):
        hcs.enable_diffusers_backend(model, schedule=hcs.TwoStageSchedule())
    with pytest.raises(TypeError, match="config must be"):
        hcs.enable_diffusers_backend(model, {"topk": 0.1})
    with pytest.raises(TypeError, match="pipeline"):
        hcs.enable_diffusers_backend("wan")
    with pytest.raises(ValueError, match="not active"):
        db.backend_layers(model)


@pytest.mark.cuda
def test_cuda_backend_on_the_gpu_kernels() -> None:
    """bf16 on the GPU, Wan's head size: dense config = SDPA; a per-head top-k config runs
    the compiled kernel with the budget each head was given."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4100, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = _sdpa64(q, k, v)
    db.register_diffusers_backend(hcs.SparseAttentionConfig.dense(min_seq_len=0, backend="cuda"))
    out = db.creative_sparse_attention(q, k, v)
    assert (out.double() - ref).abs().max() < 2e-2
    topk = torch.tensor([0.1, 0.2, 0.4, 0.8])
    db.register_diffusers_backend(hcs.SparseAttentionConfig(topk=topk, simthreshd1=-1.0, backend="cuda"))
    db.creative_sparse_attention(q, k, v)
    stats = db.default_state().last_stats
    assert stats.fallback_reason is None and stats.backend == "cuda"
    kept = stats.block_mask.float().mean(dim=(0, 2, 3)).cpu()
    assert torch.allclose(kept, topk, atol=0.02)
