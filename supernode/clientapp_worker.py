"""A `flwr-clientapp` started before its message: it imports Flower, then waits for the task token.

Flower's SuperExec starts `flwr-clientapp --token T` when a message arrives, so every round pays a Python
start and Flower's imports (1-1.5 s a message, bench/federation.py's "ClientApp started" hop) before
`train()` runs. This worker pays them while the node is idle: `supernode.prestart` keeps one waiting and
writes the token to its stdin when the SuperExec hands it a task. From there it is Flower's own
`run_clientapp`, the same call `flwr-clientapp` makes: pull the message, install the FAB, load the
ClientApp from it, push the reply.

Only Flower and third-party modules are imported ahead: the ClientApp itself is loaded from the run's FAB,
as in the cold path (a module imported here would shadow the FAB's copy)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

PRELOADED = ("flwr.supernode.runtime.run_clientapp", "flwr.clientapp", "flwr.app", "numpy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supernode.clientapp_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true")
    tls.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperExec) is gone")
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    if args.parent_pid is not None:
        from fedtune.process import exit_with_parent

        exit_with_parent(args.parent_pid)  # an idle worker of a stopped SuperExec must not linger
    from fedtune.logs import configure_logging, flwr_format

    for name in PRELOADED:
        importlib.import_module(name)
    # flwr's lines through fedtune's pipeline (JSON off a terminal), as the SuperNode's own: after flwr's
    # import, which installs flwr's own handler. FORMAT_ENV=flwr keeps flwr's format there and here.
    if not flwr_format():
        configure_logging()
    from logging import INFO

    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    from fedtune.flower_pulls import retry_pulls_sooner

    # ready before its message has arrived: it would back off up to 2 s past the download's end
    retry_pulls_sooner()
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    ready = time.monotonic()
    token = sys.stdin.readline().strip()
    if not token:  # stdin closed without a task: the SuperExec stopped or retired this worker
        return
    log(INFO, "Start prestarted `flwr-clientapp` process (ready in %.1f s, waited %.1f s for its task)",
        ready - started, time.monotonic() - ready)
    run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=args.allow_runtime_dependency_installation,
    )


if __name__ == "__main__":
    main()
