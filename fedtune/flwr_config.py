"""The `flwr` CLI's connection entries, in `$FLWR_HOME/config.toml` (Flower >= 1.40 reads them there)."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.runtime_env import require_file


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_connection(
    flwr_home: str | os.PathLike[str],
    name: str,
    address: str,
    root_certificates: str | os.PathLike[str] | None,
    make_default: bool = True,
) -> Path:
    """Add/replace the connection `name` (TLS when `root_certificates` is given, else insecure)."""
    body = [f"address = {_toml_string(address)}"]
    if root_certificates is None:
        body.append("insecure = true")
    else:
        ca = require_file(root_certificates, "CA certificate").resolve()
        body.append(f"root-certificates = {_toml_string(str(ca))}")
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
    flwr_home: str | os.PathLike[str], name: str, body: list[str], make_default: bool
) -> Path:
    """Write connection `name` with `body` lines into config.toml, keeping the user's other connections."""
    home = Path(flwr_home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    entries: dict[str, list[str]] = {}
    default = name
    if path.is_file():
        import tomllib

        superlink = tomllib.loads(path.read_text()).get("superlink", {})
        if not make_default and isinstance(superlink.get("default"), str):
            default = superlink["default"]
        for other, other_body in superlink.items():
            if other != name and isinstance(other_body, dict):
                entries[other] = _render_table(other_body)
    entries[name] = body
    lines = ["[superlink]", f"default = {_toml_string(default)}", ""]
    for conn, conn_body in entries.items():
        lines += [f"[superlink.{conn}]", *conn_body, ""]
    path.write_text("\n".join(lines))
    return path


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return _toml_string(str(value))


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
    body = [f"address = {_toml_string(LOCAL_SIMULATION_ADDRESS)}"]
    return _upsert_connection(flwr_home, name, body, make_default)


def _render_table(body: dict[str, object], prefix: str = "") -> list[str]:
    """`key = value` lines of a TOML table, nested tables as dotted keys (e.g. a legacy `options`)."""
    lines: list[str] = []
    for key, value in body.items():
        if isinstance(value, dict):
            lines += _render_table(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {_render(value)}")
    return lines


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
