"""Ulysses context parallelism through the creative_sparse diffusers backend, on CPU.

Two gloo processes (forked, so they inherit the imported torch and diffusers) run a tiny
Wan transformer (4 heads, 1 block, 2 x 16 x 32 = 1024 video tokens) under diffusers'
``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``: each rank holds half the
sequence, and inside attention 2 of the 4 heads over the whole sequence. Each rank first
computes the one-process output of the same model and inputs (before enabling
parallelism), then the context-parallel one.

Tolerance: max |cp - single| <= 1e-5 (float32; outputs are O(1)). The attention math per
head is the same computation in both runs; only the linear layers see half the rows per
rank, which can change the last bits of their sums.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

# imported here so the forked workers inherit them instead of importing them twice
import torch.distributed as dist  # noqa: E402
from diffusers import ContextParallelConfig, WanTransformer3DModel  # noqa: E402

import hf_creative_sparse as hcs  # noqa: E402
from hf_creative_sparse.integrations import diffusers_backend as db  # noqa: E402

db.register_diffusers_backend()

TOL = 1e-5
#: One budget per head of the 4; rank 0 must keep 20%/40%, rank 1 60%/80% of the blocks.
TOPK = (0.2, 0.4, 0.6, 0.8)


def _wan(heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def _inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 2, 32, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
                timestep=torch.full((1,), 500.0), return_dict=False)


def _sparse_config() -> hcs.SparseAttentionConfig:
    return hcs.SparseAttentionConfig(topk=torch.tensor(TOPK), simthreshd1=-1.0, min_seq_len=0, backend="reference")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn: Callable[[int], dict], results: Any) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        # diffusers computes the rank's device as rank % device_count(), which is 0 on a
        # machine without an accelerator; one "device" (the CPU) is what it means here.
        torch.accelerator.device_count = lambda: 1
        try:
            results.put((rank, fn(rank)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def _run_two_ranks(fn: Callable[[int], dict], timeout: float = 300.0) -> dict[int, dict]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, fn, results)) for rank in range(2)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    try:
        for _ in procs:
            rank, value = results.get(timeout=timeout)
            out[rank] = value
    except queue.Empty:
        pytest.fail(f"context-parallel workers gave no result within {timeout} s (got {sorted(out)})")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, value in out.items():
        assert "error" not in value, f"rank {rank} failed:\n{value['error']}"
    return out


def _ulysses_vs_single(rank: int) -> dict:
    """Sparse (per-head top-k) and dense, each: the one-process output, then Ulysses 2."""
    report: dict[str, Any] = {}
    for kind in ("sparse", "dense"):
        model, inputs = _wan(), _inputs()
        config = _sparse_config() if kind == "sparse" else hcs.SparseAttentionConfig.dense(min_seq_len=0,
                                                                                           backend="reference")
        hcs.enable_diffusers_backend(model, config)
        with torch.no_grad():
            single = model(**inputs)[0]
            single_rows = {r["layer"]: r["mean_kept_fraction"] for r in hcs.sparsity_report(model).rows}
            if kind == "dense":
                hcs.disable_creative_sparse(model)  # the native backend, unpatched, is the dense reference
                native = model(**inputs)[0]
                report["dense_vs_native"] = float((single - native).abs().max())
                hcs.enable_diffusers_backend(model, config)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
            cp = model(**inputs)[0]
            # the cross-attention's unsplit text reaches the kernel once, not once per rank
            text_lengths: list[int] = []
            db.backend_layers(model)["blocks.0.attn2"].active_state().add_hook(
                lambda call: text_lengths.append(call.inputs.len_k))
            again = model(**inputs)[0]
        report[f"{kind}_text_lengths"] = text_lengths
        report[f"{kind}_repeat_diff"] = float((again - cp).abs().max())
        layer = db.backend_layers(model)["blocks.0.attn1"]
        report[kind] = dict(
            diff=float((cp - single).abs().max()), scale=float(single.abs().max()),
            single_kept=single_rows["blocks.0.attn1"],
            cp_kept={r["layer"]: r for r in hcs.sparsity_report(model).rows}["blocks.0.attn1"]["mean_kept_fraction"],
            shard_topk=[float(x) for x in layer.active_state().config.topk] if kind == "sparse" else None,
            shards=sorted(layer.shards))
    return report


def test_ulysses_two_ranks_match_one_process() -> None:
    results = _run_two_ranks(_ulysses_vs_single)
    for rank in (0, 1):
        r = results[rank]
        for kind in ("sparse", "dense"):
            assert r[kind]["scale"] > 0.1
            assert r[kind]["diff"] <= TOL, (rank, kind, r[kind])
        # the rank ran heads [2r, 2r+2) with their own budgets
        assert r["sparse"]["shards"] == [(2 * rank, 2 * rank + 2)]
        assert r["sparse"]["shard_topk"] == pytest.approx(TOPK[2 * rank:2 * rank + 2])
        assert r["dense"]["cp_kept"] == 1.0
        assert r["dense_vs_native"] <= TOL
        assert r["sparse_text_lengths"] == r["dense_text_lengths"] == [12]
        assert r["sparse_repeat_diff"] == 0.0
    # each rank's kept fraction is its heads' share; together they are the one-process mean
    kept = [results[rank]["sparse"]["cp_kept"] for rank in (0, 1)]
    assert kept[0] < kept[1]
    assert sum(kept) / 2 == pytest.approx(results[0]["sparse"]["single_kept"], abs=1e-6)


def _ulysses_anything(rank: int) -> dict:
    """3 heads over 2 ranks ("Ulysses anything": rank 0 holds heads 0-1, rank 1 head 2),
    per-head budgets given by a per-layer calibration mapping."""
    topk = torch.tensor([0.2, 0.5, 0.8])
    out: dict[str, Any] = {}
    for kind in ("calibrated", "uniform"):  # per-head budgets, and none (nothing to slice)
        model, inputs = _wan(heads=3), _inputs()
        calibration = {"blocks.0.attn1": {"topk": topk}} if kind == "calibrated" else None
        hcs.enable_diffusers_backend(model, _sparse_config().replace(topk=0.5), calibration=calibration)
        with torch.no_grad():
            single = model(**inputs)[0]
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
            cp = model(**inputs)[0]
        layer = db.backend_layers(model)["blocks.0.attn1"]
        out[kind] = dict(diff=float((cp - single).abs().max()), shards=sorted(layer.shards),
                         topk=layer.active_state().config.topk)
    out["calibrated"]["topk"] = [float(x) for x in out["calibrated"]["topk"]]
    return out


def test_ulysses_anything_uneven_heads_follow_the_calibration() -> None:
    results = _run_two_ranks(_ulysses_anything)
    expected = {0: ((0, 2), [0.2, 0.5]), 1: ((2, 3), [0.8])}
    for rank, (shard, topk) in expected.items():
        r = results[rank]
        assert r["calibrated"]["diff"] <= TOL and r["uniform"]["diff"] <= TOL, r
        assert r["calibrated"]["shards"] == [shard] and r["calibrated"]["topk"] == pytest.approx(topk)
        assert r["uniform"]["shards"] == [] and r["uniform"]["topk"] == 0.5  # nothing per head: the layer's state


def _ring(rank: int) -> dict:
    model = _wan()
    hcs.enable_diffusers_backend(model, _sparse_config())
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    try:
        with torch.no_grad():
            model(**_inputs())
    except ValueError as err:
        return {"message": str(err)}
    return {"message": None}


def test_ring_attention_is_refused_with_a_pointer_to_ulysses() -> None:
    results = _run_two_ranks(_ring)
    for rank in (0, 1):
        message = results[rank]["message"]
        assert message is not None and "ring" in message and "ulysses_degree=2" in message
