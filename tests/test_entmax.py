"""alpha-entmax attention: the reference against the ``entmax`` package and a hand-written
sparsemax, gradients by gradcheck, the compiled CPU forward against the reference (odd
sizes, GQA, padding, causal), exact zeros and exact block skipping, bad input, and the
transformers ``creative_sparse_entmax`` implementation."""

from __future__ import annotations

import pytest
import torch

from hf_creative_sparse.ops import entmax as em
from hf_creative_sparse.ops._ext import load_extension
from hf_creative_sparse.ops.entmax import entmax_attention

try:
    import entmax as entmax_pkg
except ImportError:  # the dev extra; the package-free tests still run
    entmax_pkg = None

needs_pkg = pytest.mark.skipif(entmax_pkg is None, reason="the entmax package is not installed")


def _cpu_ready() -> bool:
    return load_extension("cpu").error is None and hasattr(torch.ops.hcs_entmax, "cpu_forward")


needs_cpu_ext = pytest.mark.skipif(not _cpu_ready(), reason="compiled cpu extension unavailable")


def dense_scores(q, k, scale, causal, kpm):
    """float64 scaled scores [B, Hq, Nq, Nk] with -inf where not attendable (GQA expanded)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None].expand(q.shape[0], 1, nq, nk)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    return s.masked_fill(~allowed, float("-inf"))


def package_reference(q, k, v, alpha, causal=False, kpm=None, scale=None):
    """entmax.entmax_bisect over dense float64 scores; rows with no key -> zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = dense_scores(q, k, scale, causal, kpm)
    empty = ~torch.isfinite(s).any(-1, keepdim=True)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    a = a.expand(q.shape[1]).view(1, -1, 1, 1).expand(*s.shape[:-1], 1).contiguous()
    p = entmax_pkg.entmax_bisect(s.masked_fill(empty, 0.0), a, dim=-1, n_iter=80)
    p = p.masked_fill(empty, 0.0)
    group = q.shape[1] // k.shape[1]
    return p @ v.double().repeat_interleave(group, 1), p


def sparsemax(s):
    """Sparsemax by sorting (Martins & Astudillo 2016), float64, last dim."""
    z, _ = torch.sort(s, dim=-1, descending=True)
    finite = torch.isfinite(z)
    zc = torch.where(finite, z, torch.zeros_like(z))
    ks = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype)
    cums = zc.cumsum(-1)
    support = finite & (1 + ks * zc > cums)
    kmax = support.sum(-1, keepdim=True)
    tau = (cums.gather(-1, (kmax - 1).clamp_min(0)) - 1) / kmax.clamp_min(1)
    return (s - tau).clamp_min(0)


# ------------------------------------------------------------------------- reference

@needs_pkg
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_entmax_package(alpha, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 45, 16)
    k, v = torch.randn(2, 2, 45, 16), torch.randn(2, 2, 45, 16)
    kpm = torch.rand(2, 45) > 0.2
    out = entmax_attention(q, k, v, alpha, is_causal=causal, key_padding_mask=kpm, backend="reference")
    ref, _ = package_reference(q, k, v, alpha, causal, kpm)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@needs_pkg
def test_reference_per_head_alpha_scale_and_nhd():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 3, 50, 8) for _ in range(3))
    alpha = torch.tensor([1.1, 1.5, 2.0])
    out = entmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alpha, layout="NHD",
                           scale=0.7, backend="reference")
    ref, _ = package_reference(q, k, v, alpha, scale=0.7)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-4)
    other = entmax_attention(q, k, v, alpha, scale=0.3, backend="reference")
    assert (other - out.transpose(1, 2)).abs().max() > 1e-2  # the scale is used


def test_alpha_two_is_sparsemax():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    out = entmax_attention(q, k, v, 2.0, is_causal=True, backend="reference")
    p = sparsemax(dense_scores(q, k, 8 ** -0.5, True, None))
    torch.testing.assert_close(out, p @ v, atol=1e-10, rtol=1e-9)


def test_rows_without_keys_are_zero_not_nan():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 130, 8) for _ in range(3))
    kpm = torch.ones(2, 130, dtype=torch.bool)
    kpm[1] = False  # batch 1: no key at all
    kpm[0, :5] = False  # causal rows 0..4 of batch 0 see no key
    for backend in ["reference"] + (["cpu"] if _cpu_ready() else []):
        out = entmax_attention(q, k, v, 1.5, is_causal=True, key_padding_mask=kpm, backend=backend)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, :, :5] == 0).all()
        assert (out[0, :, 5:].abs().sum(-1) > 0).all()


