"""The `hf-creative-sparse` command (same as `python -m hf_creative_sparse`).

Each subcommand lives in ``hf_creative_sparse/commands/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommands in the order `--help` lists them.
COMMANDS = ("demo", "bench", "sweep", "score", "calibrate")

DESCRIPTION = """Controllable sparsity for Hugging Face models.

  demo       sparse kernels against dense attention on this machine (and, where the
             offline models are installed, two-stage creative decoding)
  bench      attention benchmark: time, TFLOP/s, kept fraction and error vs SDPA
  sweep      find the best sparsity s* for a model and task, with a plot
  score      score a file of texts with the quality functional Q
  calibrate  per-layer, per-head thresholds for a model to an error budget
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-creative-sparse", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hf_creative_sparse.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hf_creative_sparse.commands.{name}":
                continue  # not part of this build
            raise
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
