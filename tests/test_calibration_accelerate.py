"""`accelerate launch` with 2 CPU processes shards the recorded calls and merges the
statistics: the thresholds equal those of a 1-process run (the CLI end to end)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from hf_creative_sparse.calibration import load_calibration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["calibrate", "--example", "wan", "--tiny", "--target-l1", "0.05", "--num-calls", "2", "--steps", "1",
        "--no-progress"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core machine
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _build_kernels_first() -> None:
    """Build (or load) the CPU kernels in this process, so that the three processes below do
    not build them at once inside their timeouts (a fresh checkout compiles for a minute)."""
    from hf_creative_sparse.ops._ext import load_extension

    try:
        load_extension("cpu")
    except Exception:  # no compiler here: the processes use the PyTorch reference
        pass


def test_two_processes_give_the_thresholds_of_one(tmp_path):
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    one, two = tmp_path / "one", tmp_path / "two"
    _build_kernels_first()
    # --multi_gpu selects accelerate's torchrun launcher, which starts gloo processes on a CPU-only
    # machine (accelerate's --cpu launcher starts several processes only through mpirun)
    launched = subprocess.Popen(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "hf_creative_sparse", *ARGS,
         "--out", str(two)], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: a timeout kills the launcher's workers too
    try:
        single = subprocess.run([sys.executable, "-m", "hf_creative_sparse", *ARGS, "--out", str(one)], env=_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=80)
        out, _ = launched.communicate(timeout=85)
    finally:
        if launched.poll() is None:  # left running, a worker would hold the kernel build lock for later tests
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()
    assert single.returncode == 0, single.stdout + single.stderr
    assert launched.returncode == 0, out

    cal1, cal2 = load_calibration(one), load_calibration(two)
    assert cal1.info["processes"] == 1 and cal2.info["processes"] == 2
    assert list(cal1.layers) == list(cal2.layers) == ["blocks.0.attn1", "blocks.1.attn1"]
    for name, a in cal1.layers.items():
        b = cal2.layers[name]
        assert (a.heads, a.calls) == (b.heads, b.calls) == (2, 2)
        for key in ("simthreshd1", "level", "pvthreshd", "dense", "kept_fraction"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
        torch.testing.assert_close(a.measured_l1, b.measured_l1, rtol=1e-5, atol=1e-7)
        assert bool((b.measured_l1 <= 0.05).all())
    assert cal2.mean_kept_fraction < 1.0
