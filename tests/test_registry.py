"""Registry, per-layer state, step clock and the one-liner API (family-independent parts)."""

import math

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.integrations import registry
from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.creative.control import SparsityConfig, SparsityController, TwoStageSchedule, set_current_sparsity
from hf_creative_sparse.integrations.registry import ModelPatch, find_patch, layer_config, register_patch
from hf_creative_sparse.integrations.state import LayerState, PatchOptions, StepClock

SPARSE = SparseAttentionConfig(min_seq_len=0, topk=0.3, simthreshd1=-1.0, backend="reference")
FAMILIES = {"cogvideox": "CogVideoXTransformer3DModel", "flux": "FluxTransformer2DModel",
            "wan": "WanTransformer3DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel"}


# -- a toy family: proves the registry is open to other glue (as the transformers patch) --

class ToyAttention(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attention_fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.attention_fn(q, k, v).transpose(1, 2).reshape(b, n, -1)


class ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([ToyAttention(), ToyAttention()])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class ToyPatch(ModelPatch):
    family = "toy"
    model_classes = ("ToyModel",)

    def install(self) -> None:
        self._saved = {}
        for name, module in self.model.named_modules():
            if isinstance(module, ToyAttention):
                self._saved[name] = module.attention_fn
                module.attention_fn = self.make_state(name).attend

    def remove(self) -> None:
        for name, fn in self._saved.items():
            self.model.get_submodule(name).attention_fn = fn


@pytest.fixture
def toy_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", list(registry.registered_patches()))
    register_patch(ToyPatch)
    return ToyPatch


def test_custom_patch_enable_report_disable(toy_registry):
    model = ToyModel()
    x = torch.randn(2, 300, 32)
    ref = model(x)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    out = model(x)
    report = hcs.sparsity_report(model)
    hcs.disable_creative_sparse(model)
    assert isinstance(handle.patches[""], ToyPatch)
    assert [r["layer"] for r in report.rows] == ["layers.0", "layers.1"]
    assert all(r["calls"] == 1 and r["mean_kept_fraction"] < 1.0 for r in report.rows)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert torch.equal(model(x), ref)
    text = str(report)
    assert "layers.0" in text and "total" in text and "reference" in text


def test_disable_twice_warns_and_the_handle_prints_on_one_line(toy_registry):
    model = ToyModel()
    x = torch.randn(1, 300, 32)
    ref = model(x)
    handle = hcs.enable_creative_sparse(model, SPARSE)
    text = repr(handle)
    assert "\n" not in text and len(text) < 200, text
    assert "ToyModel" in text and "toy" in text and "2 layers" in text and "active" in text
    hcs.disable_creative_sparse(model)
    with pytest.warns(UserWarning, match="already disabled"):
        hcs.disable_creative_sparse(model)
    assert "disabled" in repr(handle) and torch.equal(model(x), ref)


def test_sparsity_report_of_a_model_loaded_with_the_attention_implementation():
    pytest.importorskip("transformers")
    from hf_creative_sparse.testing import tiny_llama

    model = tiny_llama(max_position_embeddings=2048)
    with pytest.raises(ValueError, match="not enabled"):
        hcs.sparsity_report(model)
    model.set_attn_implementation("creative_sparse")
    assert hcs.sparsity_report(model).calls == 0  # layers appear on their first call
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 40)))
    report = hcs.sparsity_report(model)
    assert [r["layer"] for r in report.rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r["calls"] == 1 for r in report.rows) and "total" in str(report)
    with pytest.warns(UserWarning, match="set_attn_implementation"):
        hcs.disable_creative_sparse(model)


def test_find_patch_for_each_family():
    pytest.importorskip("diffusers")
    from _tiny_diffusers import tiny_transformer

    for family in FAMILIES:
        assert find_patch(tiny_transformer(family)).family == family


def test_unsupported_model_lists_supported_families():
    with pytest.raises(ValueError) as err:
        hcs.enable_creative_sparse(torch.nn.Linear(2, 2))
    message = str(err.value)
    assert "Linear" in message
    for family, cls in FAMILIES.items():
        assert family in message and cls in message


