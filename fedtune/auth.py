"""SuperNode authentication keys: one ECDSA P-384 key pair per SuperNode, registered with the SuperLink.

With `fedtune-superlink` (auth is on by default over TLS) only SuperNodes whose public keys were
registered may join; each SuperNode proves it holds its private key (`fedtune-supernode --auth-key`).

    fedtune-keys generate --out keys supernode-0 supernode-1   # keys/supernode-0 (+ .pub), ...
    fedtune-keys register keys/supernode-0.pub keys/supernode-1.pub --connection CONNECTION

Private keys are OpenSSH format (what `flower-supernode --auth-supernode-private-key` reads), mode 0600;
public keys are OpenSSH `ecdsa-sha2-nistp384 ...` lines (what `flwr supernode register` reads).
Generating again reuses a valid existing pair, so containers and scripts can run it on every start.
Registering a key that is already registered is not an error (the SuperLink keeps its node id).
On Kubernetes the Helm chart mints the keys inside the cluster instead (`fedtune-k8s-keys`,
fedtune/k8s_keys.py), with the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.atomic import write_bytes
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.keygen import is_fedtune_key, new_private_key
from fedtune.runtime_env import find_executable, flwr_env, require_file

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ALREADY_REGISTERED = ("already in use", "already registered", "already exists")


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str], name: str) -> NodeKey:
        root = Path(directory)
        return cls(root / name, root / f"{name}.pub")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise FedTuneError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (e.g. supernode-0)")
    return name


def parse_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """An OpenSSH ECDSA private key from bytes, exactly as flower-supernode parses it; one line if not."""
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise FedTuneError(f"not an unencrypted OpenSSH private key: {source} ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedTuneError(f"{source}: SuperNode auth needs an ECDSA key, got {type(key).__name__}")
    return key


def parse_public_key(data: bytes, source: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH `ecdsa-sha2-nistp*` public key line, as `flwr supernode register` reads it."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise FedTuneError(f"not an OpenSSH public key: {source} ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedTuneError(f"{source}: SuperNode auth needs an ECDSA key, got {type(key).__name__}")
    return key


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The SuperNode's private key, exactly as flower-supernode will parse it; one line if it can't."""
    return parse_private_key(require_file(path, "SuperNode auth key").read_bytes(), str(path))


def load_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    return parse_public_key(require_file(path, "SuperNode public key").read_bytes(), str(path))


def private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted OpenSSH PEM, what `flower-supernode --auth-supernode-private-key` reads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def public_key_line(key: ec.EllipticCurvePublicKey, comment: str) -> bytes:
    """One `ecdsa-sha2-nistp384 AAAA... COMMENT` line, what `flwr supernode register` reads."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + (
        f" {comment}\n".encode()
    )


def _matching_pair(pair: NodeKey) -> bool:
    if not (pair.private_key.is_file() and pair.public_key.is_file()):
        return False
    try:
        private, public = load_private_key(pair.private_key), load_public_key(pair.public_key)
    except FedTuneError:
        return False
    return (
        is_fedtune_key(private)
        and private.public_key().public_numbers() == public.public_numbers()
    )


def generate(out_dir: str | os.PathLike[str], name: str, force: bool = False) -> tuple[NodeKey, bool]:
    """Write `<out_dir>/<name>` (private) and `<name>.pub`; reuse a valid pair. Returns (pair, generated)."""
    pair = NodeKey.in_dir(out_dir, check_name(name))
    pair.private_key.parent.mkdir(parents=True, exist_ok=True)
    if not force and _matching_pair(pair):
        return pair, False
    key = None if force else _existing_private_key(pair.private_key)
    generated = key is None
    if key is None:
        key = new_private_key()
        write_bytes(pair.private_key, private_key_bytes(key), mode=0o600)
    # A lost or stale .pub is re-derived: a registered node must never get a new identity by accident.
    write_bytes(pair.public_key, public_key_line(key.public_key(), f"fedtune-{name}"))
    return pair, generated


def _existing_private_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    if not path.is_file():
        return None
    try:
        key = load_private_key(path)
    except FedTuneError:
        return None
    return key if is_fedtune_key(key) else None


def public_key_of(private_key: str | os.PathLike[str]) -> Path:
    """`KEY.pub` next to `KEY`, (re)derived from the private key when absent."""
    path = Path(private_key)
    public = path.with_name(f"{path.name}.pub")
    if not public.is_file():
        write_bytes(public, public_key_line(load_private_key(path).public_key(), f"fedtune-{path.name}"))
    return public


def register(
    public_key: str | os.PathLike[str],
    connection: str,
    flwr_home: str | os.PathLike[str] | None = None,
    name: str | None = None,
    timeout: float = 120.0,
) -> int | None:
    """`flwr supernode register`: the node id, or None when the key was registered before."""
    path = require_file(public_key, "SuperNode public key")
    load_public_key(path)  # fail here, with one line, rather than inside flwr
    cmd = [find_executable("flwr"), "supernode", "register", str(path), connection, "--format", "json"]
    if name:
        cmd += ["--name", name]
    env = flwr_env(**({"FLWR_HOME": str(flwr_home)} if flwr_home else {}))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    output = f"{done.stdout}\n{done.stderr}"
    try:
        payload = json.loads(done.stdout)
    except json.JSONDecodeError:
        payload = {}
    if done.returncode == 0 and payload.get("success", True) and payload.get("node-id") is not None:
        return int(payload["node-id"])
    if any(marker in output.lower() for marker in ALREADY_REGISTERED):
        return None
    message = payload.get("error-message") or " ".join(output.split())[-400:]
    raise FedTuneError(f"registering {path} with connection {connection!r} failed: {message}")


def _cmd_generate(args: argparse.Namespace) -> None:
    for name in args.names:
        pair, generated = generate(args.out, name, force=args.force)
        verb = "generated" if generated else "reusing"
        print(f"{verb} {pair.private_key} (private, keep on the SuperNode) and {pair.public_key} (register)")


def _cmd_register(args: argparse.Namespace) -> None:
    for key in args.public_keys:
        path = Path(key)
        if path.suffix != ".pub" and path.with_name(f"{path.name}.pub").is_file():
            path = path.with_name(f"{path.name}.pub")
        node_id = register(path, args.connection, args.flwr_home, name=path.stem if args.named else None)
        if node_id is None:
            print(f"{path}: already registered")
        else:
            print(f"{path}: registered as node {node_id}")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune-keys", description="SuperNode authentication keys (ECDSA P-384): generate, register."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one key pair per SuperNode name (reused if valid)")
    gen.add_argument("names", nargs="+", help="SuperNode names, e.g. supernode-0 (file names of the keys)")
    gen.add_argument("--out", default=os.environ.get("FEDTUNE_KEYS_DIR", "keys"))
    gen.add_argument("--force", action="store_true", help="replace existing keys")
    gen.set_defaults(func=_cmd_generate)
    reg = sub.add_parser("register", help="register public keys with the SuperLink (flwr supernode register)")
    reg.add_argument("public_keys", nargs="+", help="KEY.pub files (or the private key next to them)")
    reg.add_argument(
        "--connection", required=True, help="a SuperLink connection in $FLWR_HOME/config.toml"
    )
    reg.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME"), help="default: $FLWR_HOME")
    reg.add_argument("--named", action="store_true", help="register each key under its file name")
    reg.set_defaults(func=_cmd_register)
    args = parser.parse_args(argv)
    args.func(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
