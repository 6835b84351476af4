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
    home = Path(flwr_home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    entries: dict[str, list[str]] = {}
    default = name
    if path.is_file():  # keep the user's other connections
        import tomllib

        existing = tomllib.loads(path.read_text())
        superlink = existing.get("superlink", {})
        if not make_default and isinstance(superlink.get("default"), str):
            default = superlink["default"]
        for other, body in superlink.items():
            if other != name and isinstance(body, dict):
                entries[other] = [f"{k} = {_render(v)}" for k, v in body.items()]
    body = [f"address = {_toml_string(address)}"]
    if root_certificates is None:
        body.append("insecure = true")
    else:
        ca = require_file(root_certificates, "CA certificate").resolve()
        body.append(f"root-certificates = {_toml_string(str(ca))}")
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