def test_gradcheck_q_k_v_alpha():
    torch.manual_seed(4)
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.3, 1.8], dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(1, 9, dtype=torch.bool)
    kpm[0, 3] = False

    def fn(q, k, v, alpha):
        return entmax_attention(q, k, v, alpha, is_causal=True, key_padding_mask=kpm, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, alpha), atol=1e-6, rtol=1e-4, fast_mode=True)


@needs_pkg
def test_gradients_match_autograd_through_entmax_package():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 30, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alpha = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    go = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    ours = torch.autograd.grad((entmax_attention(q, k, v, alpha, backend="reference") * go).sum(),
                               (q, k, v, alpha))
    s = q @ k.transpose(-1, -2) * 8 ** -0.5
    theirs = torch.autograd.grad(((entmax_pkg.entmax_bisect(s, alpha, dim=-1, n_iter=80) @ v) * go).sum(),
                                 (q, k, v, alpha))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("alpha, error", [
    (1.0, ValueError), (2.5, ValueError), (float("nan"), ValueError), (0.5, ValueError),
    (torch.tensor([1.5, 1.5, 1.5]), ValueError), (True, TypeError), ("1.5", TypeError),
    (torch.tensor([2, 2]), TypeError),
])
def test_bad_alpha(alpha, error):
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with pytest.raises(error, match="alpha"):
        entmax_attention(q, k, v, alpha, backend="reference")


def test_bad_arguments():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with pytest.raises(ValueError, match="backend"):
        entmax_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="max_iters"):
        entmax_attention(q, k, v, max_iters=0)
    with pytest.raises(TypeError, match="return_stats"):
        entmax_attention(q, k, v, return_stats=1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        entmax_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        entmax_attention(q, torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4))
    with pytest.raises(TypeError, match="inp"):
        em.entmax_attention_inputs(q)


# --------------------------------------------------------------- compiled cpu forward

CASES = [  # (B, Hq, Hkv, Nq, Nk, D, causal, alpha, padding)
    (2, 4, 2, 300, 300, 32, False, 1.5, False),
    (1, 2, 2, 333, 333, 24, True, 1.5, True),
    (2, 2, 1, 140, 271, 16, False, 1.2, True),
    (1, 2, 2, 200, 200, 64, True, 2.0, False),
    (1, 2, 1, 1, 190, 8, False, 1.7, False),
]


@needs_cpu_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_reference(case, dtype):
    b, hq, hkv, nq, nk, d, causal, alpha, padding = case
    torch.manual_seed(6)
    q = torch.randn(b, hq, nq, d).to(dtype)
    k, v = torch.randn(b, hkv, nk, d).to(dtype), torch.randn(b, hkv, nk, d).to(dtype)
    kpm = (torch.rand(b, nk) > 0.25) if padding else None
    ref, sr = entmax_attention(q, k, v, alpha, is_causal=causal, key_padding_mask=kpm, backend="reference",
                               return_stats=True)
    out, sc = entmax_attention(q, k, v, alpha, is_causal=causal, key_padding_mask=kpm, backend="cpu",
                               return_stats=True)
    assert out.dtype == dtype and sc.backend == "cpu"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert sc.total_blocks == sr.total_blocks
    assert abs(sc.zero_fraction - sr.zero_fraction) < 1e-3
    assert 1 <= sc.tau_iterations <= em.NEWTON_MAX_ITERS


