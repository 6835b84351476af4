"""The SuperLink's writes to its SQLite state take turns in the process, and a pushed object's hash is
checked before its write transaction, not inside it.

Flower 1.42 keeps the SuperLink's state in one SQLite file that its request threads (anyio's 40) write
side by side: per pushed chunk the object's claim and the run's traffic counter, per ServerApp reply poll
the expired task tokens, heartbeats. SQLite lets one writer in at a time, and a writer that finds the file
locked retries in SQLite's busy handler, sleeping 1, 2, 5, 10, ... up to 100 ms between tries: with 16
chunks being pushed at once a write waits long after the lock is free (an H200 host, 2 nodes uploading:
Flower's push_object handler 0.12 s median, 0.69 s at the 90th percentile, for 2-3 ms of SQL).
Here a write transaction waits for its turn in the process at its first INSERT/UPDATE/DELETE and gives the
turn back at commit or rollback, so writers queue in Python and each starts the moment the one before it
ends; when one of ours asks SQLite for the lock it is free. Reads take no turn (WAL lets them read beside
the writer). A turn not given within the busy timeout is not waited for longer: that write then meets
SQLite's lock as it would without this.

And Flower's `store_object` claims the object's row (SQLite's write lock from then on), then puts the object
into the store, which hashes it (sha256 of up to 5 MiB) and parses its head, then commits: every other
writer waits for that hash. Here the hash and head are checked first, outside the transaction and beside
other threads (hashlib runs without the GIL), and the put inside does not check that object again; content
that does not match its id is left to Flower's own path, which refuses it as before.

Applied by `superlink/flower_entry.py`; FEDTUNE_SQLITE_TURNS=0 keeps Flower's behaviour.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from fedtune.patching import wrap_once
from fedtune.runtime_env import env_tristate

ENV = "FEDTUNE_SQLITE_TURNS"
_PATCHED = "_fedtune_sqlite_turns"
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_VERIFY = "_fedtune_verify"  # where an object store's own `verify` setting lives once patched

log = logging.getLogger("fedtune.sqlite_writes")


class WriteTurn:
    """One writer at a time: re-entrant for its thread (Flower may write through two connections in one
    thread), and given back by whichever thread ends the transaction (a connection returned elsewhere)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.owner: int | None = None
        self._depth = 0

    def take(self, timeout: float) -> bool:
        me = threading.get_ident()
        with self._changed:
            if not self._changed.wait_for(lambda: self.owner in (None, me), timeout):
                return False
            self.owner, self._depth = me, self._depth + 1
            return True

    def give_back(self) -> None:
        with self._changed:
            self._depth = max(self._depth - 1, 0)
            if self._depth == 0:
                self.owner = None
                self._changed.notify()


turn = WriteTurn()
_checked = threading.local()  # .active: this thread is storing an object whose content it has checked


def is_write(statement: str) -> bool:
    return statement.lstrip()[:7].upper().startswith(_WRITES)


def _dbapi(connection: Any) -> Any:
    """The sqlite3 connection under SQLAlchemy's pool wrapper (or itself)."""
    return getattr(connection, "dbapi_connection", None) or connection


def _take_before_first_write(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if conn.dialect.name != "sqlite" or not is_write(statement):
        return
    key = id(_dbapi(conn.connection))
    if key in _holders:
        return
    if turn.take(_turn_timeout_s):
        _holders.add(key)
    else:
        log.warning("no SQLite write turn within %.0f s: writing without one", _turn_timeout_s)


def _ending_the_transaction(end: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """The dialect's do_commit / do_rollback (every transaction ends in one, a pool reset included), then
    the turn is given back: only once SQLite has let go of its lock."""

    def end_then_give_back(dialect: Any, dbapi_connection: Any) -> None:
        try:
            end(dialect, dbapi_connection)
        finally:
            key = id(_dbapi(dbapi_connection))
            if key in _holders:
                _holders.discard(key)
                turn.give_back()

    return end_then_give_back


_holders: set[int] = set()  # id()s of the sqlite3 connections whose transaction holds the turn
_turn_timeout_s = 60.0


class _VerifyUnlessChecked:
    """An object store's `verify`: its own setting, except False while this thread stores the object whose
    hash and head it has just checked."""

    def __get__(self, store: Any, owner: Any = None) -> Any:
        if store is None:
            return self
        own = store.__dict__.get(_VERIFY, store.__dict__.get("verify", True))
        return bool(own) and not getattr(_checked, "active", False)

    def __set__(self, store: Any, value: bool) -> None:
        store.__dict__[_VERIFY] = value


def content_matches(object_id: str, content: bytes) -> bool:
    """What the object store's put checks: the content hashes to its id and has a well-formed head."""
    from flwr.supercore.inflatable.inflatable_object import get_object_id
    from flwr.supercore.inflatable.inflatable_utils import validate_object_content

    try:
        validate_object_content(content)
    except Exception:  # Flower's own path then refuses it, with its own log line
        return False
    return get_object_id(content) == object_id


def _checking_first(store_object: Callable[..., bool]) -> Callable[..., bool]:
    def store_object_checked_first(
        state: Any, run_id: int, session_id: str, object_id: str, object_content: bytes
    ) -> bool:
        if not content_matches(object_id, object_content):
            return store_object(state, run_id, session_id, object_id, object_content)
        _checked.active = True
        try:
            return store_object(state, run_id, session_id, object_id, object_content)
        finally:
            _checked.active = False

    return store_object_checked_first


def enabled() -> bool:
    return env_tristate(ENV) is not False  # on unless set to 0/false


def take_turns_writing(busy_timeout_s: float) -> bool:
    """Patch this process (idempotent): SQLite write turns, and store_object's check outside its
    transaction. `busy_timeout_s`: the longest a write waits for its turn. False when switched off."""
    if not enabled():
        return False
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from sqlalchemy import event
    from sqlalchemy.dialects.sqlite.base import SQLiteDialect
    from sqlalchemy.engine import Engine

    global _turn_timeout_s
    _turn_timeout_s = busy_timeout_s
    if not event.contains(Engine, "before_cursor_execute", _take_before_first_write):
        event.listen(Engine, "before_cursor_execute", _take_before_first_write)
    for end in ("do_commit", "do_rollback"):
        wrap_once(SQLiteDialect, end, _ending_the_transaction, _PATCHED)
    for store_class in (InMemoryObjectStore, SqlObjectStore):
        if not isinstance(store_class.__dict__.get("verify"), _VerifyUnlessChecked):
            store_class.verify = _VerifyUnlessChecked()  # type: ignore[assignment]
    wrap_once(SqlCoreState, "store_object", _checking_first, _PATCHED)
    return True
