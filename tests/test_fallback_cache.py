"""The memoized early dense-fallback decision (`ops.attention.early_fallback`): the
cached answer equals the fresh one, a changed config or shape is never served a stale
entry, the memo is bounded, and `sparse_attention_inputs` reports the same stats as before;
`sparse_attention`'s shared default config gives what an explicit one gives.
The CUDA branch of the policy is checked on meta tensors that report ``is_cuda`` (the
decision reads shapes only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.config import SparseAttentionConfig, SparseStats
from hf_creative_sparse.ops import attention, dense, gpu_policy
from hf_creative_sparse.ops.attention import early_fallback, sparse_attention_inputs
from hf_creative_sparse.ops.dense import dense_attention
from hf_creative_sparse.ops.inputs import attention_inputs


class _ReportsCuda(torch.Tensor):
    """A meta tensor that says it is on CUDA, to drive the GPU policy without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def _gpu_inp(b, h, n, d, causal=False, dtype=torch.bfloat16):
    q = torch.empty(b, h, n, d, device="meta", dtype=dtype).as_subclass(_ReportsCuda)
    return attention_inputs(q, q, q, is_causal=causal)


def _cpu_inp(n, causal=False, b=1, h=2, d=32):
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    return attention_inputs(q, k, v, is_causal=causal)


def early_fallback_reason(*args, **kwargs):
    hit = early_fallback(*args, **kwargs)
    return None if hit is None else hit.reason


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    # the meta tensors that report CUDA have device index -1: no cuDNN op there (and no
    # CUDA runtime to ask on this machine)
    monkeypatch.setitem(dense._CUDNN_OPS, -1, None)
    attention._EARLY_FALLBACK.clear()
    yield
    attention._EARLY_FALLBACK.clear()


CONFIGS = [SparseAttentionConfig(), SparseAttentionConfig(backend="sdpa"), SparseAttentionConfig(min_seq_len=0),
           SparseAttentionConfig(backend="reference"), SparseAttentionConfig(topk=0.3, min_seq_len=4096)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.backend}-{c.min_seq_len}")
@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("predicting", [True, False])
def test_cached_decision_equals_fresh_one(cfg, gpu, predicting):
    shapes = [(8, 12, 1024, 64, True), (1, 24, 4608, 128, False), (1, 24, 32768, 128, False), (1, 2, 256, 32, False)]
    for b, h, n, d, causal in shapes:
        if gpu:
            inp = _gpu_inp(b, h, n, d, causal)
        else:
            q = torch.empty(b, h, n, d, device="meta")
            inp = attention_inputs(q, q, q, is_causal=causal)
        budget = attention._mean_topk(cfg) if cfg.selection == "topk" else None
        fresh = attention._early_fallback_reason(inp, cfg, 1, predicting, budget)
        assert early_fallback_reason(inp, cfg, 1, predicting) == fresh  # miss
        assert early_fallback_reason(inp, cfg, 1, predicting) == fresh  # hit


def test_gpu_decisions_follow_the_cost_model():
    gpt2 = _gpu_inp(8, 12, 1024, 64, causal=True)
    cfg = SparseAttentionConfig()
    # an error target (the default) measures per call site: refused only where no budget pays
    assert early_fallback_reason(gpt2, cfg) == gpu_policy.explicit_budget_reason(
        gpt2, 0.0, 1, gpu_policy.path_seconds(gpt2, False, True, torch_ranking=True))  # causal: torch bound ranking, compensated
    assert "cannot pay" in early_fallback_reason(gpt2, cfg)
    assert early_fallback_reason(gpt2, cfg, predicting=False) is None  # a given mask skips the cost model
    assert early_fallback_reason(_gpu_inp(1, 24, 32768, 128), cfg) is None
    # the mask's uses share the prediction's cost: a different mask_uses is a different entry
    flux, cdf = _gpu_inp(1, 24, 4608, 128), SparseAttentionConfig(cdfthreshd=0.9)
    assert early_fallback_reason(flux, cdf, mask_uses=1) is not None
    assert early_fallback_reason(flux, cdf, mask_uses=100) is None


