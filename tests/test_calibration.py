"""Calibration: the vectorised search against independent float64 references, the choice
rules, calibrated tiny Wan/Flux transformers on held-out calls, the files (round trip,
atomic writes, truncation, a file for another model) and the GPU benchmark's small mode."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from hf_creative_sparse import SparseAttentionConfig, disable_creative_sparse, enable_creative_sparse, sparsity_report
from hf_creative_sparse.calibration import (CONFIG_NAME, TENSORS_NAME, Calibration, RecordedCall, calibrate,
                                            calibrate_calls, load_calibration)
from hf_creative_sparse.calibration.search import (CallOptions, LayerStats, SearchGrid, candidate_segments,
                                                   choose_masks, choose_pv, observe_masks, observe_pv)
from hf_creative_sparse.testing import smooth_noise, tiny_transformer
from hf_creative_sparse.ops.dense import dense_attention
from hf_creative_sparse.ops.inputs import attention_inputs
from hf_creative_sparse.ops.masks import predict_from_inputs

sys.path.insert(0, os.path.dirname(__file__))
from reference_impl import element_mask, masked_attention_f64, pv_skip_attention_f64  # noqa: E402

TARGET = 0.05


def structured_qkv(b: int, hq: int, hkv: int, n: int, d: int, *, seed: int = 0, sharp: float = 3.0):
    """q/k that vary smoothly along the sequence (blocks of similar tokens, local attention)."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(b, hq, n // 40 + 2, d, generator=g)
    base = torch.nn.functional.interpolate(anchors.flatten(0, 1).transpose(1, 2), size=n, mode="linear",
                                           align_corners=False).transpose(1, 2).view(b, hq, n, d)
    q = base + 0.2 * torch.randn(b, hq, n, d, generator=g)
    k = base[:, :hkv] + 0.2 * torch.randn(b, hkv, n, d, generator=g)
    # unit vectors times a gain: scores follow the cosine, so neighbours (not large norms) win
    q = q / q.norm(dim=-1, keepdim=True) * sharp * d ** 0.5
    k = k / k.norm(dim=-1, keepdim=True) * sharp
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.contiguous(), k.contiguous(), v


CASES = [  # (method, causal, GQA kv heads, key padding, dense prefix, attention sink)
    ("cdf", False, 4, False, 0, False),
    ("topk", True, 2, False, 0, False),
    ("cdf", False, 4, True, 70, True),
    ("topk", False, 1, True, 0, True),
]


@pytest.mark.parametrize("method,causal,hkv,padded,prefix,sink", CASES)
def test_candidate_masks_equal_the_predictor(method, causal, hkv, padded, prefix, sink):
    q, k, v = structured_qkv(2, 4, hkv, 650, 16)
    kpm = None
    if padded:
        kpm = torch.ones(2, 650, dtype=torch.bool)
        kpm[0, 500:] = False
    inp = attention_inputs(q, k, v, is_causal=causal, key_padding_mask=kpm)
    grid = SearchGrid(method=method)
    seg = candidate_segments(inp, grid, CallOptions(dense_prefix=prefix, attention_sink=sink))
    assert seg.shape == (len(grid.simthreshd1), 2, 4, inp.num_q_blocks, inp.num_k_blocks)
    for s_idx, sim in enumerate(grid.simthreshd1):
        for c_idx, level in enumerate(grid.levels):
            expected = predict_from_inputs(inp, simthreshd1=sim, cdfthreshd=level if method == "cdf" else None,
                                           topk=level if method == "topk" else None, attention_sink=sink,
                                           dense_prefix=prefix)
            assert torch.equal(seg[s_idx] <= c_idx, expected), (sim, level)


