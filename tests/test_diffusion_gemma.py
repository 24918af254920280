"""Context KV retention on DiffusionGemma (tiny random model, CPU).

References: the unpatched model (bit-identity where retention must not act), and for
retained steps the *original* decoder attention forward run in float64 with a mask that
lets it see only the tokens an independent, loop-based saliency picks.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("needs transformers >= 5.23 (DiffusionGemma)", allow_module_level=True)

from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig,  # noqa: E402
                          DynamicCache, LogitsProcessorList)
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import apply_rotary_pos_emb  # noqa: E402

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations.enable import HANDLE_ATTR  # noqa: E402
from hf_creative_sparse.creative.control import SparsityConfig, SparsityController, set_current_sparsity  # noqa: E402
from hf_creative_sparse.creative.control import current_sparsity as hcs_current_sparsity  # noqa: E402
from hf_creative_sparse.integrations.retention import (RetentionConfig, compact_kv, saliency_scores,  # noqa: E402
                                          select_retained)

PROMPT = 37  # not a multiple of anything
CANVAS = 8


def tiny_model(dtype: torch.dtype = torch.float64) -> DiffusionGemmaForBlockDiffusion:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = DiffusionGemmaTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                                      num_global_key_value_heads=1, sliding_window=64, num_experts=4,
                                      top_k_experts=2, moe_intermediate_size=16)
        vision = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64}
        # (vision_config=None would build the default 150M-parameter vision tower)
        cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vision, canvas_length=CANVAS,
                                   boi_token_id=120, eoi_token_id=121, image_token_id=122)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(cfg).to(dtype).eval()
    model.set_experts_implementation("eager")  # grouped_mm has no float64
    return model


@pytest.fixture(scope="module")
def model() -> DiffusionGemmaForBlockDiffusion:
    # One thread: the eager MoE's index_add_ on tiny tensors spends seconds in OpenMP
    # waits on a busy 2-core machine, and milliseconds without them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


def decoder_attention(model):
    return [m for m in model.modules() if type(m).__name__ == "DiffusionGemmaDecoderTextAttention"]


def encode(model, batch: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 110, (batch, PROMPT), generator=gen)
    canvas = torch.randint(3, 110, (batch, CANVAS), generator=gen)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        model.model.encoder(input_ids=ids, cache=cache)
    return ids, canvas, cache


def decode(model, canvas, cache):
    with torch.no_grad():
        return model(decoder_input_ids=canvas, cache=cache).logits


def generate(model, ids, **kwargs):
    torch.manual_seed(11)
    return model.generate(input_ids=ids, max_new_tokens=2 * CANVAS, max_denoising_steps=5, **kwargs)


@pytest.fixture(autouse=True)
def _clean(model):
    yield
    set_current_sparsity(None)
    if getattr(model, HANDLE_ATTR, None) is not None:
        hcs.disable_creative_sparse(model)


# ------------------------------------------------------------------ saliency, by hand


def test_saliency_hand_computed():
    q = torch.zeros(1, 2, 2, 2)                      # 2 query heads, 2 canvas tokens, dim 2
    q[0, 0, :, 0] = torch.tensor([1.0, 3.0])         # head 0 mean query (2, 0)
    q[0, 1, :, 1] = torch.tensor([1.0, 1.0])         # head 1 mean query (0, 1)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 4.0], [0.5, 0.5], [-1.0, 0.0]]]])   # one KV head (GQA 2:1)
    shared = saliency_scores(q, k, head_select=False, pool_kernel=1)
    assert shared.tolist() == [[[2.0, 4.0, 1.5, -2.0]]]                 # sum over query heads
    per_head = saliency_scores(q, k, head_select=True, pool_kernel=1)
    assert per_head.tolist() == [[[2.0, 4.0, 1.0, 0.0]]]                # max over the group
    pooled = saliency_scores(q, k, head_select=False, pool_kernel=3)
    assert pooled.tolist() == [[[4.0, 4.0, 4.0, 1.5]]]
    masked = saliency_scores(q, k, head_select=False, pool_kernel=1,
                             attendable=torch.tensor([[True, False, True, True]]))
    assert select_retained(masked, 2).tolist() == [[[0, 2]]]
    # attention mass: q = (1, 0), scale 1, keys with logits 0 and ln 3 -> probabilities 1/4, 3/4;
    # a canvas key with logit 0 takes its share of the softmax: 1/5, 3/5
    qm, km = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
    mass = saliency_scores(qm, km, head_select=False, pool_kernel=1, rule="attention_mass", scaling=1.0)
    torch.testing.assert_close(mass, torch.tensor([[[0.25, 0.75]]]))
    mass = saliency_scores(qm, km, head_select=False, pool_kernel=1, rule="attention_mass", scaling=1.0,
                           canvas_keys=torch.zeros(1, 1, 1, 2))
    torch.testing.assert_close(mass, torch.tensor([[[0.2, 0.6]]]))
    mass = saliency_scores(qm, km, head_select=False, pool_kernel=1, rule="attention_mass", scaling=1.0,
                           attendable=torch.tensor([[False, True]]))
    assert mass[0, 0, 0] == -math.inf and mass[0, 0, 1] == 1.0     # padding takes no probability
    with pytest.raises(ValueError, match="rule"):
        saliency_scores(qm, km, head_select=False, pool_kernel=1, rule="mass")
    kk = torch.arange(8.0).view(1, 1, 4, 2)
    kc, vc = compact_kv(kk, kk + 100, torch.tensor([[[1, 3]]]))
    assert kc.tolist() == [[[[2.0, 3.0], [6.0, 7.0]]]] and vc[0, 0, 0, 0].item() == 102.0
    assert kc.untyped_storage().nbytes() == kc.numel() * kc.element_size()   # its own, smaller storage


def test_config_validation_and_phases():
    for bad in (0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="retention_ratio"):
            RetentionConfig(retention_ratio=bad)
    with pytest.raises(ValueError, match="delay_step"):
        RetentionConfig(delay_step=-1)
    with pytest.raises(ValueError, match="default_block_len"):
        RetentionConfig(delay_step=2, default_block_len=2)
    with pytest.raises(ValueError, match="pool_kernel"):
        RetentionConfig(pool_kernel=0)
    with pytest.raises(TypeError, match="head_select"):
        RetentionConfig(head_select=1)
    with pytest.raises(ValueError, match="offload_to"):
        RetentionConfig(offload_to="not-a-device")
    with pytest.raises(ValueError, match="saliency"):
        RetentionConfig(saliency="mass")
    cfg = RetentionConfig(retention_ratio=0.5, delay_step=1, default_block_len=3)
    assert [cfg.phase(i) for i in range(6)] == ["dense", "select", "sparse"] * 2
    assert [RetentionConfig(delay_step=0).phase(i) for i in range(3)] == ["select", "sparse", "sparse"]
    assert RetentionConfig(retention_ratio=1.0).phase(5) == "dense"
    assert RetentionConfig(enabled=False).phase(5) == "dense"
    assert cfg.retained_count(37) == 18 and cfg.retained_count(1) == 1 and cfg.retained_count(37, 0.3) == 11


# ------------------------------------------------------------------ the model


def test_ratio_one_is_bit_identical_and_disable_restores(model):
    ids, _, _ = encode(model)
    ref = generate(model, ids)
    handle = hcs.enable_creative_sparse(model, retention=1.0)
    out = generate(model, ids)
    assert torch.equal(out.sequences, ref.sequences)
    report = hcs.sparsity_report(model)
    assert all(r["sparse_steps"] == 0 and r["dense_steps"] > 0 for r in report.rows)
    hcs.disable_creative_sparse(model)
    assert not handle.active and getattr(model, HANDLE_ATTR, None) is None
    assert all("forward" not in vars(m) for m in decoder_attention(model))
    assert "generate" not in vars(model)
    assert not model.model.encoder._forward_pre_hooks and not model.model.decoder._forward_pre_hooks
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.3, delay_step=0))
    changed = generate(model, ids)
    hcs.disable_creative_sparse(model)
    assert torch.equal(generate(model, ids).sequences, ref.sequences)   # exact after disable
    assert not torch.equal(changed.sequences, ref.sequences)            # and retention did act


def _reference_layer(module, hidden, pos_emb, cache, cfg: RetentionConfig, retained=None) -> torch.Tensor:
    """The original forward in float64, masked to the tokens a loop-based saliency keeps, or
    to ``retained`` (row -> retained positions [sets, R], one set or one per KV head)."""
    b, nc, _ = hidden.shape
    keys = cache.layers[module.layer_idx].keys                       # (B, Hkv, N, D)
    hkv, n = keys.shape[1], keys.shape[2]
    hq = module.config.num_attention_heads
    shape = (b, nc, -1, module.head_dim)
    cos, sin = pos_emb
    q = apply_rotary_pos_emb(module.q_norm(module.q_proj(hidden).view(shape)), cos, sin, unsqueeze_dim=2)
    own = apply_rotary_pos_emb(module.k_norm(module.k_proj(hidden).view(shape)), cos, sin, unsqueeze_dim=2)
    allow = torch.ones(b, hq, nc, n + nc, dtype=torch.bool)
    count = cfg.retained_count(n)
    for r in range(b):
        if retained is not None:
            sets_of = retained[r]
            for h in range(hq):
                keep = sets_of[0 if sets_of.shape[0] == 1 else h // (hq // hkv)].tolist()
                allow[r, h, :, :n] = False
                allow[r, h, :, keep] = True
            continue
        if cfg.saliency == "mean_query":
            q_mean = q[r].mean(dim=0)                                 # (Hq, D)
            per = [[float(q_mean[h] @ keys[r, h // (hq // hkv), t]) for t in range(n)] for h in range(hq)]
        else:  # the attention each context token gets, summed over the canvas queries
            per = [[0.0] * n for _ in range(hq)]
            for h in range(hq):
                g = h // (hq // hkv)
                for i in range(nc):
                    logits = [float(q[r, i, h] @ keys[r, g, t]) * module.scaling for t in range(n)]
                    logits += [float(q[r, i, h] @ own[r, j, g]) * module.scaling for j in range(nc)]
                    top = max(logits)
                    total = sum(math.exp(x - top) for x in logits)
                    for t in range(n):
                        per[h][t] += math.exp(logits[t] - top) / total
        if cfg.head_select:
            sets = [[max(per[h][t] for h in range(g * hq // hkv, (g + 1) * hq // hkv)) for t in range(n)]
                    for g in range(hkv)]
        else:
            sets = [[sum(per[h][t] for h in range(hq)) for t in range(n)]]
        half = cfg.pool_kernel // 2
        for si, s in enumerate(sets):
            pooled = [max(s[max(0, t - half):t + half + 1]) for t in range(n)]
            keep = sorted(range(n), key=lambda t: -pooled[t])[:count]
            heads = range(hq) if len(sets) == 1 else range(si * hq // hkv, (si + 1) * hq // hkv)
            for h in heads:
                allow[r, h, :, :n] = False
                allow[r, h, :, keep] = True
    out, _ = type(module).forward(module, hidden, pos_emb, allow, cache=cache)
    return out


@pytest.mark.parametrize("saliency", ["attention_mass", "mean_query"])
@pytest.mark.parametrize("head_select", [False, True])
def test_retained_steps_equal_masked_reference(model, head_select, saliency):
    cfg = RetentionConfig(retention_ratio=0.4, delay_step=0, head_select=head_select, pool_kernel=3,
                          saliency=saliency)
    _, canvas, cache = encode(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, seen=seen: seen.__setitem__(mod.layer_idx,
                                     (kwargs["hidden_states"], kwargs["position_embeddings"], out[0])),
                                     with_kwargs=True) for m in decoder_attention(model)]
    try:
        hcs.enable_creative_sparse(model, retention=cfg)
        decode(model, canvas, cache)
        runtime = getattr(model, HANDLE_ATTR).runtime
        for module in decoder_attention(model):
            hidden, pos_emb, out = seen[module.layer_idx]
            n = cache.layers[module.layer_idx].keys.shape[2]
            assert runtime.stores[module.layer_idx][0][0].shape[-2] == cfg.retained_count(n)
            with torch.no_grad():
                ref = _reference_layer(module, hidden, pos_emb, cache, cfg)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            dense, _ = type(module).forward(module, hidden, pos_emb, None, cache=cache)
            assert (out - dense).abs().max() > 1e-6            # retention changed the layer
    finally:
        for h in hooks:
            h.remove()


def test_retained_kv_is_reused_in_place_over_a_canvas(model):
    """After the selection step, later denoising steps of the canvas attend the same retained
    tokens through one workspace per layer (the canvas's keys written into it in place, no
    concatenation per step): every step equals the float64 reference masked to the tokens
    retained at the selection, the workspace is reused, and the store holds no second copy."""
    cfg = RetentionConfig(retention_ratio=0.4, delay_step=0, head_select=True, pool_kernel=1)
    _, canvas, cache = encode(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, seen=seen: seen.__setitem__(mod.layer_idx,
                                     (kwargs["hidden_states"], kwargs["position_embeddings"], out[0])),
                                     with_kwargs=True) for m in decoder_attention(model)]
    gen = torch.Generator().manual_seed(5)
    try:
        hcs.enable_creative_sparse(model, retention=cfg)
        runtime = getattr(model, HANDLE_ATTR).runtime
        buffers = None
        for step in range(3):
            decode(model, canvas if step == 0 else torch.randint(3, 110, canvas.shape, generator=gen), cache)
            now = {idx: ws[3].data_ptr() for idx, ws in runtime.workspaces.items()}
            assert len(now) == len(decoder_attention(model)) and (step == 0 or now == buffers)
            buffers = now
            for module in decoder_attention(model):
                idx = module.layer_idx
                hidden, pos_emb, out = seen[idx]
                with torch.no_grad():
                    ref = _reference_layer(module, hidden, pos_emb, cache, cfg, retained=runtime.indices[idx])
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
                held = runtime.workspaces[idx][3].untyped_storage().data_ptr()
                assert all(k.untyped_storage().data_ptr() == held for k, _ in runtime.stores[idx].values())
        assert all(s.selections == 1 for s in runtime.stats.values())
    finally:
        for h in hooks:
            h.remove()


def test_delay_step_and_block_len_semantics(model):
    _, canvas, cache = encode(model, batch=1)
    dense = [decode(model, canvas, cache) for _ in range(6)]
    assert all(torch.equal(d, dense[0]) for d in dense)
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.3, delay_step=2))
    runtime = getattr(model, HANDLE_ATTR).runtime
    outs, stores = [], []
    for _ in range(6):
        outs.append(decode(model, canvas, cache))
        stores.append(runtime.stores.get(1, {}).get(0))
    assert [torch.equal(o, dense[0]) for o in outs] == [True, True, False, False, False, False]
    assert stores[1] is None and stores[2] is not None
    assert all(s[0] is stores[2][0] for s in stores[3:])       # chosen once, reused until the canvas ends
    rows = hcs.sparsity_report(model).rows
    assert all(r["dense_steps"] == 2 and r["sparse_steps"] == 4 and r["selections"] == 1 for r in rows)
    hcs.disable_creative_sparse(model)

    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.3, delay_step=1,
                                                                default_block_len=3))
    outs = [decode(model, canvas, cache) for _ in range(6)]
    assert [torch.equal(o, dense[0]) for o in outs] == [True, False, False, True, False, False]
    assert all(r["selections"] == 2 for r in hcs.sparsity_report(model).rows)
    hcs.disable_creative_sparse(model)

    # a new canvas (the encoder appends) restarts the count: dense again for delay_step steps
    ids, _, _ = encode(model, batch=1)
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.3, delay_step=1))
    out = generate(model, ids)
    rows = hcs.sparsity_report(model).rows
    assert all(r["selections"] == 2 and r["dense_steps"] == 2 and r["sparse_steps"] == 8 for r in rows)
    assert out.sequences.shape[1] == PROMPT + 2 * CANVAS


def test_per_prompt_configs_equal_rows_alone(model):
    configs = [RetentionConfig(retention_ratio=0.5, delay_step=0), RetentionConfig(enabled=False),
               RetentionConfig(retention_ratio=0.3, delay_step=1, head_select=True, pool_kernel=1)]
    _, canvas, cache = encode(model, batch=3)
    unpatched = [decode(model, canvas, cache) for _ in range(3)]
    hcs.enable_creative_sparse(model, retention=configs)
    batched = [decode(model, canvas, cache) for _ in range(3)]
    hcs.disable_creative_sparse(model)
    for step in range(3):
        assert torch.equal(batched[step][1], unpatched[step][1])    # the disabled row: exact
    for row, cfg in enumerate(configs):
        alone_cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        for i, layer in enumerate(cache.layers):
            alone_cache.layers[i].lazy_initialization(layer.keys[row:row + 1], layer.values[row:row + 1])
            alone_cache.layers[i].update(layer.keys[row:row + 1], layer.values[row:row + 1])
        hcs.enable_creative_sparse(model, retention=cfg)
        alone = [decode(model, canvas[row:row + 1], alone_cache) for _ in range(3)]
        hcs.disable_creative_sparse(model)
        for step in range(3):
            torch.testing.assert_close(batched[step][row:row + 1], alone[step], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(batched[2][2], unpatched[2][2])


def test_cache_memory_falls_by_retained_share_and_offload_is_lossless(model):
    ids, canvas, cache = encode(model, batch=2)
    cfg = RetentionConfig(retention_ratio=0.5, delay_step=0)
    hcs.enable_creative_sparse(model, retention=cfg)
    decode(model, canvas, cache)
    runtime = getattr(model, HANDLE_ATTR).runtime
    for idx, rows in runtime.stores.items():
        full = cache.layers[idx].keys
        kept = sum(k.numel() + v.numel() for k, v in rows.values())
        assert kept / (2 * full.numel()) == cfg.retained_count(full.shape[2]) / full.shape[2]
    report = hcs.sparsity_report(model)
    for r in report.rows:
        layer = cache.layers[int(r["layer"].split(".")[3])]
        full_bytes = 2 * layer.keys.numel() * layer.keys.element_size()
        assert math.isclose(r["memory_saved_mb"] * 2**20, full_bytes * (1 - r["retained_tokens"] / r["context_tokens"]))
    assert "saved MB" in str(report)
    hcs.disable_creative_sparse(model)

    plain = generate(model, ids)
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.5, delay_step=1))
    kept_in_place = generate(model, ids)
    hcs.disable_creative_sparse(model)
    assert not torch.equal(plain.sequences, kept_in_place.sequences)
    # offload_to the device the cache is already on: nothing to move, same result
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.5, delay_step=1, offload_to="cpu"))
    same = generate(model, ids)
    assert torch.equal(same.sequences, kept_in_place.sequences)
    assert all(r["offloaded_mb"] == 0 for r in hcs.sparsity_report(model).rows)


@pytest.mark.cuda
def test_offload_moves_the_full_context_off_the_gpu_and_back():
    import copy

    model = tiny_model(torch.float32).cuda()
    _, canvas, cache = encode(model.cpu(), batch=2)   # the same context, built on the CPU, then moved
    model.cuda()
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.cuda(), layer.values.cuda()
    canvas = canvas.cuda()
    nxt = torch.randint(3, 110, (2, CANVAS), device="cuda")
    runs = {}
    for name, cfg in (("in place", RetentionConfig(retention_ratio=0.5, delay_step=1)),
                      ("offload", RetentionConfig(retention_ratio=0.5, delay_step=1, offload_to="cpu"))):
        c = copy.deepcopy(cache)
        hcs.enable_creative_sparse(model, retention=cfg)
        runtime = getattr(model, HANDLE_ATTR).runtime
        logits, where = [], []
        for _ in range(4):
            logits.append(decode(model, canvas, c))
            where.append((len(runtime.offloaded), c.layers[1].keys.device.type))
        with torch.no_grad():  # the canvas is accepted: the encoder appends it to the full cache
            model.model.encoder(input_ids=nxt, cache=c,
                                position_ids=torch.arange(PROMPT, PROMPT + CANVAS, device="cuda").unsqueeze(0))
        where.append((len(runtime.offloaded), c.layers[1].keys.device.type))
        report = hcs.sparsity_report(model).rows
        hcs.disable_creative_sparse(model)
        runs[name] = (logits, where, c, report)
    assert runs["in place"][1] == [(0, "cuda")] * 5
    assert runs["offload"][1] == [(0, "cuda"), (2, "cpu"), (2, "cpu"), (2, "cpu"), (0, "cuda")]
    for a, b in zip(runs["in place"][0], runs["offload"][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(runs["in place"][2].layers, runs["offload"][2].layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
    assert all(r["offloaded_mb"] > 0 for r in runs["offload"][3])


def test_bad_input_leaves_the_model_unchanged(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    def untouched():
        return getattr(model, HANDLE_ATTR, None) is None and all("forward" not in vars(m)
                                                                  for m in decoder_attention(model))

    for bad, err, match in ((0.0, ValueError, "retention_ratio"), (1.2, ValueError, "retention_ratio"),
                            ({"delay_step": -1}, ValueError, "delay_step"), ("half", TypeError, "retention"),
                            ([], ValueError, "retention"), ({"ratio": 0.5}, ValueError, "unknown fields"),
                            ([0.5, "x"], TypeError, r"retention\[1\]")):
        with pytest.raises(err, match=match):
            hcs.enable_creative_sparse(model, retention=bad)
        assert untouched()
    with pytest.raises(ValueError, match="retention= runs alone: schedule"):
        hcs.enable_creative_sparse(model, retention=0.5, schedule=hcs.TwoStageSchedule())
    assert untouched()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="retention= supports DiffusionGemma.*GPT2LMHeadModel"):
        hcs.enable_creative_sparse(gpt2, retention=0.5)
    assert getattr(gpt2, HANDLE_ATTR, None) is None
    ids, canvas, cache = encode(model, batch=2)
    hcs.enable_creative_sparse(model, retention=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="retention has 3 configs but the batch has 2 rows"):
        decode(model, canvas, cache)


def test_left_padding_is_never_retained(model):
    ids, _, _ = encode(model, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.5, delay_step=0, pool_kernel=3))
    runtime = getattr(model, HANDLE_ATTR).runtime
    torch.manual_seed(0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=CANVAS, max_denoising_steps=2)
    for idx, rows in runtime.indices.items():
        assert rows[0].min() >= 5                                   # row 0 is padded on its first 5 tokens
        assert rows[0].shape[-1] == RetentionConfig().retained_count(PROMPT - 5)
        assert rows[1].shape[-1] == RetentionConfig().retained_count(PROMPT)
    assert all(r["context_tokens"] == PROMPT - 2.5 for r in hcs.sparsity_report(model).rows)


def test_pipeline_component_is_found(model):
    class Pipe:  # what diffusers pipelines expose: .components
        components = {"model": model, "scheduler": None}

    pipe = Pipe()
    handle = hcs.enable_creative_sparse(pipe, retention=0.5)
    assert getattr(pipe, HANDLE_ATTR) is handle and getattr(model, HANDLE_ATTR) is handle
    hcs.disable_creative_sparse(pipe)
    assert getattr(model, HANDLE_ATTR, None) is None


# ------------------------------------------------------------------ the dial


def test_dial_drives_temperature_nucleus_and_retention(model):
    steps = 4
    # explicit constants: the test must not follow the package defaults
    ctl = SparsityController(SparsityConfig(temperature_base=1.0, temperature_gain=0.5, nucleus_base=0.9,
                                            nucleus_gain=0.12, min_p=0.0))
    two = hcs.TwoStageSchedule(0.7, 0.3, switch=0.5)
    proc = hcs.DiffusionDialProcessor(steps, schedule=two, controller=ctl)
    scores = torch.tensor([[[2.0, 1.0, 0.0, -1.0, -3.0]]])
    out = proc(torch.zeros(1, 1, dtype=torch.long), scores.clone(), cur_step=torch.tensor(4))
    t, p = ctl.temperature(0.7), ctl.top_p(0.7)
    probs = torch.softmax(scores / t, -1)[0, 0].tolist()
    expect_keep = [sum(probs[:i]) < p for i in range(5)]
    assert [math.isfinite(x) for x in out[0, 0].tolist()] == expect_keep
    kept = [i for i in range(5) if expect_keep[i]]
    torch.testing.assert_close(out[0, 0, kept], scores[0, 0, kept] / t)
    proc(torch.zeros(1, 1, dtype=torch.long), scores.clone(), cur_step=2)
    assert [h["s"] for h in proc.history] == [0.7, 0.3]
    with pytest.raises(ValueError, match="cur_step"):
        proc(torch.zeros(1, 1, dtype=torch.long), scores, cur_step=9)

    ids, _, _ = encode(model, batch=1)
    proc = hcs.DiffusionDialProcessor(5, schedule=two, controller=ctl)
    set_current_sparsity(None)
    with proc:  # restores the dial on exit (generate alone leaves the last published s)
        generate(model, ids, logits_processor=LogitsProcessorList([proc]),
                 **{k: v for k, v in proc.generate_kwargs().items() if k != "max_denoising_steps"})
        assert hcs_current_sparsity() == 0.7     # step 0 of a next canvas
    assert hcs_current_sparsity() is None
    assert [h["step"] for h in proc.history] == list(range(5)) * 2
    assert [h["s"] for h in proc.history[:5]] == [0.7, 0.7, 0.7, 0.3, 0.3]

    # retention follows the published dial: ratio * k_attn(s)
    _, canvas, cache = encode(model, batch=1)
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.8, delay_step=0))
    set_current_sparsity(0.7)
    decode(model, canvas, cache)
    rows = hcs.sparsity_report(model).rows
    n = cache.layers[1].keys.shape[2]
    budget = SparsityController().attention_budget(0.7)   # retention reads the default controller's k_attn
    assert budget < 1.0
    assert rows[1]["retained_tokens"] == RetentionConfig().retained_count(n, 0.8 * budget)
    assert rows[1]["retained_tokens"] < RetentionConfig().retained_count(n, 0.8)
    hcs.disable_creative_sparse(model)

    # generate on a model with retention: a dial its processor published ends with the call
    hcs.enable_creative_sparse(model, retention=RetentionConfig(retention_ratio=0.8, delay_step=1))
    set_current_sparsity(None)
    generate(model, ids, logits_processor=LogitsProcessorList([hcs.DiffusionDialProcessor(5)]), t_min=None, t_max=None)
    assert hcs_current_sparsity() is None
