"""`fedtune`: one front door for the one-off commands; the long-running daemons keep their own names
(fedtune-superlink, fedtune-supernode, fedtune-exporter), as Flower keeps flower-superlink/-supernode.

Two kinds of subcommand: a module with `add_arguments(parser)` and `run(args) -> int` gets a subparser
here; a command that already has its own console script (`fedtune-certs`, …) is handed the rest of the
command line as it is, so `fedtune certs --out x` and `fedtune-certs --out x` are the same program and
`fedtune certs --help` shows that program's own options. Heavy imports stay inside the commands, so
`fedtune --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from fedtune.errors import one_line_errors
from fedtune.runtime_env import silence_flwr

# name -> (one-line help, module with add_arguments/run)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("MMLU accuracy by category of an adapter (and of the base model)", "fedtune.eval.command"),
    "report": ("(re)make a run folder's report.html and print its round table", "fedtune.report.command"),
    "connection": ("add a SuperLink connection for the flwr CLI", "fedtune.connection"),
}
# name -> (one-line help, "module:function" taking argv); the old console scripts, unchanged
DELEGATED: dict[str, tuple[str, str]] = {
    "demo": ("run the embedded offline demo: TLS SuperLink + 2 SuperNodes here", "fedtune.demo:main"),
    "certs": ("make the CA and the SuperLink certificate (= fedtune-certs)", "fedtune.certs:main"),
    "keys": ("SuperNode auth keys: generate, register (= fedtune-keys)", "fedtune.auth:main"),
    "k8s-keys": ("mint SuperNode keys into a Kubernetes Secret (= fedtune-k8s-keys)",
                 "fedtune.k8s_keys:main"),
}
DAEMONS = {
    "fedtune-superlink": "the SuperLink (Flower's, behind the Fleet-only TLS proxy)",
    "fedtune-supernode": "a SuperNode with its partition, key and warm trainer",
    "fedtune-exporter": "Prometheus metrics of the runs (bytes, loss, rounds)",
}


def _epilog() -> str:
    width = max(len(name) for name in DAEMONS)
    lines = ["long-running services (their own commands):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in DAEMONS.items()]
    lines.append("`fedtune COMMAND --help` shows a command's options.")
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every command and its help on one line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=110)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures subcommand names one indent level shallower than it prints them
        for sub in getattr(action, "_choices_actions", []):
            indent = self._current_indent + 2 * self._indent_increment
            width = len(self._format_action_invocation(sub)) + indent
            self._action_max_length = max(self._action_max_length, width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated 4-bit LoRA fine-tuning with Flower: one-off commands.",
        epilog=_epilog(),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted([*DELEGATED, *SUBCOMMANDS], key=_order):
        if name in DELEGATED:  # parsed by its own program (main() hands it over); listed for --help
            sub.add_parser(name, help=DELEGATED[name][0], add_help=False)
            continue
        help_text, module_path = SUBCOMMANDS[name]
        module = importlib.import_module(module_path)
        child = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(child)
        child.set_defaults(_run=module.run)
    return parser


def _order(name: str) -> int:
    order = ("demo", "certs", "keys", "k8s-keys", "connection", "eval", "report")
    return order.index(name) if name in order else len(order)


def _delegate(name: str, argv: list[str]) -> int:
    module_path, _, function = DELEGATED[name][1].partition(":")
    entry: Callable[[list[str]], object] = getattr(importlib.import_module(module_path), function)
    result = entry(argv)
    return result if isinstance(result, int) else 0


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    silence_flwr()  # flwr must never phone home from any process we start
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return _delegate(args_list[0], args_list[1:])
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(args_list)
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