@pytest.mark.parametrize("method,causal,hkv,padded,prefix,sink", CASES[:3])
def test_mask_error_estimates_equal_float64_attention(method, causal, hkv, padded, prefix, sink):
    q, k, v = structured_qkv(1, 4, hkv, 650, 16, seed=1)
    kpm = None
    if padded:
        kpm = torch.ones(1, 650, dtype=torch.bool)
        kpm[0, 520:] = False
    inp = attention_inputs(q, k, v, is_causal=causal, key_padding_mask=kpm)
    grid = SearchGrid(method=method, simthreshd1=(0.0, 0.5))
    opts = CallOptions(dense_prefix=prefix, attention_sink=sink)
    stats = LayerStats(4, 2, len(grid.levels), len(grid.pvthreshd))
    observe_masks(stats, inp, grid, opts, max_chunk_elements=20_000)  # several query chunks
    seg = candidate_segments(inp, grid, opts)
    dense = masked_attention_f64(q, k, v, element_mask(None, 650, 650, is_causal=causal, key_padding_mask=kpm))
    dense_abs = dense.abs().sum(dim=(0, 2, 3))
    torch.testing.assert_close(stats.dense_abs, dense_abs, rtol=1e-5, atol=0)
    for s_idx in range(2):
        for c_idx in range(len(grid.levels)):
            mask = element_mask(seg[s_idx] <= c_idx, 650, 650, is_causal=causal, key_padding_mask=kpm)
            err = (masked_attention_f64(q, k, v, mask) - dense).abs().sum(dim=(0, 2, 3))
            # float32 statistics against float64 attention: agree to ~1e-6 of sum |dense|
            assert float(((stats.mask_err[:, s_idx, c_idx] - err).abs() / dense_abs).max()) < 2e-6
            kept = (seg[s_idx] <= c_idx).sum(dim=(0, 2, 3)).double()
            assert torch.equal(stats.kept[:, s_idx, c_idx], kept)
    assert torch.equal(stats.calls, torch.ones(1, dtype=torch.float64))


def test_stage2_estimates_equal_the_row_loop_reference():
    q, k, v = structured_qkv(1, 2, 2, 300, 8, seed=2, sharp=4.0)
    inp = attention_inputs(q, k, v, is_causal=True)
    grid = SearchGrid(pvthreshd=(12.0, 6.0, 3.0, 1.0))
    mask = predict_from_inputs(inp, simthreshd1=0.0, cdfthreshd=0.95)
    stats = LayerStats(2, len(grid.simthreshd1), len(grid.levels), len(grid.pvthreshd))
    observe_pv(stats, inp, mask, grid)
    dense = masked_attention_f64(q, k, v, element_mask(None, 300, 300, is_causal=True))
    assert grid.pvthreshd[0] == math.inf
    for p_idx, thr in enumerate(grid.pvthreshd):
        out, skipped, visited = pv_skip_attention_f64(q, k, v, mask, thr, is_causal=True)
        err = (out - dense).abs().sum(dim=(0, 2, 3))
        assert float(((stats.pv_err[:, p_idx] - err).abs() / dense.abs().sum(dim=(0, 2, 3))).max()) < 2e-6
        assert int(stats.pv_skipped[:, p_idx].sum()) == skipped
        assert int(stats.pv_visited.sum()) == visited
    assert int(stats.pv_skipped[:, -1].sum()) > 0  # the smallest threshold does skip something


