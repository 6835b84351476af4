"""TOML in and out: run-config files (nested tables ↔ Flower's flat dotted keys) and config files we write."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.atomic import write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


def loads(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def write(path: str | os.PathLike[str], data: Mapping[str, Any], mode: int = 0o666) -> Path:
    """Write `data` as TOML, atomically (fedtune.atomic)."""
    return write_text(path, tomli_w.dumps(dict(data)), mode)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys, the shape of `context.run_config` (`{"train": {"seq-length": 1}}` →
    `{"train.seq-length": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_flat(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run-config TOML file (as given to `flwr run --run-config`) as flat dotted keys."""
    return flatten(read(path))
