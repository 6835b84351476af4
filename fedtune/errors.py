"""One exception type for everything a user can get wrong: printed as one line, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar, cast

F = TypeVar("F", bound=Callable[..., object])


class FedTuneError(Exception):
    """Bad input, bad config or a missing file: the message names what to fix."""


def one_line_errors(func: F) -> F:
    """Turn FedTuneError into `error: ...` on stderr and exit 2 instead of a traceback."""

    @wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except FedTuneError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return cast(F, wrapper)  # same signature: functools.wraps