def test_a_changed_config_is_not_served_a_stale_entry():
    inp = _cpu_inp(256)
    cfg = SparseAttentionConfig(topk=0.25)
    assert early_fallback_reason(inp, cfg) == "short sequence: len_k=256 < min_seq_len=1024"
    cfg.min_seq_len = 128  # mutated in place: the key holds values, not the config's identity
    reason = early_fallback_reason(inp, cfg)  # the machine's measured CPU rates may still say dense
    assert reason is None or reason.startswith("sparsity cannot pay on the CPU")
    cfg.backend = "reference"
    assert sparse_attention_inputs(inp, cfg)[1].predicted_kept_fraction is not None  # it predicted
    cfg.backend = "sdpa"
    assert sparse_attention_inputs(inp, cfg)[1].fallback_reason == "backend='sdpa' requested"
    assert early_fallback_reason(inp, cfg.replace(backend="auto", min_seq_len=512)).startswith("short sequence")


def test_a_changed_shape_is_not_served_a_stale_entry():
    cfg = SparseAttentionConfig()
    assert early_fallback_reason(_cpu_inp(256), cfg) == "short sequence: len_k=256 < min_seq_len=1024"
    assert early_fallback_reason(_cpu_inp(512), cfg) == "short sequence: len_k=512 < min_seq_len=1024"
    assert early_fallback_reason(_cpu_inp(1024), cfg) is None
    gpu = early_fallback_reason(_gpu_inp(1, 2, 1024, 32), cfg)  # same shape, other device type
    assert gpu is not None and "cannot pay" in gpu


def test_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(attention, "EARLY_FALLBACK_CACHE_SIZE", 4)
    cfg = SparseAttentionConfig()
    for n in range(1, 40):
        inp = _cpu_inp(n, h=1, d=8)
        assert early_fallback_reason(inp, cfg) == f"short sequence: len_k={n} < min_seq_len=1024"
        assert len(attention._EARLY_FALLBACK) <= 4


@pytest.mark.parametrize("causal", [False, True])
def test_dense_fallback_stats_and_output(causal):
    inp = _cpu_inp(200, causal=causal)
    cfg = SparseAttentionConfig()
    want = SparseStats(kept_fraction=1.0, backend="sdpa", predicted_kept_fraction=None,
                       fallback_reason="short sequence: len_k=200 < min_seq_len=1024", num_blocks=0, block_mask=None)
    for _ in range(2):  # miss, then hit
        out, stats = sparse_attention_inputs(inp, cfg)
        assert stats == want
        torch.testing.assert_close(out, dense_attention(inp), rtol=0, atol=0)
    a, b = sparse_attention_inputs(inp, cfg)[1], sparse_attention_inputs(inp, cfg)[1]
    assert a is not b  # each call gets its own stats object


@pytest.mark.cuda
def test_gpt2_dense_fallback_on_cuda():
    q, k, v = (torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    inp = attention_inputs(q, k, v, is_causal=True)
    if torch.cuda.get_device_capability() == (9, 0):
        assert early_fallback(inp, SparseAttentionConfig()).cudnn_op is not None  # the direct cuDNN call
    for _ in range(2):
        out, stats = sparse_attention_inputs(inp, SparseAttentionConfig())
        # the default is an error target, judged as a budget with its path's stages (causal:
        # bound ranking, compensated): no budget pays at this size
        want = gpu_policy.explicit_budget_reason(inp, 0.0, 1, gpu_policy.path_seconds(inp, False, True, True))
        assert stats.backend == "sdpa" and want is not None and stats.fallback_reason == want
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


def test_public_default_config_matches_an_explicit_one():
    q, k, v = (torch.randn(1, 2, 1024, 32) for _ in range(3))
    out, stats = hcs.sparse_attention(q, k, v, return_stats=True)  # the shared default config
    want_out, want = hcs.sparse_attention(q, k, v, config=SparseAttentionConfig(), return_stats=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert (stats.backend, stats.fallback_reason, stats.kept_fraction, stats.predicted_kept_fraction) == (
        want.backend, want.fallback_reason, want.kept_fraction, want.predicted_kept_fraction)
    # an override is not served the default: min_seq_len=2048 makes this a short sequence
    short = hcs.sparse_attention(q, k, v, min_seq_len=2048, return_stats=True)[1]
    assert short.fallback_reason == "short sequence: len_k=1024 < min_seq_len=2048"
    assert attention._DEFAULT_CONFIG == SparseAttentionConfig()  # left as it was
