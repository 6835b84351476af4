"""fedtune/object_waits.py: a pull of an object on its way waits for it at the store (the SuperLink's real
SQLite LinkState with its in-memory object store, the SuperNode's in-memory NodeState), returns empty once
its wait is over or when too many wait already, and FEDTUNE_OBJECT_WAIT_SECONDS=0 keeps Flower's answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.inflatable.inflatable_object import get_object_id
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from fedtune import object_waits
from fedtune.errors import FedTuneError
from tests.superlink_state import superlink_linkstate

RUN_ID = 7


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own methods come back after the test (they are this process's, shared by every test)."""
    for cls, name in ((InMemoryObjectStore, "put"), (SqlObjectStore, "put"),
                      (InMemoryCoreState, "get_object"), (SqlCoreState, "get_object")):
        monkeypatch.setattr(cls, name, getattr(cls, name))


def supernode_state(_tmp_path: Any, _monkeypatch: pytest.MonkeyPatch) -> Any:
    return InMemoryNodeState(InMemoryObjectStore())


@pytest.fixture(params=[superlink_linkstate, supernode_state], ids=["superlink", "supernode"])
def state(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield request.param(tmp_path, monkeypatch)


def chunk() -> tuple[str, bytes]:
    """One real Flower object (an Array, as an adapter's chunk is) announced but not yet pushed."""
    content = Array(np.arange(4096, dtype=np.float32)).deflate()
    return get_object_id(content), content


def announce(state: Any, object_id: str) -> None:
    state.object_store.preregister(RUN_ID, ObjectTree(object_id=object_id, children=[]))


def put_later(state: Any, object_id: str, content: bytes, after_s: float) -> threading.Timer:
    timer = threading.Timer(after_s, state.object_store.put, (object_id, content))
    timer.start()
    return timer


def test_flower_answers_not_yet_and_a_patched_pull_waits_for_the_chunk(restored, state, monkeypatch):
    object_id, content = chunk()
    announce(state, object_id)
    assert state.get_object(RUN_ID, object_id) == b""  # Flower's: on its way, come back later

    monkeypatch.setenv(object_waits.OBJECT_WAIT_ENV, "5")
    assert object_waits.wait_for_objects_in_pulls() == 5.0
    assert object_waits.wait_for_objects_in_pulls() == 5.0  # idempotent: one wrapper, not two
    timer = put_later(state, object_id, content, 0.3)
    assert state.get_object(RUN_ID, object_id) == content  # the same pull, answered when the chunk came
    timer.join()
    assert state.get_object(RUN_ID, object_id) == content  # there already: answered at once


def test_a_chunk_that_does_not_come_leaves_the_pull_empty(restored, state, monkeypatch):
    object_id, _ = chunk()
    announce(state, object_id)
    monkeypatch.setenv(object_waits.OBJECT_WAIT_ENV, "0.2")
    object_waits.wait_for_objects_in_pulls()
    assert state.get_object(RUN_ID, object_id) == b""  # after its wait: the caller retries
    assert state.get_object(RUN_ID, "0" * 64) is None  # unknown: Flower's "not found", no wait


def test_pulls_beyond_the_waiter_limit_answer_at_once(restored, state, monkeypatch):
    object_id, content = chunk()
    announce(state, object_id)
    monkeypatch.setenv(object_waits.OBJECT_WAIT_ENV, "5")
    object_waits.wait_for_objects_in_pulls()
    taken = [object_waits._waiters.acquire(blocking=False) for _ in range(object_waits.MAX_WAITERS)]
    try:
        assert all(taken)
        timer = put_later(state, object_id, content, 0.5)
        assert state.get_object(RUN_ID, object_id) == b""  # no slot: did not wait for the put above
        timer.join()
    finally:
        for _ in taken:
            object_waits._waiters.release()
    assert state.get_object(RUN_ID, object_id) == content


def test_zero_keeps_flowers_methods(restored, monkeypatch):
    monkeypatch.setenv(object_waits.OBJECT_WAIT_ENV, "0")
    before = SqlCoreState.get_object
    assert object_waits.wait_for_objects_in_pulls() == 0.0
    assert SqlCoreState.get_object is before


@pytest.mark.parametrize("raw", ["soon", "-1", "11"])
def test_a_bad_wait_is_one_line(monkeypatch, raw):
    monkeypatch.setenv(object_waits.OBJECT_WAIT_ENV, raw)
    with pytest.raises(FedTuneError, match=f"FEDTUNE_OBJECT_WAIT_SECONDS must be .*{raw}"):
        object_waits.object_wait_seconds()
