"""The compiled CPU kernel (csrc/cpu) against the reference backend and float64 dense
attention restricted to the kept blocks, on fresh random inputs at odd sizes.

The first test to touch the extension compiles it (about a minute on 2 cores, cached
afterwards in the torch extensions dir)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops._ext import load_extension
from hf_creative_sparse.ops.attention import block_sparse_attention
from hf_creative_sparse.ops.dispatch import choose_backend, get_backend
from hf_creative_sparse.ops.inputs import attention_inputs, per_head
from hf_creative_sparse.ops.masks import block_mask_to_lut, check_block_mask
from reference_impl import element_mask, masked_attention_f64, pv_skip_attention_f64, rel_max_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ext():
    status = load_extension("cpu")
    assert status.module is not None, f"the cpu extension must build in CI: {status.error}"
    return status.module


def _random_case(b, hq, hkv, nq, nk, d, *, causal=False, padding=None, dtype=torch.float32, kept=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, nk, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    kpm = None
    if padding is not None:
        lengths = torch.tensor(padding)
        kpm = torch.arange(nk)[None, :] < lengths[:, None]
        kpm[-1] &= torch.rand(nk, generator=g) > 0.2  # holes too, not only a padded tail
    inp = attention_inputs(q, k, v, is_causal=causal, key_padding_mask=kpm)
    raw = torch.rand(b, hq, inp.num_q_blocks, inp.num_k_blocks, generator=g) < kept
    return inp, check_block_mask(raw, inp)


def _both(inp, mask, pvthreshd=math.inf):
    pv = per_head("pvthreshd", pvthreshd, inp.heads_q, inp.device)
    return get_backend("cpu").run(inp, mask, pv), get_backend("reference").run(inp, mask, pv)


CASES = [  # b, hq, hkv, nq, nk, d, causal, padding
    (1, 2, 2, 1, 1, 64, False, None),
    (2, 2, 2, 77, 77, 8, True, None),
    (1, 4, 2, 300, 300, 64, False, None),
    (2, 4, 2, 300, 1000, 80, False, [1000, 613]),
    (2, 4, 1, 1000, 1000, 128, True, [1000, 555]),
    (1, 3, 1, 130, 257, 256, False, None),
    (2, 2, 1, 200, 200, 256, True, [0, 150]),
    (1, 2, 2, 129, 129, 5, True, None),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,padding", CASES)
def test_matches_reference_and_f64_dense(ext, b, hq, hkv, nq, nk, d, causal, padding):
    inp, mask = _random_case(b, hq, hkv, nq, nk, d, causal=causal, padding=padding, seed=nq + d)
    got, ref = _both(inp, mask)
    assert got.out.shape == ref.out.shape and got.out.dtype == torch.float32
    assert (got.pv_skipped, got.pv_visited) == (ref.pv_skipped, ref.pv_visited)
    assert (got.out - ref.out).abs().max().item() < 1e-5
    dense = masked_attention_f64(inp.q, inp.k, inp.v, element_mask(mask, nq, nk, is_causal=causal,
                                                                   key_padding_mask=inp.key_padding_mask))
    assert rel_max_err(got.out, dense) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pvthreshd", [0.5, 3.0])
def test_pv_threshold_counts_and_output_match(ext, causal, pvthreshd):
    inp, mask = _random_case(1, 2, 1, 300, 300, 64, causal=causal, padding=[260], kept=0.7, seed=7)
    got, ref = _both(inp, mask, pvthreshd)
    assert got.pv_skipped > 0 and (got.pv_skipped, got.pv_visited) == (ref.pv_skipped, ref.pv_visited)
    assert (got.out - ref.out).abs().max().item() < 1e-5
    loop, skipped, visited = pv_skip_attention_f64(inp.q, inp.k, inp.v, mask, pvthreshd, is_causal=causal,
                                                   key_padding_mask=inp.key_padding_mask)
    assert (got.pv_skipped, got.pv_visited) == (skipped, visited)
    assert rel_max_err(got.out, loop) < 1e-5


def _used_keys_f64(inp, mask, pvthreshd: float) -> torch.Tensor:
    """bool [B, Hq, Nq, Nk]: the keys each row's softmax used. Written row-vectorised
    (all rows of a query block at once, blocks in ascending order), unlike the per-row
    loop of reference_impl.pv_skip_attention_f64: a block is used by a row unless its max
    falls more than pvthreshd below the row's running max."""
    q, k = inp.q.double(), inp.k.double()
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    allowed = element_mask(mask, nq, nk, is_causal=inp.is_causal, key_padding_mask=inp.key_padding_mask)
    allowed = allowed.expand(b, hq, nq, nk)
    k = k.repeat_interleave(hq // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * inp.scale
    used = torch.zeros_like(allowed)
    running = torch.full((b, hq, nq), -math.inf, dtype=torch.float64)
    for j in range(0, nk, 64):
        cols = slice(j, min(j + 64, nk))
        here = allowed[..., cols]
        block_max = s[..., cols].masked_fill(~here, -math.inf).amax(-1)
        visited = here.any(-1)
        skip = visited & torch.isfinite(running) & (block_max - running < -pvthreshd)
        take = visited & ~skip
        used[..., cols] = here & take[..., None]
        running = torch.where(take, torch.maximum(running, block_max), running)
    return used


def _lse_f64(inp, used: torch.Tensor) -> torch.Tensor:
    """float64 [B, Hq, Nq]: log sum over the used keys of exp(scale q.k); -inf without any."""
    k = inp.k.double().repeat_interleave(inp.heads_q // inp.k.shape[1], 1)
    s = (inp.q.double() @ k.transpose(-1, -2)) * inp.scale
    return torch.logsumexp(s.masked_fill(~used, -math.inf), dim=-1)


def _assert_lse_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), empty), "rows with no used key must be exactly -inf"
    assert torch.isfinite(got[~empty]).all()
    err = (got.double()[~empty] - ref[~empty]).abs()
    assert err.numel() == 0 or err.max().item() < 2e-5 * (1 + ref[~empty].abs().max().item())


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,padding", CASES)
def test_lse_matches_f64_logsumexp(ext, b, hq, hkv, nq, nk, d, causal, padding):
    """The third output: natural log-sum-exp over the used keys (docs/DESIGN.md "Partial
    softmax"), at odd sizes, GQA, causal, padding (a fully padded batch row: -inf)."""
    inp, mask = _random_case(b, hq, hkv, nq, nk, d, causal=causal, padding=padding, seed=nq + d + 1)
    mask = mask.clone()
    mask[0, 0, -1] = False  # a query block that keeps nothing: its rows are -inf
    got, ref = _both(inp, mask)
    used = _used_keys_f64(inp, mask, math.inf)
    _assert_lse_close(got.lse, _lse_f64(inp, used))
    assert torch.isneginf(got.lse[0, 0, (inp.num_q_blocks - 1) * 128:]).all()
    if ref.lse is not None:
        _assert_lse_close(got.lse, ref.lse.double())