def test_choice_rules_on_hand_made_statistics():
    stats = LayerStats(3, 2, 3, 3)
    # head 0: sim 1 / level 0 fits (kept 10); head 1: only level 2 (keep all) fits -> dense;
    # head 2: two candidates fit with kept 20; the smaller error wins
    stats.tensors["dense_abs"][:] = 100.0
    stats.tensors["total"][:] = 40.0
    stats.tensors["kept"][:] = torch.tensor([[[10., 20., 40.], [12., 25., 40.]]] * 3)
    stats.tensors["kept"][0, 1, 0] = 10.0
    stats.tensors["mask_err"][:] = torch.tensor([[[9.0, 3.0, 0.0], [4.0, 2.0, 0.0]],
                                                 [[9.0, 8.0, 0.0], [9.0, 7.0, 0.0]],
                                                 [[9.0, 4.5, 0.0], [9.0, 3.5, 0.0]]])
    stats.tensors["kept"][2] = torch.tensor([[10., 20., 40.], [12., 20., 40.]])
    choice = choose_masks(stats, torch.full((3,), TARGET, dtype=torch.float64))
    assert choice.sim_index.tolist() == [1, 0, 1]
    assert choice.level_index.tolist() == [0, 2, 1]
    assert choice.dense.tolist() == [False, True, False]
    torch.testing.assert_close(choice.kept_fraction, torch.tensor([0.25, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(choice.estimated_l1, torch.tensor([0.04, 0.0, 0.035], dtype=torch.float64))
    # stage 2: head 0 may skip at index 1 (err 0.045) but not index 2 (err 0.06)
    stats.tensors["pv_dense_abs"][:] = 100.0
    stats.tensors["pv_err"][:] = torch.tensor([[4.0, 4.5, 6.0], [0.0, 0.0, 0.0], [3.5, 5.5, 9.0]])
    stats.tensors["pv_skipped"][:] = torch.tensor([[0.0, 5.0, 9.0], [0.0, 4.0, 8.0], [0.0, 2.0, 6.0]])
    pv = choose_pv(stats, choice, torch.full((3,), TARGET, dtype=torch.float64))
    assert pv.pv_index.tolist() == [1, 0, 0]  # dense head 1 never skips; head 2 has no fitting skip


def test_calibrate_calls_meets_the_target_and_keeps_unfit_heads_dense():
    q, k, v = structured_qkv(1, 2, 2, 1024, 16, seed=3, sharp=4.0)
    q[:, 1], k[:, 1] = 0.0, 0.0  # head 1 attends uniformly: no block can go within 5% L1
    calls = [RecordedCall(q, k, v), RecordedCall(*structured_qkv(1, 2, 2, 1024, 16, seed=4, sharp=4.0))]
    calls[1].q[:, 1], calls[1].k[:, 1] = 0.0, 0.0
    config = SparseAttentionConfig(min_seq_len=0, backend="reference")
    cal = calibrate_calls({"attn": calls}, TARGET, config=config, progress=False)
    layer = cal.layers["attn"]
    assert layer.heads == 2 and layer.calls == 2
    assert layer.dense.tolist() == [False, True]
    assert float(layer.kept_fraction[0]) < 0.8
    # the measured error, recomputed here with the public op on the same calls
    cfg = cal.config_for("attn", config)
    num = torch.zeros(2, dtype=torch.float64)
    den = torch.zeros(2, dtype=torch.float64)
    from hf_creative_sparse import sparse_attention

    for call in calls:
        out = sparse_attention(call.q, call.k, call.v, config=cfg)
        ref = masked_attention_f64(call.q, call.k, call.v, element_mask(None, 1024, 1024))
        num += (out.double() - ref).abs().sum(dim=(0, 2, 3))
        den += ref.abs().sum(dim=(0, 2, 3))
    measured = num / den
    assert float(measured[0]) <= TARGET
    torch.testing.assert_close(layer.measured_l1.double(), measured, rtol=1e-3, atol=1e-6)


def test_bad_arguments_are_refused():
    q, k, v = structured_qkv(1, 2, 2, 256, 8)
    layers = {"attn": [RecordedCall(q, k, v)]}
    with pytest.raises(ValueError, match="target_l1"):
        calibrate_calls(layers, 0.0, progress=False)
    with pytest.raises(ValueError, match="pv_target_l1"):
        calibrate_calls(layers, 0.05, 0.01, progress=False)
    with pytest.raises(ValueError, match="safety"):
        calibrate_calls(layers, 0.05, safety=1.5, progress=False)
    with pytest.raises(ValueError, match="method"):
        SearchGrid(method="bisect")
    with pytest.raises(ValueError, match="contradicts"):
        calibrate_calls(layers, 0.05, method="topk", grid=SearchGrid(method="cdf"), progress=False)
    with pytest.raises(TypeError, match="inputs_or_callable"):
        calibrate(tiny_transformer("wan"), 42, progress=False)
    with pytest.raises(TypeError, match="RecordedCall"):
        calibrate_calls({"attn": [(q, k, v)]}, 0.05, progress=False)


# -- tiny transformers ----------------------------------------------------------------------------


def wan_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return dict(hidden_states=smooth_noise((1, 4, 2, 32, 64), seed=seed), timestep=torch.tensor([700.0 - 100 * seed]),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=g), return_dict=False)


def flux_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(1024), ys.flatten(), xs.flatten()], dim=-1)
    hidden = smooth_noise((1, 4, 32, 32), seed=seed, coarse=4).flatten(2).transpose(1, 2)
    return dict(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 24, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=img_ids, txt_ids=torch.zeros(24, 3),
                timestep=torch.tensor([0.7 - 0.1 * seed]), return_dict=False)


