"""fedtune/store_on_arrival.py: Flower's own SuperNode receive step (`_pull_and_store_message`, real
InMemoryNodeState and object store) puts each object into the store as it arrives, so a ClientApp's pull can
get the first chunks while the last is still on its way; a corrupt object fails the download as Flower's
does; FEDTUNE_STORE_ON_ARRIVAL=0 keeps Flower's all-at-the-end order."""

from __future__ import annotations

import threading
from typing import Any

import flwr.supernode.start_client_internal as internal
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from fedtune import store_on_arrival

RUN_ID = 7


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's functions come back after the test (this process's, shared by every test)."""
    for name in ("_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(internal, name, getattr(internal, name))


def round_message() -> tuple[Message, dict[str, bytes]]:
    """A message like a round's: one ArrayRecord whose 12 MiB array Flower cuts into 5 MiB chunks."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, 1  # as in a ServerApp
    arrays = ArrayRecord({"adapter": Array(np.arange(3 * 2**20, dtype=np.float32))})
    message = Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    return message, contents


def receive_with(message: Message, pull_object: Any, store: InMemoryObjectStore) -> tuple[Any, Any]:
    """Run Flower's receive step for `message` on a fresh node state over `store`; (state, its result)."""
    state = InMemoryNodeState(store)
    state.store_run(Run.create_empty(RUN_ID))
    tree = get_object_tree(message)
    result = internal._pull_and_store_message(  # pylint: disable=protected-access
        state=state,
        object_store=store,
        node_config={},
        receive=lambda: (remove_content_from_message(message), tree),
        get_run=lambda run_id: pytest.fail("the run is known"),
        get_fab=lambda fab_hash, run_id: pytest.fail("the run is known"),
        pull_object=pull_object,
        confirm_message_received=lambda run_id, message_id: None,
        trusted_entities=None,
    )
    return state, result


def test_each_object_is_in_the_store_while_the_last_is_still_coming(restored, monkeypatch):
    monkeypatch.delenv(store_on_arrival.ENV, raising=False)
    assert store_on_arrival.store_downloads_on_arrival()
    message, contents = round_message()
    chunks = [oid for oid, content in contents.items() if len(content) > 2**20]
    assert len(chunks) >= 2  # Flower cut the array: the test needs a first and a last chunk
    last = chunks[-1]
    seen_while_last_pending: dict[str, bytes | None] = {}
    store = InMemoryObjectStore()
    release = threading.Event()

    def pull_object(run_id: int, object_id: str) -> bytes:
        if object_id == last:  # hold the last chunk until the others have been looked up
            release.wait(5)
        return contents[object_id]

    def watch() -> None:
        for oid in chunks[:-1]:
            for _ in range(500):
                if store.get(oid) not in (None, b""):
                    break
                threading.Event().wait(0.01)
            seen_while_last_pending[oid] = store.get(oid)
        release.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    state, run_id = receive_with(message, pull_object, store)
    watcher.join(10)
    assert run_id == RUN_ID
    assert {oid: seen_while_last_pending[oid] for oid in chunks[:-1]} == {oid: contents[oid] for oid in chunks[:-1]}
    # and once done, the whole message is there as Flower would have left it
    assert all(state.object_store.get(oid) == content for oid, content in contents.items())


def test_a_corrupt_object_fails_the_download_as_flowers_does(restored, monkeypatch):
    monkeypatch.delenv(store_on_arrival.ENV, raising=False)
    store_on_arrival.store_downloads_on_arrival()
    message, contents = round_message()
    victim = max(contents, key=lambda oid: len(contents[oid]))

    def pull_object(run_id: int, object_id: str) -> bytes:
        content = contents[object_id]
        return content[:-1] + bytes([content[-1] ^ 1]) if object_id == victim else content

    state, run_id = receive_with(message, pull_object, InMemoryObjectStore())
    assert run_id is None  # Flower's "Failed to receive": nothing for the ClientApp
    assert state.get_messages_legacy() == []
    assert state.object_store.get(message.metadata.message_id) is None


def test_switched_off_flower_puts_everything_at_the_end(restored, monkeypatch):
    monkeypatch.setenv(store_on_arrival.ENV, "0")
    assert not store_on_arrival.store_downloads_on_arrival()
    assert not getattr(internal.pull_objects, "_fedtune_store_on_arrival", False)
    message, contents = round_message()
    in_store_during_pulls: list[bool] = []
    store = InMemoryObjectStore()

    def pull_object(run_id: int, object_id: str) -> bytes:
        in_store_during_pulls.append(any(store.get(oid) not in (None, b"") for oid in contents))
        return contents[object_id]

    state, run_id = receive_with(message, pull_object, store)
    assert run_id == RUN_ID and not any(in_store_during_pulls)
    assert all(state.object_store.get(oid) == content for oid, content in contents.items())


def test_applied_once(restored, monkeypatch):
    monkeypatch.delenv(store_on_arrival.ENV, raising=False)
    store_on_arrival.store_downloads_on_arrival()
    patched = internal.pull_objects, internal._pull_and_store_message  # pylint: disable=protected-access
    store_on_arrival.store_downloads_on_arrival()
    assert (internal.pull_objects, internal._pull_and_store_message) == patched  # pylint: disable=protected-access
