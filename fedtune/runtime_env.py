"""Process environment shared by every role that runs flwr."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from fedtune.errors import FedTuneError

# flwr phones home (telemetry, update check) unless told not to; no fedtune process may.
FLWR_QUIET_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# How many objects (chunks of an adapter, below) one Flower process pushes or pulls at a time: Flower's
# default is 2, capped by the CPU count. A 77 MB adapter is 5-16 chunks, each its own HTTPS request whose
# latency (proxy, SuperLink handler, hashing) dominates on a fast link; more in flight hide it. Set either
# variable to override (bench.federation --transfer-concurrency measures it).
TRANSFER_CONCURRENCY_ENV: Mapping[str, str] = {
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}

# The size of the objects Flower cuts each array into. Every object costs the SuperLink a request's worth of
# work whatever its size (its HTTP middleware, SQL for run status, object claim and traffic, node
# authentication) on one Python process for every node, yet fewer objects also move less in parallel: on an
# H200 host 16 MiB made a reference round's non-training 7.1 s against 5.4-6.0 s with 5 MiB (the ServerApp's
# push 1.95 s against 0.90 s; bench/RESULTS.md session 8), so the default stays Flower's 5 MiB. Larger
# chunks are safe on slow links since the SuperLink outlasts the proxy's keep-alive (superlink/proxy.py).
# Read by every process that sends arrays (the ServerApp, the ClientApp); a receiver takes any size. Capped
# below the proxy's request limit (superlink/proxy.py).
CHUNK_ENV = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"
DEFAULT_CHUNK_BYTES = 5 * 2**20  # Flower's own
MAX_CHUNK_BYTES = 24 * 2**20  # superlink/proxy.py refuses requests over 32 MiB


def chunk_bytes(env: Mapping[str, str]) -> int:
    """The array chunk size `env` sets, checked: a whole number of bytes, 64 KiB to 24 MiB."""
    raw = env.get(CHUNK_ENV, "").strip()
    if not raw:
        return DEFAULT_CHUNK_BYTES
    if not raw.isdigit() or not 2**16 <= int(raw) <= MAX_CHUNK_BYTES:
        raise FedTuneError(
            f"{CHUNK_ENV} must be a number of bytes from {2**16} to {MAX_CHUNK_BYTES}, got {raw!r}"
        )
    return int(raw)


def flwr_env(base: Mapping[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    """A copy of `base` (default: os.environ) with telemetry and update checks off and fedtune's transfer
    settings where `base` has none."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_QUIET_ENV)
    for name, value in TRANSFER_CONCURRENCY_ENV.items():
        env.setdefault(name, value)
    # flwr starts flwr-serverapp / flwr-clientapp by name: our interpreter's bin folder comes first,
    # so a venv works without being "activated".
    path = env.get("PATH", os.defpath).split(os.pathsep)
    if _BIN_DIR not in path:
        env["PATH"] = os.pathsep.join([_BIN_DIR, *path])
    env.update(extra)
    env[CHUNK_ENV] = str(chunk_bytes(env))
    return env


_BIN_DIR = os.path.dirname(sys.executable)


def find_executable(name: str) -> str:
    """`name` next to this interpreter (a venv's bin) or on PATH; one clear line if absent."""
    found = shutil.which(name, path=flwr_env()["PATH"])
    if found is None:
        raise FedTuneError(f"{name} not found on PATH; install fedtune's dependencies (flwr)")
    return found


def silence_flwr() -> None:
    """Set the quiet flags in this process (before flwr is imported where possible)."""
    os.environ.update(FLWR_QUIET_ENV)


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return `path` as a Path, or fail with one line saying which file is missing."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FedTuneError(f"{what} not found: {resolved}")
    return resolved


_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """A boolean environment variable (1/true/yes/on); launchers read every flag's default this way."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def env_tristate(name: str) -> bool | None:
    """True/False when the variable says so, None (= the flag's own default) when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    return None if not value else value in _TRUE


def passthrough(extra: list[str] | None) -> list[str]:
    """Arguments after `--` on a launcher's command line, handed to the flwr program as they are."""
    extra = list(extra or [])
    return extra[1:] if extra[:1] == ["--"] else extra

