"""fedtune/sqlite_writes.py on the SuperLink's real SQLite LinkState (a state file, objects in memory, as
fedtune-superlink runs it): a write transaction holds the process's write turn from its first write until
SQLite has committed or rolled back, reads take none, concurrent writers lose no update; store_object
checks a chunk's hash once, before its transaction, and still refuses a corrupt one; off, nothing changes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from sqlalchemy import event
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Engine

from fedtune import sqlite_writes
from fedtune.sqlite_writes import turn

RUN_TRAFFIC = "UPDATE run SET bytes_recv = bytes_recv + 1 WHERE run_id = :run_id"


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The patch applied for the test; Flower's and SQLAlchemy's own back afterwards (shared process)."""
    for owner, name in ((SqlCoreState, "store_object"), (SQLiteDialect, "do_commit"),
                        (SQLiteDialect, "do_rollback")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    for store_class in (InMemoryObjectStore, SqlObjectStore):
        if "verify" in store_class.__dict__:
            monkeypatch.setattr(store_class, "verify", store_class.__dict__["verify"])
        else:
            monkeypatch.delattr(store_class, "verify", raising=False)
    monkeypatch.delenv(sqlite_writes.ENV, raising=False)
    assert sqlite_writes.take_turns_writing(5.0)
    yield
    if event.contains(Engine, "before_cursor_execute", sqlite_writes._take_before_first_write):
        event.remove(Engine, "before_cursor_execute", sqlite_writes._take_before_first_write)
    for store_class in (InMemoryObjectStore, SqlObjectStore):
        if isinstance(store_class.__dict__.get("verify"), sqlite_writes._VerifyUnlessChecked):
            delattr(store_class, "verify")


@pytest.fixture
def state(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    import flwr.superlink.config_loader as config_loader

    from superlink import flower_entry

    monkeypatch.setattr(config_loader, "ObjectStoreFactory", config_loader.ObjectStoreFactory)
    flower_entry.keep_objects_in_memory()
    _, state_factory = config_loader.get_objectstore_linkstate_factories(
        str(tmp_path / "state.db"), config_loader.get_federation_manager()
    )
    return state_factory.state()


def new_run(state: Any) -> tuple[int, int]:
    from flwr.supercore.utils import uint64_to_int64

    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    return run_id, uint64_to_int64(run_id)


def bytes_recv(state: Any, run_id: int) -> int:
    from flwr.supercore.utils import uint64_to_int64

    rows = state.query("SELECT bytes_recv FROM run WHERE run_id = :run_id", {"run_id": uint64_to_int64(run_id)})
    return int(rows[0]["bytes_recv"])


def test_a_write_holds_the_turn_until_sqlite_has_committed_and_reads_take_none(patched, state):
    run_id, row_id = new_run(state)
    assert turn.owner is None
    with state.session():
        assert bytes_recv(state, run_id) == 0
        assert turn.owner is None  # reading: no turn
        state.query(RUN_TRAFFIC, {"run_id": row_id})
        assert turn.owner == threading.get_ident()
        other = threading.Thread(target=lambda: results.append(turn.take(timeout=0.05)))
        results: list[bool] = []
        other.start()
        other.join()
        assert results == [False]  # another writer waits for it
        # a reader in another thread is not held up by the write in flight
        read: list[int] = []
        reader = threading.Thread(target=lambda: read.append(bytes_recv(state, run_id)))
        reader.start()
        reader.join(5)
        assert read == [0]  # the committed value: WAL readers do not wait for the writer
    assert turn.owner is None  # given back with the commit
    assert bytes_recv(state, run_id) == 1


def test_a_failed_write_transaction_gives_the_turn_back(patched, state):
    run_id, row_id = new_run(state)
    with pytest.raises(RuntimeError), state.session():
        state.query(RUN_TRAFFIC, {"run_id": row_id})
        assert turn.owner == threading.get_ident()
        raise RuntimeError("the handler failed mid-transaction")
    assert turn.owner is None
    assert bytes_recv(state, run_id) == 0  # rolled back


def test_concurrent_writers_lose_nothing_and_leave_no_turn_held(patched, state):
    run_id, _ = new_run(state)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(20):
                state.store_traffic(run_id, bytes_sent=0, bytes_recv=5)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert bytes_recv(state, run_id) == 16 * 20 * 5
    assert turn.owner is None and not sqlite_writes._holders


def pending_chunk(state: Any, run_id: int) -> tuple[str, str, bytes]:
    """A real chunk announced in a real push session, as Flower's push_messages leaves it."""
    from flwr.supercore.inflatable.inflatable_object import get_object_id

    content = Array(np.arange(65536, dtype=np.float32)).deflate()
    object_id = get_object_id(content)
    session_id = state.start_session(run_id)
    assert state.preregister_object_tree(ObjectTree(object_id=object_id, children=[]), session_id) == [object_id]
    return session_id, object_id, content


def test_store_object_hashes_a_chunk_once_before_its_transaction(patched, state, monkeypatch):
    import flwr.supercore.inflatable.inflatable_object as inflatable_object
    import flwr.supercore.object_store.in_memory_object_store as in_memory

    run_id, _ = new_run(state)
    session_id, object_id, content = pending_chunk(state, run_id)
    hashed_holding_the_turn: list[bool] = []
    real_hash = inflatable_object.get_object_id

    def hash_noting_the_turn(data: bytes) -> str:
        hashed_holding_the_turn.append(turn.owner is not None)
        return real_hash(data)

    monkeypatch.setattr(inflatable_object, "get_object_id", hash_noting_the_turn)
    monkeypatch.setattr(in_memory, "get_object_id", hash_noting_the_turn)
    assert state.store_object(run_id, session_id, object_id, content)
    assert hashed_holding_the_turn == [False]  # once, and not inside the write transaction
    assert state.object_store.get(object_id) == content
    assert state.object_store.verify  # the store's own setting is untouched outside that put


def test_a_corrupt_chunk_is_still_refused(patched, state):
    run_id, _ = new_run(state)
    session_id, object_id, content = pending_chunk(state, run_id)
    corrupt = content[:-1] + bytes([content[-1] ^ 1])
    assert not state.store_object(run_id, session_id, object_id, corrupt)
    assert state.object_store.get(object_id) == b""  # still on its way: the right content may come
    assert state.store_object(run_id, session_id, object_id, content)
    assert turn.owner is None


def test_a_store_made_not_to_verify_keeps_its_setting(patched):
    assert InMemoryObjectStore(verify=False).verify is False
    assert InMemoryObjectStore().verify is True


def test_switched_off_nothing_is_patched(monkeypatch):
    monkeypatch.setenv(sqlite_writes.ENV, "0")
    before = SqlCoreState.store_object, SQLiteDialect.do_commit
    assert not sqlite_writes.take_turns_writing(5.0)
    assert (SqlCoreState.store_object, SQLiteDialect.do_commit) == before