def structured(b, h, n, d, span=128, seed=0, dtype=torch.float32):
    """Tokens in contiguous clusters of ``span`` tokens (queries and keys near their
    cluster's centre): entmax leaves most key blocks of a query block empty."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) // span
    centres = 3 * torch.randn(b, h, int(label[-1]) + 1, d, generator=g)
    q = centres[:, :, label] + 0.3 * torch.randn(b, h, n, d, generator=g)
    k = centres[:, :, label] + 0.3 * torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@needs_cpu_ext
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_skips_blocks_exactly(causal):
    q, k, v = structured(1, 2, 1000, 32)  # the last cluster is partial
    ref, sr = entmax_attention(q, k, v, 1.5, is_causal=causal, backend="reference", return_stats=True)
    out, sc = entmax_attention(q, k, v, 1.5, is_causal=causal, backend="cpu", return_stats=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert sr.block_sparsity >= 0.6 and sc.empty_blocks == sr.empty_blocks
    # skipped blocks are never scored, and only empty blocks may be skipped
    assert 0.5 * sr.empty_blocks <= sc.skipped_blocks <= sc.empty_blocks
    assert sr.skipped_blocks == 0


@needs_cpu_ext
def test_cpu_zero_weights_are_exact():
    """v = identity makes the output the weight matrix itself: zero where the reference's
    margin below tau is clear, positive where it is clearly above."""
    torch.manual_seed(7)
    n = 200
    q, k = torch.randn(1, 2, n, n), torch.randn(1, 2, n, n)
    q[:, :, :, :8] *= 30  # a few strong directions: peaked rows, many zero blocks
    k[:, :, :, :8] *= 30
    v = torch.eye(n).expand(1, 2, n, n).contiguous()
    p_cpu = entmax_attention(q, k, v, 1.5, is_causal=True, backend="cpu")
    s = dense_scores(q, k, n ** -0.5, True, None) * 0.5
    x = s.float()
    tau = em.bisect_tau(x, torch.full((2,), 1.5), 50)
    margin = x - tau.unsqueeze(-1)
    assert (p_cpu[margin < -1e-3] == 0).all()
    assert (p_cpu[margin > 1e-3] > 0).all()
    assert (margin < -1e-3).float().mean() > 0.5


@needs_cpu_ext
def test_cpu_max_iters_is_honoured():
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 150, 16) * 2 for _ in range(3))
    exact, s_exact = entmax_attention(q, k, v, 1.1, backend="cpu", return_stats=True)
    rough, s_rough = entmax_attention(q, k, v, 1.1, backend="cpu", return_stats=True, max_iters=1)
    assert s_rough.tau_iterations == 1 < s_exact.tau_iterations
    assert (rough - exact).abs().max() > 1e-4


@needs_cpu_ext
def test_cpu_forward_gradients_use_its_tau():
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 2, 140, 16, requires_grad=True) for _ in range(3))
    alpha = torch.tensor([1.5, 1.3], requires_grad=True)
    go = torch.randn(1, 2, 140, 16)
    grads = []
    for backend in ("cpu", "reference"):
        out = entmax_attention(q, k, v, alpha, is_causal=True, backend=backend)
        grads.append(torch.autograd.grad((out * go).sum(), (q, k, v, alpha)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_auto_prefers_compiled_on_cpu():
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    _, stats = entmax_attention(q, k, v, return_stats=True)
    assert stats.backend == ("cpu" if _cpu_ready() else "reference")


@needs_pkg
def test_entmax_attention_inputs_returns_hnd():
    from hf_creative_sparse.ops.inputs import attention_inputs

    q, k, v = (torch.randn(1, 30, 2, 8) for _ in range(3))
    inp = attention_inputs(q, k, v, layout="NHD")
    out = em.entmax_attention_inputs(inp, 1.5, backend="reference")
    ref, _ = package_reference(inp.q, inp.k, inp.v, 1.5)
    assert out.shape == (1, 2, 30, 8)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------- transformers

def _tiny_llama():
    pytest.importorskip("transformers")
    from hf_creative_sparse.testing import tiny_llama

    return tiny_llama(seed=10, vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=128)


def _package_attention(calls):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        alpha = kwargs.get("entmax_alpha") or getattr(module.config, "entmax_alpha", None) or 1.5
        kpm = attention_mask[:, 0].any(1) if attention_mask is not None else None
        out, _ = package_reference(query, key, value, alpha, causal=True, kpm=kpm, scale=scaling)
        calls.append(alpha)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return fn


@needs_pkg
def test_transformers_entmax_matches_package_attention():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from hf_creative_sparse.patches import transformers_entmax as te

    te.register()
    calls: list = []
    AttentionInterface.register("test_entmax_package", _package_attention(calls))
    AttentionMaskInterface.register("test_entmax_package", sdpa_mask)
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    outs = {}
    for impl in ("creative_sparse_entmax", "test_entmax_package"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = (model(ids, attention_mask=mask).logits,
                          model(ids, attention_mask=mask, entmax_alpha=1.9).logits)
        model.config.entmax_alpha = 1.2
        with torch.no_grad():
            outs[impl] += (model(ids, attention_mask=mask).logits,)
        del model.config.entmax_alpha
    for ours, theirs in zip(outs["creative_sparse_entmax"], outs["test_entmax_package"]):
        torch.testing.assert_close(ours[1, 7:], theirs[1, 7:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
    a, b, c = outs["creative_sparse_entmax"]
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3  # call and config alpha are used
    assert 1.9 in calls and 1.2 in calls  # the package side saw the same alphas


def test_transformers_entmax_decode_with_cache_matches_full_forward():
    from hf_creative_sparse.patches import transformers_entmax as te

    te.register()
    model = _tiny_llama()
    model.set_attn_implementation("creative_sparse_entmax")
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :26], use_cache=True)
        step = model(ids[:, 26:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 26:], atol=1e-4, rtol=1e-4)


def test_transformers_entmax_rejects_dropout_and_odd_masks():
    pytest.importorskip("transformers")
    from hf_creative_sparse.patches import transformers_entmax as te

    m = torch.nn.Module()
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="dropout"):
        te.entmax_attention_forward(m, q, q, q, None, dropout=0.1)
    window = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril() & torch.ones(5, 5, dtype=torch.bool).triu(-1)
    with pytest.raises(ValueError, match="mask"):
        te.entmax_attention_forward(m, q, q, q, window)


@pytest.mark.parametrize("causal, scale", [(False, None), (True, -0.3)])
def test_block_bounds_cover_every_score(causal, scale):
    """U[i, j] >= every attendable scaled score of block pair (i, j); -inf exactly where the
    pair has no attendable key."""
    from hf_creative_sparse.ops.inputs import attention_inputs

    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 4, 300, 16) * 2 for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    kpm = torch.rand(2, 300) > 0.3
    inp = attention_inputs(q, k, v, is_causal=causal, scale=scale, key_padding_mask=kpm)
    bounds = em.block_score_bounds(inp)
    s = dense_scores(q, k, inp.scale, causal, kpm)
    s = torch.nn.functional.pad(s, (0, 5 * 64 - 300, 0, 3 * 128 - 300), value=float("-inf"))
    block_max = s.view(2, 4, 3, 128, 5, 64).amax((3, 5)).float()
    finite = torch.isfinite(block_max)
    assert torch.equal(torch.isfinite(bounds), finite)
    assert (bounds[finite] >= block_max[finite] - 1e-4).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d, causal, scale, dtype", [(64, True, None, torch.bfloat16), (128, False, -0.3, torch.float16),
                                                     (96, False, None, torch.bfloat16)])
def test_triton_bounds_cover_every_score_and_match_the_torch_bounds(monkeypatch, d, causal, scale, dtype):
    """The Triton bounds (CUDA, 16-bit) are >= every attendable score of their block pair,
    -inf exactly where the pair has none, and within the rounding margin of the PyTorch
    path's (odd lengths, GQA, padding, a negative scale)."""
    from hf_creative_sparse.ops import entmax_bounds_triton as eb
    from hf_creative_sparse.ops.inputs import attention_inputs

    if eb.unavailable_reason(attention_inputs(*(torch.zeros(1, 1, 4, 64, device="cuda", dtype=dtype),) * 3)):
        pytest.skip("triton is not installed")
    torch.manual_seed(13)
    n = 700
    q = torch.randn(2, 4, n, d, device="cuda", dtype=dtype) * 2
    k, v = (torch.randn(2, 2, n, d, device="cuda", dtype=dtype) + 0.5 for _ in range(2))
    kpm = torch.rand(2, n, device="cuda") > 0.3
    kpm[1, :200] = False
    inp = attention_inputs(q, k, v, is_causal=causal, scale=scale, key_padding_mask=kpm)
    bounds = em.block_score_bounds(inp)
    monkeypatch.setattr(eb, "unavailable_reason", lambda inp: "forced off by the test")
    torch_bounds = em.block_score_bounds(inp)
    s = dense_scores(q.float(), k.float(), inp.scale, causal, kpm)
    mq, mk = -(-n // 128), -(-n // 64)
    s = torch.nn.functional.pad(s, (0, mk * 64 - n, 0, mq * 128 - n), value=float("-inf"))
    block_max = s.view(2, 4, mq, 128, mk, 64).amax((3, 5))
    finite = torch.isfinite(block_max)
    assert torch.equal(torch.isfinite(bounds), finite)
    assert (bounds[finite] >= block_max[finite] - 1e-3).all()
    # both differ from the exact product by 16-bit rounding, which the margin covers
    allowance = 3 * em.BOUND_MARGIN * abs(inp.scale) * q.float().norm(dim=-1).max() * k.float().norm(dim=-1).max()
    assert (bounds[finite] - torch_bounds[finite]).abs().max() <= allowance


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d, causal, padded", [(64, True, False), (128, False, True), (128, True, True)])
def test_cuda_matches_reference(d, causal, padded):
    torch.manual_seed(12)
    q = torch.randn(2, 4, 700, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 700, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kpm = None
    if padded:
        kpm = torch.rand(2, 700, device="cuda") > 0.25
        kpm[1, :200] = False  # causal rows < 200 of batch 1: no key
    torch.full((q.numel() + 64,), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison the allocator
    out, stats = entmax_attention(q, k, v, torch.tensor([1.5, 1.3, 2.0, 1.5], device="cuda"), is_causal=causal,
                                  key_padding_mask=kpm, backend="cuda", return_stats=True)
    ref = entmax_attention(q.float(), k.float(), v.float(), torch.tensor([1.5, 1.3, 2.0, 1.5]).cuda(),
                           is_causal=causal, key_padding_mask=kpm, backend="reference")
    assert torch.isfinite(out).all() and stats.backend == "cuda"
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