def test_unsupported_pipeline_names_its_models():
    class FakePipeline:
        components = {"unet": torch.nn.Linear(2, 2), "scheduler": None}

    with pytest.raises(ValueError, match="unet=Linear"):
        hcs.enable_creative_sparse(FakePipeline())
    with pytest.raises(TypeError, match="pipe_or_model"):
        hcs.enable_creative_sparse("not a model")


def test_bad_arguments(toy_registry):
    model = ToyModel()
    with pytest.raises(TypeError, match="config"):
        hcs.enable_creative_sparse(model, {"topk": 0.5})
    with pytest.raises(TypeError, match="options"):
        hcs.enable_creative_sparse(model, options={"dense_steps": 1})
    with pytest.raises(TypeError, match="schedule"):
        hcs.enable_creative_sparse(model, schedule=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        hcs.enable_creative_sparse(model, schedule=TwoStageSchedule())
    with pytest.warns(UserWarning, match="not enabled"):
        hcs.disable_creative_sparse(model)
    with pytest.raises(ValueError, match="not enabled"):
        hcs.sparsity_report(model)
    with pytest.raises(ValueError, match="mask_refresh"):
        PatchOptions(mask_refresh=0)
    with pytest.raises(ValueError, match="dense_steps"):
        PatchOptions(dense_steps=-1)
    with pytest.raises(TypeError, match="controller"):
        PatchOptions(controller=object())


def test_register_patch_validates():
    with pytest.raises(TypeError):
        register_patch(object)

    class NoFamily(ModelPatch):
        model_classes = ("X",)

        def install(self) -> None: ...

        def remove(self) -> None: ...

    with pytest.raises(TypeError, match="family"):
        register_patch(NoFamily)


def test_enable_twice_replaces_and_restores_original(toy_registry):
    model = ToyModel()
    originals = [layer.attention_fn for layer in model.layers]
    first = hcs.enable_creative_sparse(model, SPARSE)
    second = hcs.enable_creative_sparse(model, SPARSE.replace(topk=0.5))
    assert not first.active and second.active
    assert [s.config.topk for s in second.layer_states().values()] == [0.5, 0.5]
    hcs.disable_creative_sparse(model)
    assert [layer.attention_fn for layer in model.layers] == originals


def test_calibration_per_layer(toy_registry):
    model = ToyModel()
    handle = hcs.enable_creative_sparse(model, SPARSE, calibration={"layers.1": {"topk": 0.6}})
    states = handle.layer_states()
    assert states["layers.0"].config.topk == 0.3 and states["layers.1"].config.topk == 0.6
    hcs.disable_creative_sparse(model)

    class Calib:
        def config_for(self, name, base):
            return base.replace(simthreshd1=0.2) if name == "layers.0" else base

    assert layer_config(Calib(), "layers.0", SPARSE).simthreshd1 == 0.2
    assert layer_config(Calib(), "layers.1", SPARSE) is SPARSE
    with pytest.raises(TypeError, match="calibration"):
        layer_config(3, "layers.0", SPARSE)


# -- LayerState --------------------------------------------------------------------------

def _qkv(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 16, generator=g) for _ in range(3))


def test_layer_state_dense_steps_then_sparse():
    clock = StepClock(4)
    state = LayerState("l", SPARSE, clock=clock, options=PatchOptions(dense_steps=2))
    q, k, v = _qkv()
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for step in range(3):
        out = state.attend(q, k, v)
        if step < 2:
            assert state.last_stats.fallback_reason.startswith("dense step")
            torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
        else:
            assert state.last_stats.fallback_reason is None and state.last_stats.kept_fraction < 1.0
        clock.advance()
    row = state.report_row()
    assert row["calls"] == 3 and row["sparse_calls"] == 1 and row["fallback_reasons"] == {"dense step": 2}
    assert row["mean_kept_fraction"] == pytest.approx((2 + state.last_stats.kept_fraction) / 3)


