"""`fedtune-superlink`: Flower's SuperLink with TLS, a persistent state database and no phoning home,
behind a Fleet-only TLS proxy.

With TLS (the default) it runs and supervises two processes (docs: README "Exposure"):
- Flower's SuperLink on **127.0.0.1:<internal port, default 9000>**: Fleet + Control + Runtime APIs. The
  operator's `flwr`, Flower's SuperExec (ServerApps) and the exporter connect there, from this host,
  container or pod only;
- nginx on the public **--host:--port (default 0.0.0.0:8000)**, what SuperNodes dial: it forwards
  `/v1/fleet/*` and `GET /health` to the SuperLink over TLS and answers 403 for anything else
  (superlink/proxy.py renders its config).
If either exits, the other is stopped and the launcher exits non-zero. `--no-proxy` runs the SuperLink
alone on 127.0.0.1 (a chart that runs the proxy as its own container); `--insecure` (testing only) serves
plain HTTP on --host:--port directly, every API exposed.

Every flag also reads an environment variable (container and chart friendly):
FEDTUNE_CERTS_DIR, FEDTUNE_DATABASE, FEDTUNE_OBJECT_STORE, FEDTUNE_HOST, FEDTUNE_PORT, FEDTUNE_INTERNAL_PORT,
FEDTUNE_HEALTH_PORT, FEDTUNE_PROXY (1/0), FEDTUNE_PROXY_DIR, FEDTUNE_SUPERNODE_AUTH (1/0),
FEDTUNE_INSECURE (1/0), FEDTUNE_SERVERAPP_PRESTART (0 = --cold-serverapp); FEDTUNE_OBJECT_WAIT_SECONDS
(how long an early pull waits for its object, fedtune/object_waits.py).

SuperNode authentication is ON by default over TLS: only SuperNodes whose public keys were registered
(`fedtune-keys generate` + `fedtune-keys register`, see fedtune/auth.py) may join. Turn it off explicitly
with --no-supernode-auth or FEDTUNE_SUPERNODE_AUTH=0; --insecure (testing only) implies it is off.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from fedtune.certs import DEFAULT_SANS, TlsFiles, certificate_sans, check_server_files
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.logs import configure_logging
from fedtune.metrics.sidecar import start_sidecar
from fedtune.object_waits import object_wait_seconds
from fedtune.poll_waits import node_wait_seconds, reply_wait_seconds
from fedtune.preflight import OneLineParser, env_port, port_arg, port_or_zero_arg
from fedtune.process import adopt_orphans, die_with_parent, our_children
from fedtune.runtime_env import env_flag, env_tristate, find_executable, flwr_env, passthrough
from fedtune.token_cleanup import cleanup_seconds
from superlink import proxy
from superlink.flower_entry import OBJECT_STORE_ENV, OBJECT_STORES, PRESTART_ENV

log = logging.getLogger("fedtune.superlink")
proxy_log = logging.getLogger("fedtune.proxy")

DEFAULT_PORT = proxy.DEFAULT_PUBLIC_PORT  # what SuperNodes dial (the proxy; with --insecure the SuperLink)
DEFAULT_INTERNAL_PORT = proxy.DEFAULT_INTERNAL_PORT  # Flower's SuperLink, 127.0.0.1 only
DEFAULT_HEALTH_PORT = 9095  # gRPC health service, for Kubernetes `grpc:` probes
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 20.0  # compose/kubelet give 30 s before SIGKILL


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = OneLineParser(
        prog="fedtune-superlink",
        description="Start a Flower SuperLink for fedtune (TLS by default, behind a Fleet-only proxy).",
    )
    parser.add_argument(
        "--certs-dir", default=env("FEDTUNE_CERTS_DIR"),
        help="folder with ca.crt, server.pem, server.key (see `fedtune-certs`)",
    )
    parser.add_argument("--ssl-ca-certfile", help="overrides <certs-dir>/ca.crt")
    parser.add_argument("--ssl-certfile", help="overrides <certs-dir>/server.pem")
    parser.add_argument("--ssl-keyfile", help="overrides <certs-dir>/server.key")
    parser.add_argument(
        "--insecure", action="store_true", default=env_flag("FEDTUNE_INSECURE"),
        help="serve plain HTTP, every API on --host:--port, no proxy (testing only; never across hosts)",
    )
    parser.add_argument(
        "--database", default=env("FEDTUNE_DATABASE", "state/superlink.db"),
        help="SQLite state file; keep it on a volume so runs and node ids survive restarts",
    )
    parser.add_argument(
        "--object-store", choices=OBJECT_STORES, default=env(OBJECT_STORE_ENV, OBJECT_STORES[0]),
        help="where message objects (adapter chunks of runs in flight) live: memory (default; runs, node "
        "keys and logs stay in --database) or database (Flower's default: every chunk written to the file)",
    )
    parser.add_argument(
        "--cold-serverapp", action="store_true", default=env_tristate(PRESTART_ENV) is False,
        help="start each run's ServerApp process when the run comes, as Flower does (default: one waits, "
        "its imports done; FEDTUNE_SERVERAPP_PRESTART=0)",
    )
    parser.add_argument(
        "--host", default=env("FEDTUNE_HOST", "0.0.0.0"), help="public bind address (the proxy's)"
    )
    parser.add_argument(
        "--port", type=port_arg, default=env_port("FEDTUNE_PORT", DEFAULT_PORT),
        help="public port SuperNodes dial: the Fleet API only (default 8000)",
    )
    parser.add_argument(
        "--internal-port", type=port_arg, default=env_port("FEDTUNE_INTERNAL_PORT", DEFAULT_INTERNAL_PORT),
        help="the SuperLink's own port on 127.0.0.1 (Fleet + Control + Runtime; default 9000)",
    )
    parser.add_argument(
        "--no-proxy", dest="proxy", action="store_false",
        default=env_tristate("FEDTUNE_PROXY") is not False,
        help="run only the SuperLink (on 127.0.0.1:--internal-port); the proxy runs elsewhere (a sidecar)",
    )
    parser.add_argument(
        "--proxy-dir", default=env("FEDTUNE_PROXY_DIR"),
        help="writable folder for nginx's config, pid and temp files (default: a new temp folder)",
    )
    parser.add_argument(
        "--print-proxy-config", action="store_true",
        help="print the nginx config the proxy would run with, and exit",
    )
    parser.add_argument(
        "--health-port", type=port_or_zero_arg,
        default=env_port("FEDTUNE_HEALTH_PORT", DEFAULT_HEALTH_PORT, allow_zero=True),
        help="gRPC health service port (0 disables)",
    )
    parser.add_argument(
        "--enable-supernode-auth", action="store_true", default=env_tristate("FEDTUNE_SUPERNODE_AUTH"),
        help="only SuperNodes whose public keys were registered may join (needs TLS; the default with TLS)",
    )
    parser.add_argument(
        "--no-supernode-auth", dest="enable_supernode_auth", action="store_false",
        help="let any SuperNode that trusts the CA join (no key registration)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the flower-superlink command and exit"
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to flower-superlink")
    return parser


def tls_files(args: argparse.Namespace) -> TlsFiles:
    if not args.certs_dir and not (args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile):
        raise FedTuneError(
            "TLS needs --certs-dir (or all of --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile); "
            "create them with `fedtune-certs`, or pass --insecure explicitly"
        )
    default = TlsFiles.in_dir(args.certs_dir or ".")
    return TlsFiles(
        Path(args.ssl_ca_certfile or default.ca_cert),
        Path(args.ssl_certfile or default.server_cert),
        Path(args.ssl_keyfile or default.server_key),
    )


def superlink_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where Flower's SuperLink listens: loopback with TLS, --host:--port with --insecure."""
    return (args.host, args.port) if args.insecure else (LOOPBACK, args.internal_port)