@pytest.mark.parametrize("causal", [False, True])
def test_lse_leaves_out_pv_skipped_blocks(ext, causal):
    """pv-skipped blocks are not used: their keys are not in the lse (the scale is large so
    that blocks do get skipped, and the lse then differs from the one over all kept keys)."""
    inp, mask = _random_case(2, 4, 2, 400, 400, 32, causal=causal, padding=[400, 333], kept=0.8, seed=21)
    inp = attention_inputs(inp.q, inp.k, inp.v, is_causal=causal, key_padding_mask=inp.key_padding_mask, scale=0.6)
    got, _ = _both(inp, mask, 2.0)
    assert got.pv_skipped > 0
    used = _used_keys_f64(inp, mask, 2.0)
    ref = _lse_f64(inp, used)
    _assert_lse_close(got.lse, ref)
    kept_all = _lse_f64(inp, _used_keys_f64(inp, mask, math.inf))
    some = torch.isfinite(kept_all)
    assert (kept_all - got.lse.double())[some].abs().max().item() > 1e-4  # the skip is visible in the lse


def test_lse_every_isa_and_forward_out(ext):
    """forward_out writes a given (poisoned) lse in every instance; bfloat16 inputs too."""
    for dtype in (torch.float32, torch.bfloat16):
        inp, mask = _random_case(2, 4, 1, 333, 333, 20, causal=True, padding=[333, 100], dtype=dtype, seed=9)
        pv = per_head("pvthreshd", 1.0, 4, inp.device)
        inp64 = attention_inputs(inp.q.float(), inp.k.float(), inp.v.float(), is_causal=True,
                                 key_padding_mask=inp.key_padding_mask)
        ref = _lse_f64(inp64, _used_keys_f64(inp64, mask, 1.0))
        counts, indices = block_mask_to_lut(mask)
        for isa in ext.available_isas():
            out = torch.full_like(inp.q, float("nan"))
            lse = torch.full(inp.q.shape[:3], float("nan"))
            ext.forward_out(inp.q, inp.k, inp.v, counts, indices, inp.key_padding_mask, True, inp.scale, pv, out,
                            isa, lse)
            _assert_lse_close(lse, ref)
        with pytest.raises(RuntimeError, match="lse must be a contiguous CPU float32"):
            ext.forward_out(inp.q, inp.k, inp.v, counts, indices, None, True, inp.scale, pv,
                            torch.empty_like(inp.q), "", torch.empty(inp.q.shape[:3], dtype=torch.float64))


