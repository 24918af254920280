"""`ops.triton_launch.DirectLauncher` against a stand-in for a Triton JIT kernel: which calls
go through the JIT, what the compiled launcher receives, and when the direct path is off."""

import types

import pytest
import torch

from hf_creative_sparse.ops import triton_launch as tlaunch


class FakeCompiled:
    def __init__(self) -> None:
        self.function, self.packed_metadata = "fn", "meta"
        self.runs: list[tuple] = []

    def run(self, *args):
        self.runs.append(args)


class FakeKernel:
    """Records JIT launches; its parameters are (X, N, BLOCK) with BLOCK a constexpr."""

    arg_names = ["X", "N", "BLOCK"]

    def __init__(self) -> None:
        self.jit_calls: list[tuple] = []
        self.compiled: list[FakeCompiled] = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return launch


@pytest.fixture
def fake_triton(monkeypatch):
    driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 1234)
    hooks = types.SimpleNamespace(calls=[])
    fake = types.SimpleNamespace(runtime=types.SimpleNamespace(driver=types.SimpleNamespace(active=driver)),
                                 knobs=types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=hooks)))
    monkeypatch.setattr(tlaunch, "triton", fake)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HCS_TRITON_DIRECT_LAUNCH", raising=False)
    return hooks


def test_second_call_of_a_specialization_launches_the_compiled_kernel(fake_triton):
    kernel, x = FakeKernel(), torch.zeros(64)
    launch = tlaunch.DirectLauncher(kernel)
    launch((3, 2), x, 100, BLOCK=32, num_warps=4)
    assert len(kernel.jit_calls) == 1 and launch.direct_launches == 0
    launch((5,), x, 132, BLOCK=32, num_warps=4)  # same key: N's ==1, %16 and range unchanged
    assert len(kernel.jit_calls) == 1 and launch.direct_launches == 1
    # grid padded to 3 dims, stream, no hooks, then every parameter in signature order
    assert kernel.compiled[0].runs == [(5, 1, 1, 1234, "fn", "meta", None, None, None, x, 132, 32)]


@pytest.mark.parametrize("change", ["int_is_one", "int_divisible", "constexpr", "option", "dtype", "alignment"])
def test_a_new_specialization_goes_through_the_jit(fake_triton, change):
    kernel = FakeKernel()
    launch = tlaunch.DirectLauncher(kernel)
    x = torch.zeros(64)
    launch((1,), x, 100, BLOCK=32, num_warps=4)
    args, meta = [x, 100], dict(BLOCK=32, num_warps=4)
    if change == "int_is_one":
        args[1] = 1
    elif change == "int_divisible":
        args[1] = 96
    elif change == "constexpr":
        meta["BLOCK"] = 64
    elif change == "option":
        meta["num_warps"] = 8
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    else:
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    launch((1,), *args, **meta)
    assert len(kernel.jit_calls) == 2 and launch.direct_launches == 0


def test_direct_path_off_by_environment_interpreter_or_hooks(fake_triton, monkeypatch):
    x = torch.zeros(64)
    for env, value in (("HCS_TRITON_DIRECT_LAUNCH", "0"), ("TRITON_INTERPRET", "1")):
        monkeypatch.setenv(env, value)
        kernel = FakeKernel()
        launch = tlaunch.DirectLauncher(kernel)
        for _ in range(3):
            launch((1,), x, 100, BLOCK=32)
        assert len(kernel.jit_calls) == 3 and launch.direct_launches == 0
        monkeypatch.delenv(env)
    kernel = FakeKernel()
    launch = tlaunch.DirectLauncher(kernel)
    launch((1,), x, 100, BLOCK=32)
    fake_triton.calls.append(print)  # a profiler's launch hook: it must see every launch
    launch((1,), x, 100, BLOCK=32)
    assert len(kernel.jit_calls) == 2 and launch.direct_launches == 0


def test_missing_keyword_parameters_never_launch_directly(fake_triton):
    kernel = FakeKernel()
    launch = tlaunch.DirectLauncher(kernel)
    for _ in range(3):
        launch((1,), torch.zeros(64), 100)  # BLOCK left to a default the launcher cannot see
    assert len(kernel.jit_calls) == 3 and launch.direct_launches == 0
