"""`fedtune-superlink`: start `flower-superlink` with TLS, a persistent state database and no phoning home.

Every flag also reads an environment variable (container and chart friendly):
FEDTUNE_CERTS_DIR, FEDTUNE_DATABASE, FEDTUNE_HOST, FEDTUNE_PORT, FEDTUNE_HEALTH_PORT,
FEDTUNE_SUPERNODE_AUTH (1/0), FEDTUNE_INSECURE (1/0).

SuperNode authentication is ON by default over TLS: only SuperNodes whose public keys were registered
(`fedtune-keys generate` + `fedtune-keys register`, see fedtune/auth.py) may join. Turn it off explicitly
with --no-supernode-auth or FEDTUNE_SUPERNODE_AUTH=0; --insecure (testing only) implies it is off.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedtune.certs import TlsFiles, check_server_files
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.exporter import start_sidecar
from fedtune.runtime_env import env_flag, env_tristate, find_executable, flwr_env, passthrough

DEFAULT_PORT = 8000  # Fleet + Control + Runtime APIs over HTTPS (Flower >= 1.40)
DEFAULT_HEALTH_PORT = 9095  # gRPC health service, for Kubernetes `grpc:` probes


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="fedtune-superlink", description="Start a Flower SuperLink for fedtune (TLS by default)."
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
        help="serve plain HTTP (testing only; never across hosts)",
    )
    parser.add_argument(
        "--database", default=env("FEDTUNE_DATABASE", "state/superlink.db"),
        help="SQLite state file; keep it on a volume so runs and node ids survive restarts",
    )
    parser.add_argument("--host", default=env("FEDTUNE_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env("FEDTUNE_PORT", DEFAULT_PORT)))
    parser.add_argument(
        "--health-port", type=int, default=int(env("FEDTUNE_HEALTH_PORT", DEFAULT_HEALTH_PORT)),
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


def build_command(args: argparse.Namespace) -> list[str]:
    """The `flower-superlink` command line for `args`, after checking every file it names."""
    cmd = [
        "flower-superlink",
        "--database", str(args.database),
        "--host", args.host,
        "--port", str(args.port),
        # Images and hosts have fedtune's dependencies preinstalled; never `uv sync` per run.
        "--disable-runtime-dependency-installation",
    ]
    if args.health_port:
        cmd += ["--health-server-address", f"{args.host}:{args.health_port}"]
    if args.insecure:
        if args.enable_supernode_auth:
            raise FedTuneError("--enable-supernode-auth requires TLS; drop --insecure")
        cmd.append("--insecure")
    else:
        if not args.certs_dir and not (args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile):
            raise FedTuneError(
                "TLS needs --certs-dir (or all of --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile); "
                "create them with `fedtune-certs`, or pass --insecure explicitly"
            )
        default = TlsFiles.in_dir(args.certs_dir or ".")
        files = TlsFiles(
            Path(args.ssl_ca_certfile or default.ca_cert),
            Path(args.ssl_certfile or default.server_cert),
            Path(args.ssl_keyfile or default.server_key),
        )
        check_server_files(files)
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


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cmd = build_command(args)
    Path(args.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(" ".join(cmd))
        return
    find_executable(cmd[0])  # flwr must be installed: one clear line if not
    if args.enable_supernode_auth:
        print("SuperNode authentication is on: only SuperNodes with registered keys may join (fedtune-keys)")
    start_sidecar(args)  # the metrics exporter, when FEDTUNE_METRICS_PORT is set (docs/observability.md)
    sys.stdout.flush()
    # exec: the SuperLink becomes this process, so signals from docker/kubelet reach it directly.
    # Flower's own CLI, run through superlink.flower_entry (longer SQLite busy timeout, our log pipeline).
    os.execve(sys.executable, [sys.executable, "-m", "superlink.flower_entry", *cmd[1:]], flwr_env())


if __name__ == "__main__":
    main()
