"""`flower-superlink` with a longer SQLite busy timeout, message objects kept in memory and each run's
ServerApp process started ahead.

Flower 1.42 keeps the SuperLink state in SQLite with a 5 s busy timeout. On a loaded host, concurrent
pushes of multi-megabyte adapters can hold the write lock longer than that; the SuperLink then answers 500
and the ServerApp's run fails ("database is locked"). We wait longer instead (FEDTUNE_SQLITE_BUSY_TIMEOUT_MS,
default 60 s).

With a state file, Flower also writes every message object (each 5 MiB chunk of every adapter, four 77 MB
messages per node and round for the 8B reference) into that file and reads it back. Those objects belong to
runs in flight only, and a run in flight does not survive a SuperLink restart (it ends `finished:failed`;
resuming starts a new run from the ServerApp's checkpoint), so nothing is lost by keeping them in memory:
FEDTUNE_OBJECT_STORE=memory (the default) uses Flower's in-memory object store beside the SQLite state —
runs, node keys and logs stay in the file. `database` keeps Flower's behaviour.

The SuperLink starts its SuperExec as `flower-superexec`; we start `fedtune.prestart serverapp`
instead (the same CLI, with the next run's ServerApp process started and its imports done before the run
is submitted: 15-21 s on an H200 host) unless FEDTUNE_SERVERAPP_PRESTART=0.

A pull of an object still on its way (a node's download running alongside the ServerApp's push, the
ServerApp's pull of a reply being uploaded) waits for it at the store instead of coming back empty for a
retry (fedtune.object_waits; FEDTUNE_OBJECT_WAIT_SECONDS, 0 for Flower's behaviour).

A poll for messages that finds none (the ServerApp's for replies, an idle SuperNode's for its next
instruction) waits at the SuperLink for one to be stored, instead of coming back empty to be asked again
(fedtune.poll_waits; FEDTUNE_REPLY_WAIT_SECONDS and FEDTUNE_NODE_POLL_WAIT_SECONDS, 0 for Flower's).

Flower's middleware sees each request body whole instead of in 64 KiB pieces (fedtune.whole_body;
FEDTUNE_WHOLE_BODY=0 for Flower's stack as it is), and its Control- and Fleet-only layers see only their own
API's requests (fedtune.middleware_scope; FEDTUNE_SCOPED_MIDDLEWARE=0 for Flower's). The state's sweep of
expired task tokens, which Flower runs before every run-status check (so on every object request), runs at
most once a second (fedtune.token_cleanup; FEDTUNE_TOKEN_CLEANUP_SECONDS=0 for Flower's).

Flower runs uvicorn with its 5 s keep-alive; ours is SUPERLINK_KEEP_ALIVE_S, so the Fleet proxy always
closes an idle connection first (superlink/proxy.py says why). Everything else is Flower's own CLI.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType, SimpleNamespace
from typing import Any, cast

from fedtune.errors import one_line_errors
from superlink.proxy import SUPERLINK_KEEP_ALIVE_S

DEFAULT_BUSY_TIMEOUT_MS = 60_000
OBJECT_STORE_ENV = "FEDTUNE_OBJECT_STORE"
OBJECT_STORES = ("memory", "database")
PRESTART_ENV = "FEDTUNE_SERVERAPP_PRESTART"


def object_store() -> str:
    value = os.environ.get(OBJECT_STORE_ENV, "").strip() or OBJECT_STORES[0]
    if value not in OBJECT_STORES:
        choices = ", ".join(OBJECT_STORES)
        raise SystemExit(f"error: {OBJECT_STORE_ENV} must be one of {choices}, got {value!r}")
    return value


def keep_objects_in_memory() -> None:
    """Flower's config loader builds the object store from `--database`; give it the in-memory one."""
    import flwr.superlink.config_loader as config_loader
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    cast(Any, config_loader).ObjectStoreFactory = lambda _database: ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)


def outlast_the_proxy(superlink_cli: ModuleType) -> None:
    """Flower's `uvicorn.run(...)` (its only use of uvicorn), with our keep-alive."""
    import functools

    import uvicorn

    run = functools.partial(uvicorn.run, timeout_keep_alive=SUPERLINK_KEEP_ALIVE_S)
    cast(Any, superlink_cli).uvicorn = SimpleNamespace(run=run)


@one_line_errors
def main() -> None:
    import importlib

    import flwr.supercore.sql_mixin as sql_mixin

    from fedtune.logs import run_with_logging
    from fedtune.middleware_scope import scope_superlink_middleware
    from fedtune.object_waits import wait_for_objects_in_pulls
    from fedtune.poll_waits import wait_in_polls
    from fedtune.prestart import prestarting_subprocess
    from fedtune.runtime_env import env_tristate
    from fedtune.token_cleanup import sweep_tokens_once_a_second
    from fedtune.whole_body import read_bodies_whole_in_superlink

    timeout_ms = int(os.environ.get("FEDTUNE_SQLITE_BUSY_TIMEOUT_MS", DEFAULT_BUSY_TIMEOUT_MS))
    # read per connection by sql_mixin._set_sqlite_pragmas, so replacing the module global suffices
    cast(Any, sql_mixin).SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    if object_store() == "memory":
        keep_objects_in_memory()
    wait_for_objects_in_pulls()
    wait_in_polls()
    read_bodies_whole_in_superlink()
    scope_superlink_middleware()
    sweep_tokens_once_a_second()
    # the module, not the function of the same name its package exports
    superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    outlast_the_proxy(superlink_cli)
    if env_tristate(PRESTART_ENV) is not False:  # on unless set to 0/false
        cast(Any, superlink_cli).subprocess = prestarting_subprocess("flwr-serverapp")
    run_with_logging(superlink_cli.flower_superlink, ["flower-superlink", *sys.argv[1:]])


if __name__ == "__main__":
    main()
