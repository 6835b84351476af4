"""`flower-superlink` with a longer SQLite busy timeout.

Flower 1.42 keeps the SuperLink state (including message payloads) in SQLite with a 5 s busy timeout.
On a loaded host, concurrent pushes of multi-megabyte adapters can hold the write lock longer than
that; the SuperLink then answers 500 and the ServerApp's run fails ("database is locked"). We wait
longer instead (FEDTUNE_SQLITE_BUSY_TIMEOUT_MS, default 60 s); everything else is Flower's own CLI.
"""

from __future__ import annotations

import os
import sys
from typing import Any, cast

DEFAULT_BUSY_TIMEOUT_MS = 60_000


def main() -> None:
    import flwr.supercore.sql_mixin as sql_mixin
    from flwr.superlink.cli import flower_superlink

    from fedtune.logs import run_with_logging

    timeout_ms = int(os.environ.get("FEDTUNE_SQLITE_BUSY_TIMEOUT_MS", DEFAULT_BUSY_TIMEOUT_MS))
    # read per connection by sql_mixin._set_sqlite_pragmas, so replacing the module global suffices
    cast(Any, sql_mixin).SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    run_with_logging(flower_superlink, ["flower-superlink", *sys.argv[1:]])


if __name__ == "__main__":
    main()