def build_command(args: argparse.Namespace) -> list[str]:
    """The `flower-superlink` command line for `args`, after checking every file it names."""
    host, port = superlink_address(args)
    if args.object_store not in OBJECT_STORES:  # from FEDTUNE_OBJECT_STORE: argparse checks flags only
        choices = ", ".join(OBJECT_STORES)
        raise FedTuneError(f"--object-store must be one of {choices}, got {args.object_store!r}")
    object_wait_seconds()  # FEDTUNE_OBJECT_WAIT_SECONDS=soon: one line here, before the proxy starts
    reply_wait_seconds()  # the same for FEDTUNE_REPLY_WAIT_SECONDS
    node_wait_seconds()  # ... and FEDTUNE_NODE_POLL_WAIT_SECONDS
    cleanup_seconds()  # ... and FEDTUNE_TOKEN_CLEANUP_SECONDS
    cmd = [
        "flower-superlink",
        "--database", str(args.database),
        "--host", host,
        "--port", str(port),
        # Images and hosts have fedtune's dependencies preinstalled; never `uv sync` per run.
        "--disable-runtime-dependency-installation",
    ]
    if args.health_port:
        if args.health_port in (args.port, args.internal_port):
            raise FedTuneError(f"--health-port {args.health_port} is already the SuperLink's or proxy's port")
        cmd += ["--health-server-address", f"{args.host}:{args.health_port}"]
    if args.insecure:
        if args.enable_supernode_auth:
            raise FedTuneError("--enable-supernode-auth requires TLS; drop --insecure")
        cmd.append("--insecure")
    else:
        if args.proxy and args.internal_port == args.port:
            raise FedTuneError(f"--internal-port must differ from --port (both {args.port})")
        files = tls_files(args)
        check_server_files(files)
        # The proxy, SuperExec and exporter reach the SuperLink on 127.0.0.1 and verify its certificate.
        missing = set(DEFAULT_SANS) - certificate_sans(files.server_cert)
        if missing:
            raise FedTuneError(
                f"{files.server_cert} lacks {', '.join(sorted(missing))} in its SANs (the SuperLink is "
                "reached on 127.0.0.1 from its own host); regenerate it with `fedtune-certs`"
            )
        cmd += [
            "--ssl-ca-certfile", str(files.ca_cert),
            "--ssl-certfile", str(files.server_cert),
            "--ssl-keyfile", str(files.server_key),
        ]
    if args.enable_supernode_auth is None:  # unset: on with TLS, off with --insecure
        args.enable_supernode_auth = not args.insecure
    if args.enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd + passthrough(args.extra)


