"""The command line a new user meets (issue 17): one-line errors with exit code 2, help
with defaults, warnings once, thread and oversubscription notes, all four calibration
examples, and the tiny calibration used as written (its stored policy runs)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hf_creative_sparse.cli import app as cli
from hf_creative_sparse.commands import _args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_ARGUMENTS = [  # (argv, the option the message must name, what it must say)
    (["bench", "--kept", "1.5"], "--kept", "(0, 1]"),
    (["bench", "--kept", "half"], "--kept", "'half'"),
    (["bench", "--reps", "0"], "--reps", ">= 1"),
    (["bench", "--shape", "1,2"], "--shape", "B,H,N,D"),
    (["bench", "--threads", "0"], "--threads", ">= 1"),
    (["bench", "--backends", "gpu"], "--backends", "invalid choice"),
    (["calibrate", "--example", "wan", "--tiny", "--target-l1", "-1", "--out", "x"], "--target-l1", "(0, 1)"),
    (["calibrate", "--example", "sd3", "--out", "x"], "--example", "hunyuan_video"),
    (["calibrate", "--example", "wan", "--tiny"], "--out", "required"),
    (["sweep", "--model", "nope"], "--model", "'nope'"),
    (["sweep", "--levels", "0.1,1.5"], "--levels", "[0, 1]"),
    (["sweep", "--budget", "0"], "--budget", "(0, 1]"),
    (["demo", "--seq-len", "-5"], "--seq-len", ">= 1"),
    (["score", "texts.txt", "--nll-scale", "-1"], "--nll-scale", "> 0"),
]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,option,says", BAD_ARGUMENTS)
def test_bad_arguments_end_with_one_line_and_exit_code_2(argv, option, says, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hf-creative-sparse {argv[0]}: error:") and option in lines[0] and says in lines[0]


def test_inputs_the_library_refuses_end_with_one_line(tmp_path, capsys):
    code, out, err = run_main(["score", str(tmp_path / "missing.txt")], capsys)
    missing = tmp_path / "missing.txt"
    assert code == 2 and err.strip().splitlines() == [
        f"hf-creative-sparse score: error: no such file: {missing} (HCS_TRACEBACK=1 shows the traceback)"]
    (tmp_path / "one.txt").write_text("a single text\n")
    code, _, err = run_main(["score", str(tmp_path / "one.txt")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--reference" in err
    code, _, err = run_main(["calibrate", "--example", "wan", "--tiny", "--out", str(tmp_path / "one.txt")], capsys)
    assert code == 2 and "--out" in err and "is a file" in err
    code, _, err = run_main(["calibrate", "--example", "wan", "--tiny", "--out", str(tmp_path), "--target-l1", "0.1",
                             "--pv-target-l1", "0.05"], capsys)
    assert code == 2 and "--pv-target-l1" in err and len(err.strip().splitlines()) == 1


def test_the_installed_entry_point_gives_the_same_one_line_errors():
    proc = subprocess.run([sys.executable, "-m", "hf_creative_sparse", "bench", "--kept", "1.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "hf-creative-sparse bench: error: argument --kept: expected a kept fraction in (0, 1] or 'auto', got '1.5' "
        "(see hf-creative-sparse bench --help)"]


def test_help_lists_each_command_once_and_every_option_with_help_and_default():
    parser = cli.build_parser()
    text = parser.format_help()
    for name in cli.COMMANDS:
        assert sum(line.split()[:1] == [name] for line in text.splitlines()) == 1, (name, text)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(cli.COMMANDS)
    formatter = cli.HelpFormatter("hf-creative-sparse")
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and action.help.strip(), (name, action.dest)
            if action.default is not None and action.default is not False:
                shown = formatter._get_help_string(action)
                assert "(default" in shown or "default:" in shown, (name, action.dest)
    bench = " ".join(sub.choices["bench"].format_help().split())  # unwrapped
    assert "(default: 3)" in bench and "(default: 1.0 0.5 0.25 0.1 auto)" in bench
    assert "(default: 0)" in " ".join(sub.choices["sweep"].format_help().split())  # --seed 0 is a default too


def test_calibrate_offers_all_four_families():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    example = next(a for a in sub.choices["calibrate"]._actions if a.dest == "example")
    assert sorted(example.choices) == ["cogvideox", "flux", "hunyuan_video", "wan"]


@pytest.mark.parametrize("family,shape", [("cogvideox", (1, 3, 4, 32, 32)), ("hunyuan_video", (1, 4, 2, 16, 32))])
def test_the_new_tiny_examples_run_sparse(family, shape):
    pytest.importorskip("diffusers")
    from hf_creative_sparse import SparseAttentionConfig, enable_creative_sparse, sparsity_report
    from hf_creative_sparse.testing import tiny_example

    pipe, call = tiny_example(family, steps=1)
    handle = enable_creative_sparse(pipe, SparseAttentionConfig(min_seq_len=0, topk=0.5, simthreshd1=-1.0,
                                                                backend="reference"))
    try:
        latents = call(0)
        report = sparsity_report(pipe)
    finally:
        handle.disable()
    assert tuple(latents.shape) == shape and torch.isfinite(latents).all()
    assert report.calls >= 1 and report.mean_kept_fraction < 0.9


def test_warnings_are_shown_once_per_place():
    shown = []

    def emit(i: int) -> None:
        warnings.warn(f"shape {i} is odd", UserWarning)

    original = warnings.showwarning
    warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with cli.warnings_once():
                for i in range(3):
                    emit(i)
                warnings.warn("another place", UserWarning)
    finally:
        warnings.showwarning = original
    assert shown == ["shape 0 is odd", "another place"]


def test_oversubscription_is_detected_and_threads_are_taken(monkeypatch, capsys):
    assert _args.oversubscription_note(1.5, 2, 2) is None
    note = _args.oversubscription_note(9.0, 2, 2)
    assert "load 9.0 on 2 cores" in note and "--threads 1" in note
    assert "--threads 1" not in _args.oversubscription_note(9.0, 2, 1)
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    try:
        code, out, err = run_main(["bench", "--shape", "1,1,128,16", "--shape", "1,1,192,16", "--kept", "0.5",
                                   "--backends", "reference", "cuda", "cpu", "--reps", "1", "--threads", "1"], capsys)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert "threads: 1 torch thread on" in out and "this machine is busy (1-minute load 40.0" in out
    assert "B1H1N128D16" in out and "B1H1N192D16" in out
    if not torch.cuda.is_available():  # the backend that cannot run is reported once, not per shape
        assert err.count("skipping cuda") == 1


def test_no_progress_turns_off_the_libraries_bars(monkeypatch, capsys):
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        code, _, _ = run_main(["bench", "--shape", "1,1,64,16", "--kept", "auto", "--backends", "reference",
                               "--reps", "1", "--no-progress"], capsys)
        assert code == 0
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def test_tiny_calibration_from_the_shell_runs_with_its_stored_policy(tmp_path, capsys):
    """`calibrate --example wan --tiny` then `enable_creative_sparse(pipe, calibration=DIR)`
    runs sparse without passing a config (it ran dense as 'short sequence' before)."""
    pytest.importorskip("diffusers")
    from hf_creative_sparse import enable_creative_sparse, sparsity_report
    from hf_creative_sparse.testing import tiny_example

    code, out, _ = run_main(["calibrate", "--example", "wan", "--tiny", "--num-calls", "1", "--steps", "1",
                             "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0 and "min_seq_len 0" in out
    assert sorted(os.listdir(tmp_path)) == ["creative_sparse_config.json", "sparse_params.safetensors"]
    pipe, call = tiny_example("wan", steps=1)
    handle = enable_creative_sparse(pipe, calibration=str(tmp_path))
    try:
        call(3)
        report = sparsity_report(pipe)
    finally:
        handle.disable()
    reasons = {reason for r in report.rows for reason in r["fallback_reasons"]}
    assert not any("short sequence" in reason for reason in reasons), report
    # the stored min_seq_len 0 is honoured; what remains is the CPU policy of this machine's
    # measured rates (ops/cpu_policy.py), which may still find a tiny call cannot pay
    assert report.mean_kept_fraction < 1.0 or reasons == {"sparsity cannot pay on the CPU"}, report