def test_layer_state_dense_decision_is_remembered_per_slot_and_dropped_when_its_inputs_change(monkeypatch):
    """A call slot decided dense from shapes and config alone (a short sequence) skips
    validation and the policy on later calls, with the same output and stats; other
    shapes, a bad argument, a hook or another dial value take the full path."""
    from hf_creative_sparse.integrations import state as state_mod

    cfg = SparseAttentionConfig(topk=0.3, min_seq_len=256)
    clock = StepClock(8)
    layer = LayerState("l", cfg, clock=clock)
    validated = []
    real = state_mod.attention_inputs
    monkeypatch.setattr(state_mod, "attention_inputs", lambda *a, **kw: validated.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(2, 3, 100, 16, dtype=torch.float64).float() for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for _ in range(3):
        out = layer.attend(q, k, v, layout="HND", dense_prefix=4)
        torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)
        assert layer.last_stats.fallback_reason.startswith("short sequence")
    assert len(validated) == 1  # the first call decided; the next two reused the decision
    nhd = layer.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD", dense_prefix=4)
    layer.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD", dense_prefix=4)
    torch.testing.assert_close(nhd, dense.transpose(1, 2), atol=1e-6, rtol=0)
    assert len(validated) == 2
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        layer.attend(q, k, v[:, :, :99])
    with pytest.raises(ValueError, match="dense_prefix"):
        layer.attend(q, k, v, dense_prefix=-1)
    long_q, long_k, long_v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    layer.attend(long_q, long_k, long_v, dense_prefix=4)
    reason = layer.last_stats.fallback_reason  # a new shape: validated, and the policy ran
    assert len(validated) == 5 and (reason is None or not reason.startswith("short sequence"))
    calls = []
    remove = layer.add_hook(calls.append)
    layer.attend(q, k, v, dense_prefix=4)
    remove()
    assert len(calls) == 1 and calls[0].inputs is not None
    row = layer.report_row()
    assert row["calls"] == 7 and row["fallback_reasons"]["short sequence"] == 6
    layer.clear_cache()
    layer.attend(q, k, v, dense_prefix=4)
    assert len(validated) == 7


def test_layer_state_mask_refresh_and_new_loop():
    clock = StepClock(6)
    state = LayerState("l", SPARSE, clock=clock, options=PatchOptions(mask_refresh=3))
    masks = []
    for step in range(4):
        q, k, v = _qkv(seed=step)  # different data each step: a fresh prediction would differ
        state.attend(q, k, v)
        masks.append(state.last_stats.block_mask)
        clock.advance()
    assert masks[1] is masks[0] and masks[2] is masks[0] and masks[3] is not masks[0]
    assert state.report_row()["masks_reused"] == 2
    clock.begin(6)  # a new loop never reuses the last loop's mask
    state.attend(*_qkv(seed=9))
    assert state.last_stats.block_mask is not masks[3] and state.report_row()["masks_reused"] == 2


def test_layer_state_schedule_and_published_sparsity():
    controller = SparsityController(SparsityConfig(simthreshd1=-1.0))
    clock = StepClock(4)
    schedule = TwoStageSchedule(diverge=0.8, refine=0.2, switch=0.5)
    state = LayerState("l", SPARSE, schedule=schedule, clock=clock, options=PatchOptions(controller=controller))
    q, k, v = _qkv()
    seen = []
    for _ in range(4):
        state.attend(q, k, v)
        seen.append((state.last_s, state.last_stats.kept_fraction))
        clock.advance()
    assert [s for s, _ in seen] == [0.8, 0.8, 0.2, 0.2]
    assert seen[0][1] < seen[2][1]  # diverge keeps fewer blocks than refine

    fixed = LayerState("f", SPARSE, options=PatchOptions(controller=controller))
    fixed.attend(q, k, v)
    assert fixed.last_s is None and fixed.config_for(None).topk == 0.3
    set_current_sparsity(0.7)
    try:
        fixed.attend(q, k, v)
    finally:
        set_current_sparsity(None)
    assert fixed.last_s == 0.7
    assert fixed.config_for(0.7).topk == pytest.approx(controller.get_sparsity_params(0.7).attention_budget)