def test_lse_through_the_registered_op(ext):
    """The torch.library op (used under torch.compile) returns the same three outputs."""
    from hf_creative_sparse.ops.custom_ops import block_sparse_fwd

    inp, mask = _random_case(1, 2, 2, 300, 300, 64, causal=True, seed=13)
    counts, indices = block_mask_to_lut(mask)
    pv = torch.full((2,), math.inf)
    out, pv_counts, lse = block_sparse_fwd(inp.q, inp.k, inp.v, counts, indices, None, True, inp.scale, pv)
    direct = ext.forward(inp.q, inp.k, inp.v, counts, indices, None, True, inp.scale, pv)
    assert torch.equal(out, direct[0]) and torch.equal(pv_counts, direct[1])
    assert torch.equal(lse, direct[2])
    _assert_lse_close(lse, _lse_f64(inp, _used_keys_f64(inp, mask, math.inf)))
    # schema, fake (meta) implementation and AOT dispatch agree with the three outputs
    checks = torch.library.opcheck(block_sparse_fwd, (inp.q, inp.k, inp.v, counts, indices, None, True, inp.scale, pv))
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_per_head_thresholds(ext):
    inp, mask = _random_case(1, 4, 2, 256, 512, 64, kept=0.8, seed=3)
    got, ref = _both(inp, mask, torch.tensor([math.inf, 0.0, 1.0, 4.0]))
    assert (got.pv_skipped, got.pv_visited) == (ref.pv_skipped, ref.pv_visited)
    assert (got.out - ref.out).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_half_precision(ext, dtype, tol):
    inp, mask = _random_case(2, 4, 2, 300, 300, 64, causal=True, padding=[300, 200], dtype=dtype, seed=11)
    got, ref = _both(inp, mask)
    assert got.out.dtype == dtype
    # same float32 math: the two differ by at most output rounding
    assert rel_max_err(got.out.float(), ref.out.float()) < tol / 2
    dense = masked_attention_f64(inp.q, inp.k, inp.v, element_mask(mask, 300, 300, is_causal=True,
                                                                   key_padding_mask=inp.key_padding_mask))
    assert rel_max_err(got.out, dense) < tol


