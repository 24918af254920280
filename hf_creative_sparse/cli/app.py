"""The `hf-creative-sparse` command (same as `python -m hf_creative_sparse`).

Each subcommand lives in ``hf_creative_sparse/cli/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

What every subcommand gets from here:

- ``--help`` lists every option with its help text and default;
- a bad argument, or a bad input the library refuses (ValueError, a missing file, a
  missing optional package), ends the command with one line naming it and exit code 2
  (``HCS_TRACEBACK=1`` shows the traceback instead);
- a warning is printed once per place in the code, not once per shape or call;
- ``--no-progress`` turns off every progress bar (ours, transformers' and diffusers').

Example:
    >>> main(["bench", "--kept", "1.5"])   # doctest: +SKIP
    hf-creative-sparse bench: error: argument --kept: --kept (a kept fraction in (0, 1] or 'auto') takes ...
    2
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

#: Subcommands in the order `--help` lists them.
COMMANDS = ("demo", "bench", "sweep", "score", "calibrate")

DESCRIPTION = "Controllable sparsity for Hugging Face models. Run a command with --help for its options."
#: Environment variable that makes errors show their traceback.
TRACEBACK_ENV = "HCS_TRACEBACK"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" to each option's help
    unless the help already states it ("(default ..." or "default: ...") or there is
    none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        stated = "(default" in text or "default:" in text
        if stated or default is None or default is False or default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(str(d) for d in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str) -> Any:  # noqa: D102 (argparse's contract)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hf-creative-sparse", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hf_creative_sparse.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hf_creative_sparse.cli.{name}":
                continue  # not part of this build
            raise
        doc = (module.__doc__ or "").split("\n\n", 1)  # the module docstring's body, after its title
        description = module.HELP + ("\n\n" + doc[1] if len(doc) > 1 else "")
        cmd = sub.add_parser(name, help=module.HELP, description=description, formatter_class=HelpFormatter)
        module.add_arguments(cmd)
        cmd.add_argument("--no-progress", action="store_true",
                         help="no progress bars (ours, and those of transformers and diffusers)")
        cmd.set_defaults(_run=module.run)
    return parser


def disable_progress_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub: through the
    environment switch both read when imported, and directly where already imported
    (importing them here would cost seconds). Pipelines' own bars are turned off where
    the commands build them (``set_progress_bar_config``)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for module, function in (("transformers.utils.logging", "disable_progress_bar"),
                             ("diffusers.utils.logging", "disable_progress_bar"),
                             ("huggingface_hub.utils", "disable_progress_bars")):
        if module in sys.modules:
            getattr(sys.modules[module], function)()


@contextmanager
def warnings_once() -> Iterator[None]:
    """Show each warning once per place in the code (category, file, line), whatever its
    text: a warning naming a shape would otherwise repeat for every shape."""
    seen: set[tuple[Any, str, int]] = set()
    original = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        key = (category, filename, lineno)
        if key not in seen:
            seen.add(key)
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    if args.no_progress:
        disable_progress_bars()
    with warnings_once():
        try:
            return int(args._run(args) or 0)
        except (ValueError, OSError, ImportError) as exc:  # bad input the library refused: one line
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"hf-creative-sparse {args.command}: error: {first} ({TRACEBACK_ENV}=1 shows the traceback)",
                  file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