def test_layer_state_text_dense_hooks_and_validation():
    state = LayerState("l", SPARSE)
    seen = []
    remove = state.add_hook(seen.append)
    q, k, v = _qkv()
    state.attend(q, k, v, dense_prefix=100)
    mask = state.last_stats.block_mask
    assert mask[..., 0, :].all() and mask[..., :, :2].all()  # rows 0..127, columns 0..127
    remove()
    state.attend(q, k, v)
    assert len(seen) == 1 and seen[0].config.dense_prefix == 100
    with pytest.raises(ValueError, match="dense_suffix"):
        state.attend(q, k, v, dense_suffix=-1)
    with pytest.raises(TypeError, match="config"):
        LayerState("l", {"topk": 0.3})
    state.record_fallback("attention mask")
    row = state.report_row()
    assert row["calls"] == 3 and row["fallback_reasons"] == {"attention mask": 1}
    state.reset_stats()
    assert state.report_row()["calls"] == 0 and math.isnan(state.report_row()["mean_kept_fraction"])


# -- StepClock ---------------------------------------------------------------------------

def test_step_clock_from_timesteps():
    clock = StepClock(3)
    trace = []
    for t in (900, 900, 500, 500, 100, 900, 500):  # last two: a second generation
        clock.on_forward(torch.tensor([float(t)]))
        trace.append((clock.step, clock.call_in_step, clock.loop))
    assert trace == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert clock.progress() == pytest.approx(1 / 3)


def test_step_clock_from_scheduler_counts_calls_within_step():
    clock = StepClock(source="scheduler")
    clock.begin(4)
    trace = []
    for _ in range(2):
        clock.on_forward(123)
        clock.on_forward(123)
        trace.append((clock.step, clock.call_in_step))
        clock.advance()
    assert trace == [(0, 1), (1, 1)] and clock.progress() == 0.5
    with pytest.raises(ValueError, match="source"):
        StepClock(source="callback")


def test_scheduler_methods_restored_after_disable():
    pytest.importorskip("diffusers")
    from _tiny_diffusers import tiny_pipeline

    pipe = tiny_pipeline("wan")
    handle = hcs.enable_creative_sparse(pipe, SPARSE)
    assert "step" in vars(pipe.scheduler) and handle.clock.source == "scheduler"
    pipe.scheduler.set_timesteps(7)
    assert handle.clock.num_steps == 7
    hcs.disable_creative_sparse(pipe)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not hasattr(pipe, "_hf_creative_sparse_handle") and not hasattr(pipe.transformer, "_hf_creative_sparse_handle")


def test_kv_reuse_ratio_sets_mask_refresh():
    from hf_creative_sparse.creative.control import SparsityConfig, SparsityController
    from hf_creative_sparse.integrations.state import PatchOptions

    ctl = SparsityController(SparsityConfig(kv_reuse_ratio=0.75))
    assert PatchOptions(controller=ctl).refresh == 4  # 1 / (1 - 0.75) calls per mask
    assert PatchOptions(controller=ctl, mask_refresh=3).refresh == 3  # an explicit value wins
    assert PatchOptions(controller=ctl, mask_refresh=1).refresh == 1  # an explicit 1 too (issue 16)
    assert PatchOptions(controller=SparsityController()).refresh == 1


def test_schedule_never_makes_a_calibrated_layer_sparser():
    import torch

    from hf_creative_sparse.ops.config import SparseAttentionConfig
    from hf_creative_sparse.creative.control import SparsityController
    from hf_creative_sparse.integrations.state import _calibrated_under_schedule

    ctl = SparsityController()
    calibrated = SparseAttentionConfig(topk=torch.tensor([0.2, 0.9]), simthreshd1=0.3, pvthreshd=30.0)
    diverge = ctl.get_sparsity_params(0.7)  # budget ~0.5
    cfg = _calibrated_under_schedule(calibrated, diverge)
    assert torch.allclose(cfg.topk, torch.tensor([diverge.attention_budget, 0.9]))
    assert cfg.simthreshd1 == 0.3 and cfg.pvthreshd == 30.0  # calibrated thresholds survive
    dense = _calibrated_under_schedule(calibrated, ctl.get_sparsity_params(0.0))
    assert dense.cdfthreshd == 1.0 and dense.simthreshd1 == 1.0 and dense.topk is None
    cdf_calibrated = SparseAttentionConfig(cdfthreshd=torch.tensor([0.9, 0.99]))
    assert _calibrated_under_schedule(cdf_calibrated, diverge) is cdf_calibrated
