"""An app process started before its task (fedtune/prestart.py): it imports Flower and what the app
needs, then waits for the task's token on stdin.

`python -m fedtune.prestart_worker flwr-clientapp ARGS` becomes what `flwr-clientapp --token T ARGS` is,
`… flwr-serverapp ARGS` what `flwr-serverapp --token T ARGS` is: from the token on it is Flower's own
`run_clientapp` / `run_serverapp` — pull the task's inputs, install the FAB, load the app from it, run it.

Only Flower and third-party modules are imported ahead: the app itself is loaded from the run's FAB, as in
the cold path (a module of ours imported here would shadow the FAB's copy). A ServerApp worker also imports
what fedtune's ServerApp imports when its run starts (torch, transformers and peft, for the initial adapter
built on the meta device): 15-21 s on an H200 host, most of a run's start. A ClientApp worker imports only
Flower: a warm-trainer ClientApp never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from logging import INFO
from queue import Queue
from typing import Any

PRELOADED = {
    "flwr-clientapp": ("flwr.supernode.runtime.run_clientapp", "flwr.clientapp", "flwr.app", "numpy"),
    "flwr-serverapp": (
        "flwr.superlink.runtime.run_serverapp", "flwr.serverapp", "flwr.app", "numpy",
        "torch", "transformers", "peft",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune.prestart_worker", description=__doc__.splitlines()[0])
    parser.add_argument("task_type", choices=sorted(PRELOADED))
    parser.add_argument("--runtime-api-address", required=True)
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true")
    tls.add_argument("--root-certificates", help="CA of the Runtime API")
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

    for name in PRELOADED[args.task_type]:
        importlib.import_module(name)
    # flwr's lines through fedtune's pipeline (JSON off a terminal), as the role's own: after flwr's
    # import, which installs flwr's own handler. FORMAT_ENV=flwr keeps flwr's format there and here.
    if not flwr_format():
        configure_logging()
    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    from fedtune.flower_pulls import retry_pulls_sooner

    # ready before its inputs have all arrived: it would back off up to 2 s past the transfer's end
    retry_pulls_sooner()
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    ready = time.monotonic()
    token = sys.stdin.readline().strip()
    if not token:  # stdin closed without a task: the SuperExec stopped or retired this worker
        return
    log_queue = mirror_serverapp_output() if args.task_type == "flwr-serverapp" else None
    log(INFO, "Start prestarted `%s` process (ready in %.1f s, waited %.1f s for its task)",
        args.task_type, ready - started, time.monotonic() - ready)
    common: dict[str, Any] = {
        "runtime_api_address": args.runtime_api_address, "token": token, "insecure": args.insecure,
        "certificates": certificates, "parent_pid": args.parent_pid,
        "runtime_dependency_install": args.allow_runtime_dependency_installation,
    }
    if log_queue is None:
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(**common)
    else:
        from flwr.supercore.logger import restore_output
        from flwr.superlink.runtime import run_serverapp

        run_serverapp(log_queue=log_queue, **common)
        restore_output()


def mirror_serverapp_output() -> Queue[str | None]:
    """As `flwr-serverapp` does from its start: its output also goes to the SuperLink (`flwr log`)."""
    from flwr.supercore.logger import mirror_output_to_queue

    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    return log_queue


if __name__ == "__main__":
    main()