@pytest.mark.parametrize("d", [80, 20])
def test_every_isa_instance_matches(ext, d):
    """The AVX-512, AVX2 and baseline instances this CPU can run agree with the reference
    (d=20 is not a multiple of the AVX2/AVX-512 vector widths: the padded-V path)."""
    inp, mask = _random_case(2, 4, 2, 333, 333, d, causal=True, padding=[333, 100], seed=5)
    pv = per_head("pvthreshd", 2.0, 4, inp.device)
    ref = get_backend("reference").run(inp, mask, pv)
    counts, indices = block_mask_to_lut(mask)
    isas = ext.available_isas()
    assert "generic" in isas
    for isa in isas:
        out = torch.full_like(inp.q, float("nan"))
        pv_counts = ext.forward_out(inp.q, inp.k, inp.v, counts, indices, inp.key_padding_mask, True, inp.scale,
                                    pv, out, isa)
        assert pv_counts.tolist() == [ref.pv_skipped, ref.pv_visited], isa
        assert (out - ref.out).abs().max().item() < 1e-5, isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poison_filled_output_fully_written(ext, dtype):
    """Rows without kept blocks, fully padded batches and query-block tails are all written
    (zeros where no key is usable)."""
    inp, mask = _random_case(2, 2, 2, 300, 300, 64, padding=[300, 0], dtype=dtype, seed=2)
    mask = mask.clone()
    mask[0, 1, 1] = False  # query block 1 of head 1 keeps nothing
    counts, indices = block_mask_to_lut(mask)
    out = torch.full_like(inp.q, float("nan"))
    ext.forward_out(inp.q, inp.k, inp.v, counts, indices, inp.key_padding_mask, False, inp.scale,
                    torch.full((2,), math.inf), out, "")
    assert not out.isnan().any()
    assert (out[1] == 0).all()  # batch 1 is fully padded
    assert (out[0, 1, 128:256] == 0).all()
    ref = get_backend("reference").run(inp, mask, torch.full((2,), math.inf))
    assert rel_max_err(out.float(), ref.out.float()) < 1e-2


def test_random_masks_through_public_op(ext):
    """block_sparse_attention(..., backend="cpu") in both layouts equals the reference."""
    g = torch.Generator().manual_seed(4)
    for layout in ("HND", "NHD"):
        q = torch.randn(2, 1000, 4, 64, generator=g)
        k, v = (torch.randn(2, 1000, 2, 64, generator=g) for _ in range(2))
        if layout == "HND":
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        mask = torch.rand(1, 4, 8, 16, generator=g) < 0.3
        out, stats = block_sparse_attention(q, k, v, mask, layout=layout, is_causal=True, pvthreshd=2.0,
                                            backend="cpu", return_stats=True)
        ref, ref_stats = block_sparse_attention(q, k, v, mask, layout=layout, is_causal=True, pvthreshd=2.0,
                                                backend="reference", return_stats=True)
        assert stats.backend == "cpu" and out.shape == q.shape
        assert stats.pv_skipped_fraction == ref_stats.pv_skipped_fraction
        assert (out - ref).abs().max().item() < 1e-5


def test_auto_prefers_cpu_on_cpu_tensors(ext, monkeypatch):
    """auto dispatches CPU tensors to the compiled kernel, and runs it where this machine's
    rates say the budget pays, dense SDPA where they say it cannot (ops/cpu_policy.py;
    rates given here, so the decision is known)."""
    from hf_creative_sparse.ops import attention, cpu_policy

    inp, _ = _random_case(1, 2, 2, 256, 256, 64)
    assert choose_backend("auto", inp).name == "cpu"
    q = torch.randn(1, 2, 2048, 64)
    for sparse_flops, expected in ((200e9, "cpu"), (20e9, "sdpa")):
        rates = cpu_policy.CpuRates(isa=ext.selected_isa(), dense_flops=50e9, sparse_flops=sparse_flops,
                                    predict_s_per_element=1e-10, overhead_s=1e-5)
        monkeypatch.setattr(cpu_policy, "cpu_rates", lambda refresh=False, r=rates: r)
        monkeypatch.setattr(attention, "_EARLY_FALLBACK", {})  # the decision is memoized per shape
        _, stats = hcs.sparse_attention(q, q, q, topk=0.5, min_seq_len=0, max_kept_fraction=1.0, return_stats=True)
        assert stats.backend == expected, stats.fallback_reason
        assert expected == "cpu" or "cannot pay on the CPU" in stats.fallback_reason