def proxy_config(args: argparse.Namespace, runtime_dir: Path) -> proxy.ProxyConfig:
    files = tls_files(args)
    return proxy.ProxyConfig(
        listen_host=args.host,
        listen_port=args.port,
        upstream_port=args.internal_port,
        server_cert=files.server_cert.resolve(),
        server_key=files.server_key.resolve(),
        ca_cert=files.ca_cert.resolve(),
        runtime_dir=runtime_dir.resolve(),
    )


# -- supervision ---------------------------------------------------------------------------------------
def _reap(pid: int) -> int | None:
    """Exit code of child `pid` if it has ended (reaped now), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return os.waitstatus_to_exitcode(status) if done == pid else None


def _stop(children: dict[int, str], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every child still running, SIGKILL after `grace` seconds. Children are those we started and
    any orphan of theirs we adopted (see `run`): the workers of an nginx master that was SIGKILLed keep
    the public port open."""
    targets = set(children) | our_children()
    for pid in targets:
        if _reap(pid) is None:
            with_suppressed_kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    pending = set(targets)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if _reap(pid) is None}
        if pending:
            time.sleep(0.1)
    for pid in pending:
        with_suppressed_kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def with_suppressed_kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def forward_stop_signals(children: dict[int, str]) -> list[int]:
    """SIGTERM/SIGINT/SIGHUP: recorded (returned list) and passed on to every child as SIGTERM.
    Installed before the children start, so no signal can leave one running without the launcher."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for pid in children:
            with_suppressed_kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return stopping


def supervise(children: dict[int, str], stopping: list[int]) -> int:
    """Wait until a child exits (or we are told to stop); stop the rest. Exit code for the launcher."""
    while True:
        try:
            pid, status = os.wait()  # also reaps orphans reparented to us (we are PID 1 in a container)
        except ChildProcessError:
            return 1
        if pid in children:
            break
    name, code = children.pop(pid), os.waitstatus_to_exitcode(status)
    if stopping:
        _stop(children)
        return 0
    others = " and ".join(children.values()) or "nothing"
    print(f"error: {name} exited (code {code}); stopping {others}", file=sys.stderr, flush=True)
    _stop(children)
    return code if code > 0 else 1


NGINX_LEVELS = {"emerg": logging.CRITICAL, "alert": logging.CRITICAL, "crit": logging.CRITICAL,
                "error": logging.ERROR, "warn": logging.WARNING, "notice": logging.INFO, "info": logging.INFO}
NGINX_LEVEL = re.compile(r"\[(" + "|".join(NGINX_LEVELS) + r")\]")


def relay_error_log(stream: IO[bytes] | None) -> None:
    """nginx writes its error log as plain text: each line goes through fedtune.logs instead (so it is JSON
    where machines read the SuperLink's log), at nginx's own level."""
    if stream is None:
        return
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        if line:
            found = NGINX_LEVEL.search(line)
            proxy_log.log(NGINX_LEVELS[found.group(1)] if found else logging.INFO, "nginx: %s", line)


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    find_executable(cmd[0])  # flwr must be installed: one clear line if not
    nginx = conf = None
    runtime_dir: Path | None = None
    made_dir = False
    if args.proxy and not args.insecure:
        nginx = proxy.find_nginx()
        if args.proxy_dir:
            runtime_dir = Path(args.proxy_dir)
        else:
            runtime_dir, made_dir = Path(tempfile.mkdtemp(prefix="fedtune-proxy-")), True
        conf = proxy.write(proxy_config(args, runtime_dir))
        proxy.check(nginx, conf)  # a bad certificate or a taken port: one line before anything starts
    host, port = superlink_address(args)
    configure_logging(component="superlink")  # these lines too are JSON where machines read the log
    if args.insecure:
        log.warning("--insecure: every API (Fleet, Control, Runtime) is plain HTTP on %s:%s", host, port)
    elif args.proxy:
        log.info(
            "SuperLink on https://%s:%s (this host only); Fleet-only proxy on https://%s:%s "
            "(nginx, 403 for Control/Runtime)", host, port, args.host, args.port,
        )
    else:
        log.info("SuperLink on https://%s:%s (this host only); --no-proxy: no Fleet proxy here", host, port)
    if args.enable_supernode_auth:
        log.info("SuperNode authentication is on: only SuperNodes with registered keys may join "
                 "(fedtune-keys)")
    # the metrics exporter (FEDTUNE_METRICS_PORT, docs/observability.md); it polls 127.0.0.1:--internal-port
    start_sidecar(args)
    sys.stdout.flush()
    children: dict[int, str] = {}
    stopping = forward_stop_signals(children)
    # A SIGKILLed launcher (OOM killer, `kill -9`, a runtime without an init) runs no cleanup of its own:
    # the kernel sends each child SIGTERM instead, so no SuperLink or nginx outlives it. Spawned from
    # this, the main thread (die_with_parent says why).
    with_parent = die_with_parent(signal.SIGTERM)
    # Orphans of our children (a SIGKILLed nginx master's workers) become ours, for `_stop` to end; in a
    # container we are PID 1 and adopt them anyway.
    adopt_orphans()
    try:
        # Flower's own CLI, run through superlink.flower_entry (longer SQLite busy timeout, --object-store,
        # our log pipeline).
        settings = {OBJECT_STORE_ENV: args.object_store, PRESTART_ENV: "0" if args.cold_serverapp else "1"}
        superlink = subprocess.Popen(
            [sys.executable, "-m", "superlink.flower_entry", *cmd[1:]],
            env=flwr_env(**settings),
            stdin=subprocess.DEVNULL,
            preexec_fn=with_parent,
        )
        children[superlink.pid] = "SuperLink"
        if nginx is not None and conf is not None:
            edge = subprocess.Popen(
                proxy.command(nginx, conf), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=with_parent,
            )
            relay = threading.Thread(target=relay_error_log, args=(edge.stderr,), daemon=True)
            relay.start()
            children[edge.pid] = "Fleet proxy (nginx)"
        if stopping:  # told to stop while starting
            return 0
        return supervise(children, stopping)
    finally:
        _stop(children, grace=5.0)
        if made_dir and runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.print_proxy_config:
        if args.insecure:
            raise FedTuneError("--insecure runs no proxy: nothing to print")
        runtime_dir = Path(args.proxy_dir or "/tmp/fedtune-proxy")
        print(proxy.render(proxy_config(args, runtime_dir)), end="")
        return
    cmd = build_command(args)
    Path(args.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(" ".join(cmd))
        return
    raise SystemExit(run(args, cmd))


if __name__ == "__main__":
    main()
