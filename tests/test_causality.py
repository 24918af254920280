"""Strict causality of sparse prefill (issue 15): with is_causal=True no output row may
depend on any later token. Every later token is perturbed (queries, keys and values from a
cut on) and the rows before the cut must stay bit-identical, in every CPU backend and in a
patched model's logits."""

import pytest
import torch

import hf_creative_sparse as hcs
from hf_creative_sparse.ops.config import SparseAttentionConfig
from hf_creative_sparse.ops.dispatch import available_backends

N = 1400  # several 128-row query blocks, not a multiple of 128
# cuts: the middle of a 128-row block (the leak the issue reported), the last row, and just
# after the first block
CUTS = (1300, 1399, 129)


def cpu_backends():
    ok = available_backends()
    names = ["reference"]
    if "cpu" in ok and ok["cpu"] is None:
        names.append("cpu")
    return names


def perturb_from(x: torch.Tensor, cut: int, seed: int) -> torch.Tensor:
    """x [B, H, N, D] with every row from ``cut`` on replaced by new random values."""
    y = x.clone()
    g = torch.Generator().manual_seed(seed)
    y[:, :, cut:] = torch.randn(y[:, :, cut:].shape, generator=g) * 3.0
    return y


def structured_qkv(b: int, hq: int, hkv: int, n: int, d: int, seed: int):
    """Inputs with local structure (smooth in position), so blocks are self-similar and the
    top-k prediction really selects (white noise would keep every block)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6.0, n)[None, None, :, None]
    freq = torch.randn(1, 1, 1, d, generator=g)

    def make(h):
        return torch.sin(t * freq + torch.randn(b, h, 1, d, generator=g)) + 0.3 * torch.randn(b, h, n, d, generator=g)

    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("gqa", [False, True])
def test_sparse_prefill_rows_never_see_later_tokens(backend, gqa):
    b, hq, hkv, d = 2, 2, (1 if gqa else 2), 16
    q, k, v = structured_qkv(b, hq, hkv, N, d, 0)
    kwargs = dict(is_causal=True, topk=0.25, min_seq_len=0, backend=backend, return_stats=True)
    base, stats = hcs.sparse_attention(q, k, v, **kwargs)
    assert stats.fallback_reason is None and stats.backend == backend and stats.kept_fraction < 0.6
    for i, cut in enumerate(CUTS):
        out, _ = hcs.sparse_attention(perturb_from(q, cut, i), perturb_from(k, cut, i + 10),
                                      perturb_from(v, cut, i + 20), **kwargs)
        assert torch.equal(out[:, :, :cut], base[:, :, :cut]), f"rows before {cut} changed"
        assert not torch.equal(out[:, :, cut:], base[:, :, cut:])  # the perturbation did reach the later rows


@pytest.mark.parametrize("backend", cpu_backends())
def test_sparse_prefill_with_padding_is_causal(backend):
    q, k, v = structured_qkv(2, 2, 2, N, 16, 1)
    pad = torch.ones(2, N, dtype=torch.bool)
    pad[1, :200] = False  # left padding
    kwargs = dict(is_causal=True, topk=0.3, min_seq_len=0, backend=backend, key_padding_mask=pad)
    base = hcs.sparse_attention(q, k, v, **kwargs)
    for i, cut in enumerate((1350,)):
        out = hcs.sparse_attention(perturb_from(q, cut, i), perturb_from(k, cut, i + 1), perturb_from(v, cut, i + 2),
                                   **kwargs)
        assert torch.equal(out[:, :, :cut], base[:, :, :cut])


transformers = pytest.importorskip("transformers")


def make_model(kind: str) -> torch.nn.Module:
    from hf_creative_sparse.testing import tiny_gpt2, tiny_llama

    if kind == "gpt2":
        return tiny_gpt2(n_head=2, n_embd=32, n_positions=N + 8, attn_implementation="creative_sparse")
    return tiny_llama(hidden_size=32, intermediate_size=64, max_position_embeddings=N + 8,
                      attn_implementation="creative_sparse")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patched_model_logits_never_see_later_tokens(kind):
    from hf_creative_sparse.patches import transformers_attention as ta

    model = make_model(kind)
    # simthreshd1=-1: every block counts as self-similar, so top-k alone selects (sparse prefill)
    cfg = SparseAttentionConfig(topk=0.25, simthreshd1=-1.0, min_seq_len=0, backend="auto")
    hcs.enable_creative_sparse(model, cfg)
    try:
        ids = torch.randint(0, 100, (1, N), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            base = model(ids).logits
        states = ta.layer_states(model).values()
        assert all(s.last_stats.fallback_reason is None and s.last_stats.kept_fraction < 0.6 for s in states)
        for i, cut in enumerate((1300, 1399)):
            changed = ids.clone()
            changed[:, cut:] = torch.randint(0, 100, (1, N - cut), generator=torch.Generator().manual_seed(10 + i))
            with torch.no_grad():
                out = model(changed).logits
            assert torch.equal(out[:, :cut], base[:, :cut]), f"logits before token {cut} changed"
    finally:
        hcs.disable_creative_sparse(model)
