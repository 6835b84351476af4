"""The `flwr` CLI's connection entries, in `$FLWR_HOME/config.toml` (Flower >= 1.40 reads them there)."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune import toml_io
from fedtune.runtime_env import require_file


def write_connection(
    flwr_home: str | os.PathLike[str],
    name: str,
    address: str,
    root_certificates: str | os.PathLike[str] | None,
    make_default: bool = True,
) -> Path:
    """Add/replace the connection `name` (TLS when `root_certificates` is given, else insecure)."""
    body: dict[str, object] = {"address": address}
    if root_certificates is None:
        body["insecure"] = True
    else:
        body["root-certificates"] = str(require_file(root_certificates, "CA certificate").resolve())
    return _upsert_connection(flwr_home, name, body, make_default)


# The operator's connection on the SuperLink host (or `docker compose exec superlink`, `kubectl exec` into
# the SuperLink pod): the SuperLink itself on loopback. Its public port is the Fleet-only proxy, which
# answers 403 to the Control API `flwr` speaks (superlink/proxy.py).
OPERATOR_CONNECTION = "remote-deployment"
OPERATOR_ADDRESS = "127.0.0.1:9000"


def write_operator_connection(
    flwr_home: str | os.PathLike[str],
    root_certificates: str | os.PathLike[str],
    name: str = OPERATOR_CONNECTION,
    address: str = OPERATOR_ADDRESS,
    make_default: bool = True,
) -> Path:
    """`flwr run . remote-deployment` from the SuperLink host: TLS to 127.0.0.1:9000 (the internal port)."""
    return write_connection(flwr_home, name, address, root_certificates, make_default)


def _upsert_connection(
    flwr_home: str | os.PathLike[str], name: str, body: dict[str, object], make_default: bool
) -> Path:
    """Write connection `name` into config.toml (atomically), keeping everything else the file holds."""
    path = Path(flwr_home).expanduser() / "config.toml"
    data = toml_io.read(path) if path.is_file() else {}
    table = data.get("superlink")
    superlink: dict[str, object] = table if isinstance(table, dict) else {}
    default = None if make_default else superlink.get("default")
    others = {k: v for k, v in superlink.items() if k not in ("default", name)}
    data["superlink"] = {"default": default if isinstance(default, str) else name, **others, name: body}
    return toml_io.write(path, data)


# -- local simulation ------------------------------------------------------------------------------
LOCAL_SIMULATION = "local-simulation"
# Flower's magic address: `flwr` starts (once, detached) a local `flower-superlink --simulation` on
# 127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (default 39091) and runs the app on virtual SuperNodes.
LOCAL_SIMULATION_ADDRESS = ":local:"


def write_simulation_connection(
    flwr_home: str | os.PathLike[str], name: str = LOCAL_SIMULATION, make_default: bool = False
) -> Path:
    """Add/replace the connection `name` for Flower's simulation engine (`flwr run . local-simulation`).

    The number of virtual SuperNodes and the Ray resources are given per run with
    `flwr run ... --federation-config "num-supernodes=20 client-resources-num-cpus=1"`
    (the connection's older `options.*` keys are deprecated in Flower 1.42)."""
    return _upsert_connection(flwr_home, name, {"address": LOCAL_SIMULATION_ADDRESS}, make_default)


def main(argv: list[str] | None = None) -> int:
    """`python -m fedtune.flwr_config [--flwr-home DIR] [--name NAME] [--default]`: write the
    local-simulation connection into $FLWR_HOME/config.toml (default ~/.flwr)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedtune.flwr_config", description=main.__doc__)
    parser.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME", "~/.flwr"))
    parser.add_argument("--name", default=LOCAL_SIMULATION)
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    args = parser.parse_args(argv)
    path = write_simulation_connection(args.flwr_home, args.name, make_default=args.default)
    print(f"connection {args.name!r} (Flower simulation engine) written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