INPUTS = {"wan": wan_inputs, "flux": flux_inputs}
BASE = SparseAttentionConfig(min_seq_len=0, backend="reference")


@pytest.fixture(scope="module")
def calibrated():
    """family -> (model, Calibration) fitted on two calls."""
    out = {}
    for family in ("wan", "flux"):
        model = tiny_transformer(family)
        cal = calibrate(model, [INPUTS[family](0), INPUTS[family](1)], TARGET, config=BASE, progress=False)
        out[family] = (model, cal)
    return out


def held_out_errors(model, calibration, inputs) -> tuple[dict, float]:
    """Per layer: relative L1 per head of the calibrated layer against dense attention on
    the same q/k/v, over one call; and the mean kept fraction of that call."""
    handle = enable_creative_sparse(model, BASE, calibration=calibration)
    sums: dict[str, list] = {}
    for name, state in handle.layer_states().items():
        def hook(call, name=name):
            dense = dense_attention(call.inputs)
            entry = sums.setdefault(name, [0.0, 0.0])
            entry[0] = entry[0] + (call.output.double() - dense.double()).abs().sum(dim=(0, 2, 3))
            entry[1] = entry[1] + dense.double().abs().sum(dim=(0, 2, 3))

        state.add_hook(hook)
    try:
        with torch.no_grad():
            model(**inputs)
        kept = sparsity_report(model).mean_kept_fraction
    finally:
        disable_creative_sparse(model)
    return {name: num / den for name, (num, den) in sums.items()}, kept


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_calibrated_tiny_transformer_stays_under_target_on_a_held_out_call(calibrated, family):
    model, cal = calibrated[family]
    assert cal.model_class == type(model).__name__ and cal.family == family
    for name, layer in cal.layers.items():
        assert layer.heads == 2 and layer.calls == 2, name
        assert bool((layer.measured_l1 <= TARGET).all()), (name, layer.measured_l1)
    assert cal.mean_kept_fraction < 1.0
    errors, kept = held_out_errors(model, cal, INPUTS[family](5))
    assert sorted(errors) == sorted(cal.layers)
    for name, err in errors.items():
        assert float(err.max()) <= TARGET, (name, err)
    assert kept < 1.0


def test_save_load_round_trip_is_exact(calibrated, tmp_path):
    model, cal = calibrated["wan"]
    cal.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, TENSORS_NAME]  # no temporary files left
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["model_class"] == "WanTransformer3DModel" and meta["target_l1"] == TARGET
    assert [layer["name"] for layer in meta["layers"]] == list(cal.layers)
    assert all(layer["heads"] == 2 for layer in meta["layers"]) and meta["library_version"]
    loaded = load_calibration(tmp_path)
    for path in (tmp_path / CONFIG_NAME, tmp_path / TENSORS_NAME):  # either file names the calibration
        assert list(load_calibration(path).layers) == list(cal.layers)
    assert (loaded.model_class, loaded.method, loaded.target_l1, loaded.pv_target_l1) == \
        (cal.model_class, cal.method, cal.target_l1, cal.pv_target_l1)
    assert loaded.config.to_dict() == cal.config.to_dict() and loaded.grid == cal.grid
    for name, layer in cal.layers.items():
        other = loaded.layers[name]
        assert (other.heads, other.calls) == (layer.heads, layer.calls)
        for key, value in layer.tensors().items():
            assert torch.equal(other.tensors()[key].nan_to_num(-1.0), value.nan_to_num(-1.0)), (name, key)
    # enabling from the directory gives bit-identical outputs to enabling from the object
    inputs = INPUTS["wan"](6)
    outs = []
    for source in (cal, str(tmp_path)):
        enable_creative_sparse(model, BASE, calibration=source)
        with torch.no_grad():
            outs.append(model(**inputs)[0])
        disable_creative_sparse(model)
    assert torch.equal(outs[0], outs[1])


