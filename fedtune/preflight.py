"""Launcher input checks shared by the roles: numbers from flags and environment variables, and an
argument parser whose errors are one line (`error: ...`, exit 2) like every other fedtune error."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import NoReturn

from fedtune.errors import FedTuneError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a FedTuneError (one line via one_line_errors), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise FedTuneError(f"{self.prog}: {message}")


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise FedTuneError(f"{what} must be an integer, got {text!r}") from None


def port(text: str | int, what: str = "port", allow_zero: bool = False) -> int:
    """A TCP port number (1-65535; 0 too where it means "off")."""
    value = text if isinstance(text, int) else _int(str(text), what)
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise FedTuneError(f"{what} must be a TCP port ({low}-65535), got {value}")
    return value


def port_arg(text: str) -> int:
    """argparse `type=` for a port flag (the parser names the flag in its message)."""
    try:
        return port(text)
    except FedTuneError as err:
        raise argparse.ArgumentTypeError(str(err).replace("port must", "must")) from None


def port_or_zero_arg(text: str) -> int:
    try:
        return port(text, allow_zero=True)
    except FedTuneError as err:
        raise argparse.ArgumentTypeError(str(err).replace("port must", "must")) from None


def env_int(name: str, default: int | None = None) -> int | None:
    """An integer environment variable (unset or empty: `default`); anything else is one clear line."""
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    return _int(value, name)


def env_seconds(
    name: str, default: float, low: float, high: float, env: Mapping[str, str] = os.environ
) -> float:
    """A duration in seconds from an environment variable (unset or empty: `default`), `low` to `high`."""
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise FedTuneError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise FedTuneError(f"{name} must be from {low:g} to {high:g} s, got {value:g}")
    return value


def env_port(name: str, default: int, allow_zero: bool = False) -> int:
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    return port(value, name, allow_zero=allow_zero)
