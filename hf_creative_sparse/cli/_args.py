"""Argument types and machine checks shared by the subcommands.

Every type below raises ``argparse.ArgumentTypeError`` with a message that says what the
option expects; argparse names the option, so a bad value ends the command with one line
and exit code 2 (``hf-creative-sparse bench: error: argument --kept: expected ...``),
before any model is loaded.

Example:
    >>> fraction(low=0.0, high=1.0, low_open=True)("0.05")
    0.05
    >>> int_at_least(1)("3")
    3
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

import torch


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(*, low: float = 0.0, high: float = 1.0, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """A float in [low, high] (either end open when asked), for ``type=``."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """An int >= low, for ``type=``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


def kept_value(text: str) -> float | str:
    """A ``bench --kept`` entry: "auto" or a kept fraction in (0, 1]."""
    if text == "auto":
        return text
    try:
        return fraction(low=0.0, high=1.0, low_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a kept fraction in (0, 1] or 'auto', got {text!r}") from None


def float_list(*, low: float = 0.0, high: float = 1.0) -> Callable[[str], list[float]]:
    """Comma-separated floats in [low, high] ("0.1,0.3,0.5"), for ``type=``."""
    one = fraction(low=low, high=high)

    def parse(text: str) -> list[float]:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [{low:g}, {high:g}], got {text!r}")
        return [one(p) for p in parts]

    return parse


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def oversubscription_note(load: float, cores: int, threads: int) -> str | None:
    """A note when the machine is busier than its cores (1-minute load average above the
    core count): torch's threads then wait for each other and small ops run many times
    slower (measured 10-65x on a busy 2-core machine), so timings mislead. None when the
    machine is not oversubscribed.

    Example:
        >>> oversubscription_note(0.5, 2, 2) is None
        True
        >>> "busy" in oversubscription_note(7.5, 2, 2)
        True
    """
    if load <= cores:
        return None
    advice = ("--threads 1 is often faster here" if threads > 1 else
              "timings are noisy; run again on an idle machine for figures to quote")
    return (f"note: this machine is busy (1-minute load {load:.1f} on {cores} cores; torch uses {threads} "
            f"thread{'s' if threads != 1 else ''}): other processes compete for the cores, so times are slower "
            f"and noisier than on an idle machine; {advice}")


def apply_threads(threads: int | None) -> str:
    """Set torch's intra-op threads (None: leave torch's default) and return a line saying
    how many run, with an oversubscription note when the machine is busy."""
    if threads is not None:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    cores = usable_cores()
    line = f"threads: {used} torch thread{'s' if used != 1 else ''} on {cores} usable core{'s' if cores != 1 else ''}"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return line
    note = oversubscription_note(load, cores, used)
    return line if note is None else f"{line}\n{note}"


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for this command."""
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice, the usable cores); on a busy machine "
                             "fewer threads than cores can be much faster")


def model_spec(keywords: tuple[str, ...] = ("smollm2",)) -> Callable[[str], str]:
    """A model argument: one of ``keywords``, an existing folder or ``.gguf`` file, or a
    Hub id ("org/name", loaded from the Hub or its local cache), for ``type=``."""

    def parse(text: str) -> str:
        if text in keywords or os.path.isdir(text) or (os.path.isfile(text) and text.endswith(".gguf")):
            return text
        if os.path.exists(text):
            raise argparse.ArgumentTypeError(f"{text!r} is a file but not a .gguf file")
        parts = text.split("/")
        if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
            return text  # a Hub id
        choices = " or ".join(repr(k) for k in keywords)
        raise argparse.ArgumentTypeError(f"{text!r} is not {choices}, an existing model folder, a .gguf file or a "
                                         "Hub id (org/name)")

    return parse


def positive() -> Callable[[str], float]:
    """A finite float > 0, for ``type=``."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return value

    return parse