def test_a_calibration_for_another_model_is_refused(calibrated, tmp_path):
    _, wan_cal = calibrated["wan"]
    flux_model, _ = calibrated["flux"]
    wan_cal.save(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit FluxTransformer2DModel.*made for WanTransformer3DModel"):
        enable_creative_sparse(flux_model, BASE, calibration=str(tmp_path))
    assert not hasattr(flux_model, "_hf_creative_sparse_handle") or \
        getattr(flux_model, "_hf_creative_sparse_handle") is None  # nothing left installed
    from diffusers import WanTransformer3DModel

    three_heads = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    with pytest.raises(ValueError, match=r"head counts differ: blocks.0.attn1 has 3 heads, the calibration 2"):
        enable_creative_sparse(three_heads, BASE, calibration=str(tmp_path))
    one_layer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                      num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32)
    with pytest.raises(ValueError, match=r"not in this model \(blocks.1.attn1\)"):
        enable_creative_sparse(one_layer, BASE, calibration=wan_cal)


def test_truncated_or_mismatched_files_are_refused(calibrated, tmp_path):
    _, cal = calibrated["wan"]
    good = tmp_path / "good"
    cal.save(good)
    blob = (good / TENSORS_NAME).read_bytes()
    meta = (good / CONFIG_NAME).read_text()

    cut = tmp_path / "cut_tensors"
    cut.mkdir()
    (cut / CONFIG_NAME).write_text(meta)
    (cut / TENSORS_NAME).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_calibration(cut)

    cut_json = tmp_path / "cut_json"
    cut_json.mkdir()
    (cut_json / CONFIG_NAME).write_text(meta[: len(meta) // 2])
    (cut_json / TENSORS_NAME).write_bytes(blob)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(cut_json)

    flipped = bytearray(blob)
    flipped[-3] ^= 0xFF
    (cut / TENSORS_NAME).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_calibration(cut)
    with pytest.raises(FileNotFoundError):
        load_calibration(tmp_path / "nowhere")


def test_an_interrupted_save_leaves_the_previous_files(calibrated, tmp_path, monkeypatch):
    _, cal = calibrated["wan"]
    cal.save(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, TENSORS_NAME)}
    other = Calibration.dense_for({name: 2 for name in cal.layers}, model_class="WanTransformer3DModel")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, TENSORS_NAME]  # the temporary file was removed
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    load_calibration(tmp_path)


