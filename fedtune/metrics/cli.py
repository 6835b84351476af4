"""`fedtune-exporter` (`python -m fedtune.metrics`): serve Prometheus metrics of fedtune runs.

It binds the SuperLink's host by default (FEDTUNE_METRICS_HOST, else FEDTUNE_HOST, else 127.0.0.1): metrics
are as reachable as the SuperLink is, never more. See docs/observability.md."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from fedtune.metrics.notify import DEFAULT_PORT, HOST_ENV, METRICS_PATH, PORT_ENV
from fedtune.runtime_env import env_flag

log = logging.getLogger("fedtune.metrics")


def default_host() -> str:
    return os.environ.get(HOST_ENV) or os.environ.get("FEDTUNE_HOST") or "127.0.0.1"


def default_superlink() -> str:
    """The SuperLink's Control API from its own host: the internal port behind the proxy (issue 13)."""
    env = os.environ.get
    port = env("FEDTUNE_INTERNAL_PORT") if not env_flag("FEDTUNE_INSECURE") else None
    return env("FEDTUNE_METRICS_SUPERLINK") or f"127.0.0.1:{port or env('FEDTUNE_PORT') or 9000}"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    certs_dir = env("FEDTUNE_CERTS_DIR")
    parser = argparse.ArgumentParser(
        prog="fedtune-exporter",
        description="Serve Prometheus metrics of fedtune runs (results.json + the SuperLink's run traffic).",
    )
    parser.add_argument(
        "--host", default=default_host(),
        help=f"bind address (${HOST_ENV}, else $FEDTUNE_HOST, else 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=int(env(PORT_ENV) or DEFAULT_PORT), help=f"(${PORT_ENV}, default 9400)"
    )
    parser.add_argument(
        "--output-dir",
        action="append",
        default=None,
        help="folder holding <run-id>/results.json (repeatable; default $FEDTUNE_OUTPUT_DIR or ./outputs)",
    )
    parser.add_argument(
        "--superlink", default=default_superlink(),
        help="the SuperLink's HOST:PORT for its Control API (per-run status and network traffic)",
    )
    parser.add_argument(
        "--root-certificates",
        default=os.path.join(certs_dir, "ca.crt") if certs_dir else None,
        help="CA of the SuperLink's certificate (default $FEDTUNE_CERTS_DIR/ca.crt)",
    )
    parser.add_argument("--insecure", action="store_true", default=env_flag("FEDTUNE_INSECURE"))
    parser.add_argument("--no-superlink", action="store_true", help="do not poll the SuperLink")
    parser.add_argument("--interval", type=float, default=1.0, help="results scan period (s)")
    parser.add_argument("--superlink-interval", type=float, default=5.0, help="Control API poll period (s)")
    parser.add_argument("--max-runs", type=int, default=20, help="export the latest N runs (+ running ones)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    return parser


def main(argv: list[str] | None = None) -> None:
    from fedtune.logs import configure_logging
    from fedtune.runtime_env import silence_flwr

    silence_flwr()
    configure_logging(component="exporter")
    args = build_parser().parse_args(argv)

    from fedtune.metrics.service import Exporter
    from fedtune.metrics.superlink import SuperLinkPoller
    from fedtune.process import exit_with_parent

    roots = [Path(p) for p in (args.output_dir or [os.environ.get("FEDTUNE_OUTPUT_DIR") or "outputs"])]
    poller = None
    if not args.no_superlink:
        poller = SuperLinkPoller(args.superlink, args.root_certificates, args.insecure)
    try:
        exporter = Exporter(
            roots, args.host, args.port, poller, args.interval, args.superlink_interval, args.max_runs
        ).start()
    except OSError as err:
        log.error("cannot serve metrics on %s:%s: %s", args.host, args.port, err)
        raise SystemExit(1) from err
    log.info(
        "serving metrics on http://%s:%d%s (results under %s; SuperLink %s)",
        args.host, exporter.port, METRICS_PATH, ", ".join(map(str, roots)),
        "off" if poller is None else args.superlink,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if args.parent_pid:
        exit_with_parent(args.parent_pid, on_gone=done.set)
    done.wait()
    exporter.stop()
