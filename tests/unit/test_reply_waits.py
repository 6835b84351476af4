"""fedtune/reply_waits.py with Flower's own runtime `pull_messages` handler on the SuperLink's real SQLite
LinkState: an empty poll waits until a message is stored (the real store_message_and_object_tree
announces it, having committed) and then looks again; with nothing stored it answers empty after its wait;
too many waiters answer at once; 0 keeps Flower's handler."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.superlink.servicer.runtime import runtime_handlers

from fedtune import reply_waits
from fedtune.errors import FedTuneError
from tests.superlink_state import superlink_linkstate


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    for owner, name in ((SqlLinkState, "store_message_and_object_tree"),
                        (InMemoryLinkState, "store_message_and_object_tree"),
                        (runtime_handlers, "pull_messages")):
        monkeypatch.setattr(owner, name, getattr(owner, name))


@pytest.fixture
def state(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    return superlink_linkstate(tmp_path, monkeypatch)


def poll(state: Any, run_id: int) -> Any:
    request = PullAppMessagesRequest(message_ids=[])  # asks for nothing: nothing comes back (no "unknown id" error)
    return runtime_handlers.pull_messages(request, state, Task(run_id=run_id))


def counted(pulls: list[int]) -> Any:
    real = runtime_handlers.pull_messages

    def pull_counting(*args: Any) -> Any:
        pulls.append(1)
        return real(*args)

    return pull_counting


def test_an_empty_poll_waits_for_a_stored_message_then_looks_again(restored, state, monkeypatch):
    monkeypatch.setenv(reply_waits.REPLY_WAIT_ENV, "9")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    pulls: list[int] = []
    monkeypatch.setattr(runtime_handlers, "pull_messages", counted(pulls))
    assert reply_waits.wait_for_replies_in_polls() == 9.0
    assert reply_waits.wait_for_replies_in_polls() == 9.0  # idempotent
    answered = threading.Event()
    result: list[Any] = []

    def poller() -> None:
        result.append(poll(state, run_id))
        answered.set()

    thread = threading.Thread(target=poller)
    thread.start()
    assert not answered.wait(0.3)  # empty: it waits instead of answering
    session_id = state.start_session(run_id)
    # a node's push_messages stores its reply this way (this one is refused as malformed, and still
    # counts as a store the poll re-checks after)
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 1
    stray = Message(RecordDict(), dst_node_id=1, message_type="train")
    state.store_message_and_object_tree(stray, ObjectTree(object_id="0" * 64), session_id)
    assert answered.wait(6)  # woken by the store, long before its 9 s
    thread.join()
    assert len(result[0].messages_list) == 0
    assert len(pulls) == 2  # looked, waited, looked again


def test_with_nothing_stored_the_poll_answers_empty_after_its_wait(restored, state, monkeypatch):
    monkeypatch.setenv(reply_waits.REPLY_WAIT_ENV, "0.3")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    pulls: list[int] = []
    monkeypatch.setattr(runtime_handlers, "pull_messages", counted(pulls))
    reply_waits.wait_for_replies_in_polls()
    assert len(poll(state, run_id).messages_list) == 0
    assert len(pulls) == 1  # the wait ran out with nothing stored: no second look


def test_polls_beyond_the_waiter_limit_answer_at_once(restored, state, monkeypatch):
    monkeypatch.setenv(reply_waits.REPLY_WAIT_ENV, "9")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    reply_waits.wait_for_replies_in_polls()
    taken = [reply_waits._waiters.acquire(blocking=False) for _ in range(reply_waits.MAX_WAITERS)]
    try:
        assert all(taken)
        assert len(poll(state, run_id).messages_list) == 0  # answered without waiting 9 s
    finally:
        for _ in taken:
            reply_waits._waiters.release()


def test_zero_keeps_flowers_handler(restored, monkeypatch):
    monkeypatch.setenv(reply_waits.REPLY_WAIT_ENV, "0")
    before = runtime_handlers.pull_messages
    assert reply_waits.wait_for_replies_in_polls() == 0.0
    assert runtime_handlers.pull_messages is before


@pytest.mark.parametrize("raw", ["soon", "-1", "11"])
def test_a_bad_wait_is_one_line(monkeypatch, raw):
    monkeypatch.setenv(reply_waits.REPLY_WAIT_ENV, raw)
    with pytest.raises(FedTuneError, match=f"FEDTUNE_REPLY_WAIT_SECONDS must be .*{raw}"):
        reply_waits.reply_wait_seconds()