def test_needs_grad_goes_to_reference(ext):
    q = torch.randn(1, 2, 256, 64, requires_grad=True)
    inp = attention_inputs(q, q, q)
    assert "forward-only" in get_backend("cpu").unsupported_reason(inp)
    assert choose_backend("auto", inp).name == "reference"
    with torch.no_grad():
        assert choose_backend("auto", inp).name == "cpu"


def test_refuses_non_cpu_tensors():
    q = torch.empty(1, 2, 256, 64, device="meta")
    reason = get_backend("cpu").unsupported_reason(attention_inputs(q, q, q))
    assert reason is not None and "CPU tensors" in reason and "meta" in reason


def test_extension_rejects_bad_lut(ext):
    inp, mask = _random_case(1, 2, 2, 200, 200, 64)
    counts, indices = block_mask_to_lut(mask)
    pv = torch.full((2,), math.inf)
    args = (inp.q, inp.k, inp.v)
    with pytest.raises(RuntimeError, match="kv_counts must be a CPU int32"):
        ext.forward(*args, counts.long(), indices, None, False, 0.125, pv)
    bad = indices.clone()
    bad[0, 0, 0, :2] = torch.tensor([1, 0], dtype=torch.int32)
    full = torch.full_like(counts, 4)
    with pytest.raises(RuntimeError, match="strictly ascending"):
        ext.forward(*args, full, bad, None, False, 0.125, pv)
    with pytest.raises(RuntimeError, match="pvthreshd must be a CPU float32"):
        ext.forward(*args, counts, indices, None, False, 0.125, pv.double())
    with pytest.raises(RuntimeError, match="must be one of"):
        ext.forward_out(*args, counts, indices, None, False, 0.125, pv, torch.empty_like(inp.q), "sse9")


_FAILED_BUILD = textwrap.dedent("""
    import warnings, torch, hf_creative_sparse as hcs
    from hf_creative_sparse.ops.dispatch import why_not
    q = torch.randn(1, 2, 256, 64)
    mask = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = hcs.block_sparse_attention(q, q, q, mask, return_stats=True)
    assert stats.backend == "reference", stats.backend
    build_warnings = [w for w in caught if "building the cpu extension failed" in str(w.message)]
    assert len(build_warnings) == 1, [str(w.message) for w in caught]
    try:
        hcs.block_sparse_attention(q, q, q, mask, backend="cpu")
    except RuntimeError as exc:
        print("RAISED:", exc)
""")


@pytest.mark.skipif(importlib.util.find_spec("hf_creative_sparse._C_cpu") is not None,
                    reason="an ahead-of-time build (HCS_BUILD_EXT=1) is installed: nothing is compiled")
def test_failed_build_falls_back_and_names_the_cause(tmp_path):
    """No compiler: one warning, auto runs the reference, backend="cpu" raises with the cause."""
    env = dict(os.environ, CXX="hcs-no-such-compiler", TORCH_EXTENSIONS_DIR=str(tmp_path), HCS_DISABLE_EXT="cuda",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _FAILED_BUILD], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED: backend 'cpu' cannot run this call" in proc.stdout
    assert "no C++ compiler found" in proc.stdout and "hcs-no-such-compiler" in proc.stdout


