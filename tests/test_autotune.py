"""Goldilocks sweep: power-law fits, Corollary-1 bounds against the formula, the sweep on a
tiny random GPT-2 (JSON + PNG), and the CLI."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from hf_creative_sparse.evaluation.power_laws import (PowerLawFit, argmax_on, corollary1_bounds, fit_power_law,
                                                      fitted_quality)
from hf_creative_sparse.evaluation.sweep import HFGenerator, LevelResult, _analyse, find_optimal_sparsity, load_sweep, load_task
from hf_creative_sparse.evaluation.lexical import words
from hf_creative_sparse.evaluation.quality import QualityFunctional, QualityWeights
from hf_creative_sparse.evaluation.scorers import LMScorer


def hashed_bow(texts):
    """Bag of words hashed into 64 buckets: a fast, deterministic embedder."""
    out = np.zeros((len(texts), 64))
    for i, text in enumerate(texts):
        for w in words(text):
            out[i, zlib.crc32(w.encode()) % 64] += 1.0
    return out


@pytest.fixture(scope="module")
def tiny():
    from hf_creative_sparse.testing import byte_tokenizer, tiny_gpt2

    tok = byte_tokenizer()
    return tiny_gpt2(vocab_size=len(tok), n_positions=256, n_embd=32, n_head=2, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id), tok


# --------------------------------------------------------------------------------- fits


def test_fit_recovers_known_exponents():
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    for a, b in ((0.3, 0.5), (0.05, 2.5), (1.2, -0.3)):
        fit = fit_power_law(s, a * s ** b)
        assert fit.coefficient == pytest.approx(a, rel=1e-10)
        assert fit.exponent == pytest.approx(b, rel=1e-10)
        assert fit.r2 == pytest.approx(1.0) and fit.n_points == 6
    # 3% multiplicative noise: still within a few hundredths
    rng = np.random.default_rng(0)
    s = np.linspace(0.1, 0.9, 9)
    noisy = 0.4 * s ** 1.7 * np.exp(rng.normal(0, 0.03, size=s.shape))
    fit = fit_power_law(s, noisy)
    assert fit.exponent == pytest.approx(1.7, abs=0.08) and fit.coefficient == pytest.approx(0.4, rel=0.1)
    # s = 0 and y <= 0 points are outside the model and are skipped
    fit = fit_power_law([0.0, 0.2, 0.4, 0.6], [0.0, 0.2 ** 2, 0.4 ** 2, -1.0])
    assert fit.n_points == 2 and fit.exponent == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least two points"):
        fit_power_law([0.0, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match="equal length"):
        fit_power_law([0.1, 0.2], [1.0])


def test_bounds_equal_the_formula():
    # N = 1 s^0.5, D = 1 s^1, I = 1 s^2, weights 1, 1, 1: A = 0.5, B = 1, C = 2
    n, d, i = PowerLawFit(1.0, 0.5, 1.0, 5), PowerLawFit(1.0, 1.0, 1.0, 5), PowerLawFit(1.0, 2.0, 1.0, 5)
    b, note = corollary1_bounds(n, d, i, (1.0, 1.0, 1.0))
    assert note == ""
    s_ni = (0.5 / 2.0) ** (1 / 1.5)
    s_di = (1.0 / 2.0) ** (1 / 1.0)
    assert b.s_ni == pytest.approx(s_ni, rel=1e-14) and b.s_di == pytest.approx(0.5, rel=1e-14)
    assert b.s_lo == pytest.approx(max(s_ni, s_di), rel=1e-14)
    assert b.s_hi == pytest.approx(max(2 ** (1 / 1.5) * s_ni, 2 ** (1 / 1.0) * s_di), rel=1e-14)  # = 1.0
    assert b.s_lo <= b.s_star <= b.s_hi
    # s* is the stationary point: 0.5 s^-1.5 + s^-1 = 2, and the maximiser of Q on a fine grid
    assert 0.5 * b.s_star ** -1.5 + b.s_star ** -1 == pytest.approx(2.0, rel=1e-10)
    grid = np.linspace(0.01, 3.0, 300_001)
    q = fitted_quality(grid, {"novelty": n, "diversity": d, "incoherence": i}, (1, 1, 1))
    assert grid[np.argmax(q)] == pytest.approx(b.s_star, abs=2e-5)

    # general coefficients and weights (alpha, beta, gamma) = (0.4, 0.3, 0.3)
    n, d, i = PowerLawFit(0.8, 0.3, 1, 5), PowerLawFit(0.6, 0.2, 1, 5), PowerLawFit(0.9, 1.5, 1, 5)
    b, _ = corollary1_bounds(n, d, i, QualityWeights(0.4, 0.3, 0.3))
    a_, b_, c_ = 0.4 * 0.8 * 0.3, 0.3 * 0.6 * 0.2, 0.3 * 0.9 * 1.5
    assert b.s_ni == pytest.approx((a_ / c_) ** (1 / 1.2), rel=1e-14)
    assert b.s_di == pytest.approx((b_ / c_) ** (1 / 1.3), rel=1e-14)
    assert b.s_hi == pytest.approx(max(2 ** (1 / 1.2) * b.s_ni, 2 ** (1 / 1.3) * b.s_di), rel=1e-14)
    assert a_ * b.s_star ** -1.2 + b_ * b.s_star ** -1.3 == pytest.approx(c_, rel=1e-10)

    # one gain term (beta = 0): the bracket closes on the two-term optimum
    b, _ = corollary1_bounds(n, d, i, (0.4, 0.0, 0.3))
    assert b.s_lo == b.s_hi == b.s_star == pytest.approx((a_ / c_) ** (1 / 1.2), rel=1e-14) and b.s_di is None


def test_bounds_refuse_when_corollary_does_not_apply():
    grow = PowerLawFit(1.0, 1.0, 1, 3)
    assert corollary1_bounds(grow, grow, PowerLawFit(1.0, 0.5, 1, 3))[0] is None          # nu < mu
    assert "incoherence does not grow" in corollary1_bounds(grow, grow, PowerLawFit(1.0, -1.0, 1, 3))[1]
    assert "non-negative gains" in corollary1_bounds(PowerLawFit(1.0, -0.5, 1, 3), grow, PowerLawFit(1, 2, 1, 3))[1]


def test_argmax_on_finds_interior_and_edge_maxima():
    """The grid brackets the global peak (a smaller local one at 0.8 is not taken), scipy's
    bounded search refines it between the grid neighbours; a maximum at an end is that end."""
    def f(x):
        return np.exp(-((x - 0.3137) / 0.05) ** 2) + 0.5 * np.exp(-((x - 0.8) / 0.05) ** 2)

    assert argmax_on(f, 0.0, 1.0) == pytest.approx(0.3137, abs=1e-8)
    assert argmax_on(lambda x: x, 0.2, 0.7) == 0.7
    assert argmax_on(lambda x: -x, 0.2, 0.7) == 0.2
    assert argmax_on(f, 0.5, 0.5) == 0.5


def _levels_from(n, d, i, s_values, weights):
    w = QualityWeights.coerce(weights)
    out = []
    for s in s_values:
        nn, dd, ii = n(s), d(s), i(s)
        out.append(LevelResult(s=s, novelty=nn, diversity=dd, incoherence=ii,
                               quality=w.novelty * nn + w.diversity * dd - w.coherence * ii, quality_std=0.0,
                               distinct={}, self_bleu=float("nan"), control={}, seconds=0.0))
    return out


def test_s_star_is_best_measured_refined_by_the_fit():
    n, d, i = PowerLawFit(1.0, 0.5, 1, 5), PowerLawFit(1.0, 1.0, 1, 5), PowerLawFit(1.0, 2.0, 1, 5)
    w = (0.4, 0.3, 0.6)
    levels = _levels_from(n, d, i, [0.1, 0.3, 0.5, 0.7, 0.9], w)
    res = _analyse(levels, "poetry", QualityWeights.coerce(w), 1.0, 0.0, ["p"], ["r"])
    exact, _ = corollary1_bounds(n, d, i, w)
    assert res.fits["incoherence"].exponent == pytest.approx(2.0)
    assert res.best_measured == 0.5 and 0.3 <= exact.s_star <= 0.7
    assert res.s_star == pytest.approx(exact.s_star, abs=1e-6)
    assert res.bounds.s_star == pytest.approx(exact.s_star, rel=1e-10)
    # the refinement never leaves the measured range: with only 0.7 and 0.9 measured (budget
    # 0.4), the fitted optimum (~0.48) lies below it; its maximiser on [0.7, 0.9] is the edge 0.7
    res = _analyse(levels[3:], "poetry", QualityWeights.coerce(w), 0.4, 0.6, ["p"], ["r"])
    assert res.best_measured == 0.7 and res.s_star == pytest.approx(0.7, abs=1e-6)
    # when the measurement disagrees with the fit (a noisy peak at 0.9), the measurement wins
    noisy = _levels_from(n, d, i, [0.1, 0.3, 0.5, 0.7, 0.9], w)
    noisy[-1].quality = 1.0
    res = _analyse(noisy, "poetry", QualityWeights.coerce(w), 1.0, 0.0, ["p"], ["r"])
    assert res.best_measured == 0.9 and res.s_star == 0.9
    assert res.s_star_fit == pytest.approx(exact.s_star, abs=1e-6) and "outside its neighbours" in res.s_star_note


# -------------------------------------------------------------------------------- sweeps


def fake_generate(prompts, s, num_samples, seed):
    """More distinct words as s grows (diverse, novel) and more 'zz' junk (incoherent)."""
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        for j in range(num_samples):
            k = 1 + int(round(8 * s))
            body = " ".join(f"w{rng.integers(0, 1 + int(40 * s))}" for _ in range(12))
            out.append(f"{p} {body} " + "zz " * k)
    return out


def test_sweep_with_injected_parts_writes_json_and_png(tmp_path):
    import matplotlib.image

    scorer = lambda texts: [0.2 + 0.3 * t.count("zz") for t in texts]  # noqa: E731
    qf = QualityFunctional(embedder=hashed_bow, scorer=scorer, nll_scale=4.0)
    res = find_optimal_sparsity(None, "ad_copy", compute_budget=0.75, levels=[0.1, 0.3, 0.5, 0.7, 0.9],
                                prompts=["sell socks", "sell tea"], num_samples=3, generate_fn=fake_generate,
                                quality=qf, output_dir=tmp_path, progress=False)
    assert res.s_values == [0.3, 0.5, 0.7, 0.9]             # k_attn(0.1) = 0.90 > 0.75
    assert res.s_min == pytest.approx(math.sqrt((1 - math.sqrt(0.75)) / 2)) and len(res.levels[0].outputs) == 6
    assert res.s_max == pytest.approx(math.sqrt((1 + math.sqrt(0.75)) / 2))
    assert res.reference == fake_generate(["sell socks", "sell tea"], 0.0, 1, 0)
    assert res.s_star >= res.s_min and float(res) == res.s_star
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["s_star"] == res.s_star and [lv["s"] for lv in data["levels"]] == res.s_values
    assert set(data["fits"]) == {"novelty", "diversity", "incoherence"}
    again = load_sweep(tmp_path / "sweep.json")                # round trip, then re-plot
    assert again.to_json() == res.to_json()
    assert again.quality_curve == res.quality_curve and again.bounds == res.bounds
    image = matplotlib.image.imread(tmp_path / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 400
    assert image.std() > 0.05                               # not a blank canvas


def test_compute_budget_filters_on_the_compute_a_level_spends(tmp_path):
    """Issue 16: k_attn(s) is not monotonic, so a budget of 0.6 excludes s = 0.9 (k_attn
    0.608) and s = 0.95 (0.703), which the old rule s >= 1 - budget kept; every level
    reports the compute it spends."""
    from hf_creative_sparse.creative.control import SparsityController

    qf = QualityFunctional(embedder=hashed_bow, scorer=lambda t: [0.2 + 0.3 * x.count("zz") for x in t], nll_scale=4.0)
    res = find_optimal_sparsity(None, "ad_copy", compute_budget=0.6, levels=[0.3, 0.5, 0.7, 0.9, 0.95],
                                prompts=["sell socks", "sell tea"], num_samples=2, generate_fn=fake_generate,
                                quality=qf, output_dir=tmp_path, progress=False, plot=False)
    ctl = SparsityController()
    assert res.s_values == [0.5, 0.7]
    assert [lv.attention_compute for lv in res.levels] == [ctl.attention_budget(0.5), ctl.attention_budget(0.7)]
    assert all(lv.attention_compute <= 0.6 for lv in res.levels)
    assert (res.s_min, res.s_max) == pytest.approx(ctl.feasible_dial(0.6))
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [lv["attention_compute"] for lv in data["levels"]] == [lv.attention_compute for lv in res.levels]


def test_sweep_validates_arguments():
    kw = dict(generate_fn=fake_generate, quality=QualityFunctional(embedder=hashed_bow,
                                                                   scorer=lambda t: [1.0] * len(t), nll_scale=2.0),
              progress=False, plot=False)
    with pytest.raises(ValueError, match="compute_budget"):
        find_optimal_sparsity(None, compute_budget=0.0, **kw)
    with pytest.raises(ValueError, match="no level satisfies"):
        find_optimal_sparsity(None, compute_budget=0.1, levels=[0.2, 0.5], **kw)
    with pytest.raises(ValueError, match="no level satisfies"):
        find_optimal_sparsity(None, compute_budget=0.6, levels=[0.95], **kw)  # s >= 0.4, but k_attn = 0.70
    with pytest.raises(ValueError, match="task_type"):
        find_optimal_sparsity(None, "limericks", **kw)
    with pytest.raises(ValueError, match="levels must lie in"):
        find_optimal_sparsity(None, levels=[0.5, 1.5], **kw)
    with pytest.raises(ValueError, match="num_samples"):
        find_optimal_sparsity(None, num_samples=0, **kw)
    kw["generate_fn"] = lambda prompts, s, n, seed: ["only one"]
    with pytest.raises(RuntimeError, match="generate_fn returned 1 outputs"):
        find_optimal_sparsity(None, reference_data=["r"], levels=[0.5], **kw)
    with pytest.raises(TypeError, match="model_or_wrapper"):
        find_optimal_sparsity(object(), levels=[0.5], progress=False)


def test_a_sweep_without_matplotlib_says_which_extra_before_generating(tmp_path, monkeypatch):
    """matplotlib is the optional [plot] extra: a sweep that would plot without it fails at
    once (nothing generated), naming the extra; plot=False runs; plot_sweep says the same."""
    from hf_creative_sparse.evaluation import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    calls = []

    def counting_generate(prompts, s, num_samples, seed):
        calls.append(s)
        return fake_generate(prompts, s, num_samples, seed)

    kw = dict(generate_fn=counting_generate, reference_data=["a reference"], levels=[0.3, 0.6], num_samples=2,
              quality=QualityFunctional(embedder=hashed_bow, scorer=lambda t: [1.0] * len(t), nll_scale=2.0),
              progress=False, output_dir=tmp_path)
    with pytest.raises(ImportError, match=r"pip install hf_creative_sparse\[plot\]"):
        find_optimal_sparsity(None, **kw)
    assert calls == []
    res = find_optimal_sparsity(None, plot=False, **kw)
    assert res.plot_path is None and (tmp_path / "sweep.json").exists() and not (tmp_path / "sweep.png").exists()
    with pytest.raises(ImportError, match=r"hf_creative_sparse\[plot\]"):
        res.save_plot(tmp_path / "sweep.png")


def test_builtin_prompt_sets():
    for task in ("creative_writing", "poetry", "ad_copy", "code"):
        data = load_task(task)
        assert len(data["prompts"]) >= 4 and all(isinstance(p, str) and p for p in data["prompts"])


@pytest.mark.parametrize("use_wrapper", [True, False])
def test_sweep_on_tiny_gpt2(tiny, tmp_path, use_wrapper):
    model, tok = tiny
    before = model.config._attn_implementation
    res = find_optimal_sparsity(model, "poetry", levels=[0.2, 0.5, 0.8], prompts=["Moon", "Rain on stone"],
                                num_samples=2, tokenizer=tok, max_new_tokens=8, use_wrapper=use_wrapper,
                                quality=QualityFunctional(embedder=hashed_bow, scorer=LMScorer(model, tok)),
                                output_dir=tmp_path, progress=False)
    assert model.config._attn_implementation == before        # the wrapper's patch is undone
    assert [len(lv.outputs) for lv in res.levels] == [4, 4, 4]
    assert len(res.reference) == 2
    # the control point recorded per level is M(s)
    from hf_creative_sparse.creative.control import SparsityController

    cp = SparsityController().get_sparsity_params(0.5)
    assert res.levels[1].control["temperature"] == pytest.approx(cp.temperature)
    assert res.levels[1].control["attention_budget"] == pytest.approx(cp.attention_budget)
    for lv in res.levels:
        assert 0 <= lv.novelty <= 1 and 0 <= lv.diversity <= 1 and 0 <= lv.incoherence <= 1
        assert lv.quality == pytest.approx(0.4 * lv.novelty + 0.3 * lv.diversity - 0.3 * lv.incoherence)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "sweep.json").read_text())["task_type"] == "poetry"
    # same seed, same level: same samples (common random numbers across levels)
    gen = HFGenerator(model, tok, max_new_tokens=6, use_wrapper=use_wrapper)
    try:
        assert gen(["Moon"], 0.5, 2, 3) == gen(["Moon"], 0.5, 2, 3)
    finally:
        gen.close()


def test_cli_sweep_and_score(tiny, tmp_path, capsys):
    from hf_creative_sparse.cli import main

    model, tok = tiny
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", str(folder), "--task", "code", "--levels", "0.3,0.6,0.9", "--num-samples", "2",
               "--max-new-tokens", "6", "--max-prompts", "2", "--out-dir", str(out)])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [lv["s"] for lv in data["levels"]] == [0.3, 0.6, 0.9] and data["settings"]["model"] == str(folder)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "s* =" in capsys.readouterr().out

    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\nThe cat sat on the mat.\nA storm of violins over the sea.\n")
    rc = main(["score", str(texts), "--scorer", str(folder), "--json", "--out", str(tmp_path / "s.json")])
    assert rc == 0
    report = json.loads((tmp_path / "s.json").read_text())
    novelty = report["per_output"]["novelty"]
    assert novelty[0] == 0.0 and novelty[1] == 0.0 and novelty[2] > 0.3   # the copies are not novel
    assert report["scales"]["nll_scale"] == pytest.approx(math.log(len(tok)))
    assert main(["score", str(tmp_path / "missing.txt")]) == 2
