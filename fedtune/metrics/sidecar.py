"""SuperLink launcher side: `fedtune-superlink` starts the exporter beside the SuperLink when
FEDTUNE_METRICS_PORT is set (not 0). The exporter binds the SuperLink's own host (its public address), polls
the SuperLink's Control API on loopback, and exits when the launcher's process (which becomes the SuperLink)
is gone."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fedtune.metrics.notify import HOST_ENV, PORT_ENV, metrics_port

LOCAL_HOST = "127.0.0.1"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def control_address(superlink_args: argparse.Namespace) -> str:
    """The SuperLink's own HOST:PORT, seen from its host: the internal loopback port behind the TLS proxy,
    or the public port itself without one (--insecure, or launchers without a proxy)."""
    internal = getattr(superlink_args, "internal_port", None)
    if internal and not superlink_args.insecure:
        return f"{LOCAL_HOST}:{internal}"
    host = superlink_args.host
    local = LOCAL_HOST if host in ("0.0.0.0", "", LOCAL_HOST) else ("::1" if host == "::" else host)
    return f"{_url_host(local)}:{superlink_args.port}"


def sidecar_command(superlink_args: argparse.Namespace, parent_pid: int | None = None) -> list[str] | None:
    port = metrics_port()
    if port is None:
        return None
    host = os.environ.get(HOST_ENV) or superlink_args.host or LOCAL_HOST
    cmd = [sys.executable, "-m", "fedtune.metrics", "--host", host, "--port", str(port)]
    cmd += ["--superlink", control_address(superlink_args)]
    if superlink_args.insecure:
        cmd.append("--insecure")
    else:
        ca = superlink_args.ssl_ca_certfile or os.path.join(superlink_args.certs_dir or ".", "ca.crt")
        cmd += ["--root-certificates", str(Path(ca).resolve())]
    return [*cmd, "--parent-pid", str(parent_pid or os.getpid())]


def start_sidecar(superlink_args: argparse.Namespace) -> int | None:
    """Spawn the exporter (same process group: it stops with the SuperLink); returns its pid."""
    cmd = sidecar_command(superlink_args)
    if cmd is None:
        return None
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True).pid


__all__ = ["PORT_ENV", "sidecar_command", "start_sidecar"]