def test_isa_can_be_pinned_by_environment(ext):
    code = ("import torch, hf_creative_sparse as hcs\n"
            "torch.manual_seed(0)\n"
            "q = torch.randn(1, 2, 200, 24)\n"
            "mask = torch.rand(1, 2, 2, 4) < 0.5\n"
            "a = hcs.block_sparse_attention(q, q, q, mask, backend='cpu')\n"
            "b = hcs.block_sparse_attention(q, q, q, mask, backend='reference')\n"
            "print('DIFF', float((a - b).abs().max()))\n"
            "from hf_creative_sparse.ops._ext import load_extension\n"
            "print('SELECTED', load_extension('cpu').module.selected_isa(), 'END')\n"
            "hcs.block_sparse_attention(q, q, q, mask, backend='cpu')\n")
    base = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=dict(base, HCS_CPU_ISA="generic"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # float32 sums in another order: unseeded draws reached 3.4e-5 (q = k = v puts ~24-logit
    # peaks on the diagonal), which made a 1e-5 bound flaky
    assert float(proc.stdout.split("DIFF")[1].split()[0]) < 1e-4
    assert "SELECTED generic END" in proc.stdout  # the instance the policy measures
    proc = subprocess.run([sys.executable, "-c", code], env=dict(base, HCS_CPU_ISA="sse9"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "HCS_CPU_ISA" in proc.stderr and "sse9" in proc.stderr


def test_disabled_extension_reports_the_variable(tmp_path):
    code = ("import torch, hf_creative_sparse as hcs\n"
            "from hf_creative_sparse.ops.dispatch import why_not\n"
            "print(why_not('cpu'))\n")
    env = dict(os.environ, HCS_DISABLE_EXT="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "disabled by HCS_DISABLE_EXT=cpu" in proc.stdout


def _pool_f64(x, block, valid):
    """Per-block mean and |sum of unit vectors|^2 / count^2 of the valid tokens, float64."""
    b, h, n, d = x.shape
    nb = math.ceil(n / block)
    x = x.double()
    valid = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    pooled, sim, count = torch.zeros(b, h, nb, d, dtype=torch.float64), torch.zeros(b, h, nb), torch.zeros(b, 1, nb)
    for bi in range(b):
        for j in range(nb):
            rows = torch.arange(j * block, min(n, (j + 1) * block))
            rows = rows[valid[bi, rows]]
            count[bi, 0, j] = len(rows)
            if len(rows):
                xs = x[bi, :, rows]
                pooled[bi, :, j] = xs.mean(1)
                unit = xs / xs.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                sim[bi, :, j] = (unit.sum(1) ** 2).sum(-1) / len(rows) ** 2
    return pooled, sim, count


@pytest.mark.parametrize("b,h,n,d,block", [(2, 3, 300, 64, 128), (2, 2, 77, 5, 64), (1, 1, 1, 8, 64),
                                           (2, 4, 1000, 80, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_blocks_cpu_matches_pytorch_path_and_f64(ext, monkeypatch, b, h, n, d, block, dtype):
    """The prediction's pooling in one compiled pass (ops/predict_cpu.py) equals masks.pool_blocks'
    PyTorch path and a float64 loop, with and without padding (a fully padded batch row too)."""
    from hf_creative_sparse.ops import predict_cpu
    from hf_creative_sparse.ops.masks import pool_blocks

    g = torch.Generator().manual_seed(n + d)
    x = (torch.randn(b, h, n, d, generator=g) * 3).to(dtype)
    x[0, 0, 0] = 0.0  # a zero token: its unit vector is 0 (norm clamped), as in the PyTorch path
    padded = torch.rand(b, n, generator=g) > 0.3
    padded[-1] = False
    for valid in (None, padded):
        got = predict_cpu.pool_blocks_cpu(x, block, valid)
        monkeypatch.setattr(predict_cpu, "ENABLED", False)
        ref = pool_blocks(x, block, valid)
        assert predict_cpu.pool_blocks_cpu(x, block, valid) is None
        monkeypatch.setattr(predict_cpu, "ENABLED", True)
        f64 = _pool_f64(x.float(), block, valid)
        for a, r, e in zip(got, ref, f64):
            assert a.dtype == torch.float32 and a.shape == r.shape == e.shape
            assert (a - r).abs().max().item() < 1e-5
            assert (a.double() - e).abs().max().item() < 1e-5


def test_pool_blocks_cpu_rejects_bad_input(ext):
    from hf_creative_sparse.ops.predict_cpu import pool_blocks_cpu

    x = torch.randn(1, 2, 100, 16)
    with pytest.raises(RuntimeError, match="token_valid must be a CPU bool tensor"):
        pool_blocks_cpu(x, 64, torch.ones(1, 99, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="block must be > 0"):
        pool_blocks_cpu(x, 0, None)
    with pytest.raises(RuntimeError, match="4-D"):
        torch.ops.hcs_cpu.pool_blocks(x[0], 64, None)
    assert pool_blocks_cpu(x.double(), 64, None) is None  # float64 stays on the PyTorch path