def test_gpu_benchmark_small_mode_runs_on_cpu(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import calibrate_gpu

    result = calibrate_gpu.main(["--small", "--no-progress", "--layers", "1"])
    assert "CALIBRATION TIME" in capsys.readouterr().out
    assert result["seconds"] > 0 and result["max_measured_l1"] <= 0.05
    assert result["mean_kept_fraction"] < 1.0


class TwoTransformerPipe:
    """A stand-in for Wan 2.2's pipeline: two transformers, no scheduler."""

    def __init__(self, first, second):
        self.components = {"transformer": first, "transformer_2": second}

    def __call__(self, i: int):
        with torch.no_grad():
            self.components["transformer"](**wan_inputs(i))
            self.components["transformer_2"](**wan_inputs(i + 10))


def test_two_component_pipeline_gets_each_component_its_own_thresholds():
    from hf_creative_sparse.testing import localise_attention

    first = tiny_transformer("wan")
    second = localise_attention(tiny_transformer("wan"), sharpness=1.5)  # sharper still: other thresholds
    pipe = TwoTransformerPipe(first, second)
    cal = calibrate(pipe, pipe, TARGET, num_calls=1, config=BASE, progress=False)
    assert sorted(cal.layers) == ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1",
                                  "transformer_2.blocks.0.attn1", "transformer_2.blocks.1.attn1"]
    handle = enable_creative_sparse(pipe, BASE, calibration=cal)
    try:
        for name, state in handle.layer_states().items():
            expected = cal.layers[name]
            level = state.config.cdfthreshd
            assert torch.equal(level, expected.level) and torch.equal(state.config.simthreshd1, expected.simthreshd1)
    finally:
        handle.disable()
    assert any(not torch.equal(cal.layers[f"transformer.blocks.{i}.attn1"].level,
                               cal.layers[f"transformer_2.blocks.{i}.attn1"].level) for i in (0, 1))
    with pytest.raises(ValueError, match="does not fit"):  # a one-transformer calibration on the pair
        enable_creative_sparse(pipe, BASE, calibration=Calibration.dense_for({"blocks.0.attn1": 2}))


@pytest.mark.cuda
def test_gpu_calibration_of_a_long_call_is_verified():
    q, k, v = (t.cuda().to(torch.bfloat16) for t in structured_qkv(1, 4, 4, 16384, 64, seed=9, sharp=4.0))
    torch.cuda.reset_peak_memory_stats()
    # verified on a sparse GPU kernel (auto's cost model may choose dense SDPA); FlexAttention
    # refuses stage-2 thresholds below 20, so the candidates stop there
    grid = SearchGrid(pvthreshd=(math.inf, 40.0, 30.0, 20.0))
    cal = calibrate_calls({"attn": [RecordedCall(q, k, v)]}, TARGET, progress=False, max_chunk_elements=2 ** 24,
                          config=SparseAttentionConfig(backend="flex"), grid=grid)
    layer = cal.layers["attn"]
    assert cal.info["verify_backends"] == {"flex": 1}
    assert bool((layer.measured_l1 <= TARGET).all()) and bool((layer.measured_l1 > 0).all())
    assert cal.mean_kept_fraction < 1.0 and float(layer.runtime_kept_fraction.mean()) < 1.0
    # chunked over query blocks: the fp32 N x N maps of the 4 heads alone would take 4 GiB
    assert torch.cuda.max_memory_allocated() < 2 ** 30


# -- what a new user hits (issue 17): wrong model, unknown layers, the fitted policy, umask ------


def _patched_layers(model) -> dict:
    """Layer name -> q heads of ``model``'s patched layers (enabled once, then undone)."""
    from hf_creative_sparse.calibration.result import handle_layer_heads

    handle = enable_creative_sparse(model, BASE)
    try:
        return handle_layer_heads(handle)
    finally:
        handle.disable()


def test_a_calibration_of_another_family_is_refused_even_when_the_layers_match():
    sys.path.insert(0, os.path.dirname(__file__))
    from hf_creative_sparse.testing import tiny_random_transformer as tiny_family_transformer

    hunyuan = tiny_family_transformer("hunyuan_video")
    layers = _patched_layers(hunyuan)
    # a calibration whose layer names and head counts fit, made for Flux
    flux_cal = Calibration.dense_for(layers, model_class="FluxTransformer2DModel", family="flux")
    with pytest.raises(ValueError, match=r"does not fit HunyuanVideoTransformer3DModel \(family hunyuan_video\).*"
                                         r"made for FluxTransformer2DModel \(family flux\).*allow_other_model"):
        enable_creative_sparse(hunyuan, BASE, calibration=flux_cal)
    assert getattr(hunyuan, "_hf_creative_sparse_handle", None) is None  # nothing left installed
    same_class_other_family = Calibration.dense_for(layers, model_class="HunyuanVideoTransformer3DModel", family="flux")
    with pytest.raises(ValueError, match="family flux"):
        enable_creative_sparse(hunyuan, BASE, calibration=same_class_other_family)
    # the explicit override applies it (layer names and head counts are still checked)
    handle = enable_creative_sparse(hunyuan, BASE, calibration=flux_cal, allow_other_model=True)
    assert handle.active and all(s.calibrated for s in handle.layer_states().values())
    handle.disable()
    with pytest.raises(ValueError, match="not in this model"):
        enable_creative_sparse(hunyuan, BASE, calibration=Calibration.dense_for(
            {**layers, "blocks.9.attn": 2}, model_class="FluxTransformer2DModel"), allow_other_model=True)
    with pytest.raises(TypeError, match="allow_other_model"):
        enable_creative_sparse(hunyuan, BASE, calibration=flux_cal, allow_other_model="yes")
    # its own class and family (or a subclass of it) fit
    own = Calibration.dense_for(layers, model_class="HunyuanVideoTransformer3DModel", family="hunyuan_video")
    enable_creative_sparse(hunyuan, BASE, calibration=own).disable()
    sub = type("MyHunyuan", (type(hunyuan),), {})
    hunyuan.__class__ = sub
    enable_creative_sparse(hunyuan, BASE, calibration=own).disable()


