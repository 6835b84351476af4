"""The `fedtune` console script: a small dispatcher, one subcommand per module.

A subcommand registers `add_arguments(parser)` and `run(args) -> int`; heavy imports stay inside `run`,
so `fedtune --help` is fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from fedtune.errors import one_line_errors

# name -> (help, module path); the module has add_arguments(parser) and run(args) -> int
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": (
        "MMLU accuracy by FlowerTune category for an adapter (and the base model)",
        "fedtune.eval.command",
    ),
}


def _load(module_path: str) -> object:
    import importlib

    return importlib.import_module(module_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="fedtune command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module_path) in SUBCOMMANDS.items():
        module = _load(module_path)
        child = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(child)  # type: ignore[attr-defined]
        child.set_defaults(_run=module.run)  # type: ignore[attr-defined]
    return parser


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    # flwr must never phone home from any process we start
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
