"""The ``edgeprune`` command line: one module per subcommand, each parsing arguments and calling the library.

``edgeprune --help`` imports no torch (subcommand modules import heavy code inside their ``run`` function).
A user mistake (:class:`~edgeprune.errors.EdgepruneError`) prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .. import __version__
from ..errors import EdgepruneError
from . import bench, build, compare, demo, eval, export, fit_recipe, methods, models, run, viz

COMMANDS = (run, demo, export, build, methods, models, viz, fit_recipe, compare, bench, eval)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Deploy multimodal LLMs with visual-token pruning (GridPrune, G-Prune, FitPrune) on NVIDIA GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`edgeprune methods | head -1`): stop quietly, as the Python docs recommend, and
        # point stdout at devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except EdgepruneError as exc:
        print(f"edgeprune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