def test_a_layer_mapping_naming_an_unknown_layer_is_refused():
    model = tiny_transformer("wan")
    with pytest.raises(ValueError, match=r"does not have or does not patch: blocks\.9\.attn1.*blocks\.0\.attn1"):
        enable_creative_sparse(model, BASE, calibration={"blocks.9.attn1": {"topk": 0.5}})
    with pytest.raises(ValueError, match="blocks.0.attn2"):  # cross-attention: not patched
        enable_creative_sparse(model, BASE, calibration={"blocks.0.attn2": {"topk": 0.5}})
    assert getattr(model, "_hf_creative_sparse_handle", None) is None
    handle = enable_creative_sparse(model, BASE, calibration={"blocks.1.attn1": {"topk": 0.5}})
    assert handle.layer_states()["blocks.1.attn1"].config.topk == 0.5
    assert handle.layer_states()["blocks.0.attn1"].config.topk is None
    handle.disable()


def test_the_calibrations_stored_policy_is_what_runs(tmp_path):
    """Enabled without a config, a calibration runs with the config it was fitted with
    (min_seq_len 0 here: the 1024-token tiny calls run sparse, not 'short sequence')."""
    model = tiny_transformer("wan")
    fitted = SparseAttentionConfig(min_seq_len=0, backend="reference")
    cal = Calibration.dense_for(_patched_layers(model), model_class="WanTransformer3DModel", family="wan",
                                method="topk", config=fitted)
    for layer in cal.layers.values():  # keep 30% of the blocks of every head
        layer.level, layer.simthreshd1 = torch.full((2,), 0.3), torch.full((2,), -1.0)
    cal.save(tmp_path)
    for source in (cal, str(tmp_path)):
        handle = enable_creative_sparse(model, calibration=source)
        assert handle.config.min_seq_len == 0 and handle.config.backend == "reference"
        with torch.no_grad():
            model(**wan_inputs(0))
        report = sparsity_report(model)
        disable_creative_sparse(model)
        assert not any(r["fallback_reasons"] for r in report.rows), report
        assert report.mean_kept_fraction < 0.5
    # an explicit config overrides the calibration's policy
    enable_creative_sparse(model, SparseAttentionConfig(min_seq_len=4096), calibration=str(tmp_path))
    with torch.no_grad():
        model(**wan_inputs(0))
    report = sparsity_report(model)
    disable_creative_sparse(model)
    assert all(any("short sequence" in reason for reason in r["fallback_reasons"]) for r in report.rows), report


def test_calibration_files_follow_the_umask(tmp_path):
    cal = Calibration.dense_for({"blocks.0.attn1": 2})
    old = os.umask(0o022)
    try:
        cal.save(tmp_path / "a")
        os.umask(0o077)
        cal.save(tmp_path / "b")
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, TENSORS_NAME):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b" / name).stat().st_mode & 0o777 == 0o600
