"""fedtune/poll_waits.py with Flower's own `pull_messages` handlers on the SuperLink's real SQLite LinkState.

The ServerApp's (Runtime API): an empty poll waits until a message is stored (the real
store_message_and_object_tree announces it, having committed) and then looks again; with nothing stored it
answers empty after its wait; too many waiters answer at once; 0 keeps Flower's handler.
A node's (Fleet API): its empty poll returns the instruction the ServerApp stores for it while it waits,
and an instruction for another node does not end its wait."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.superlink.servicer.runtime import runtime_handlers

from fedtune import poll_waits
from fedtune.errors import FedTuneError
from tests.superlink_state import superlink_linkstate


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    for owner, name in ((SqlLinkState, "store_message_and_object_tree"),
                        (InMemoryLinkState, "store_message_and_object_tree"),
                        (runtime_handlers, "pull_messages"),
                        (fleet_handlers, "pull_messages")):
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
    monkeypatch.setenv(poll_waits.REPLY_WAIT_ENV, "9")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    pulls: list[int] = []
    monkeypatch.setattr(runtime_handlers, "pull_messages", counted(pulls))
    assert poll_waits.wait_in_polls() == (9.0, poll_waits.DEFAULT_NODE_WAIT_S)
    assert poll_waits.wait_in_polls()[0] == 9.0  # idempotent
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
    monkeypatch.setenv(poll_waits.REPLY_WAIT_ENV, "0.3")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    pulls: list[int] = []
    monkeypatch.setattr(runtime_handlers, "pull_messages", counted(pulls))
    poll_waits.wait_in_polls()
    assert len(poll(state, run_id).messages_list) == 0
    assert len(pulls) == 1  # the wait ran out with nothing stored: no second look


def test_polls_beyond_the_waiter_limit_answer_at_once(restored, state, monkeypatch):
    monkeypatch.setenv(poll_waits.REPLY_WAIT_ENV, "9")
    run_id = state.create_run(None, None, None, {}, "default", None, None, "")
    poll_waits.wait_in_polls()
    taken = [poll_waits._reply_waiters.acquire(blocking=False) for _ in range(poll_waits.MAX_REPLY_WAITERS)]
    try:
        assert all(taken)
        assert len(poll(state, run_id).messages_list) == 0  # answered without waiting 9 s
    finally:
        for _ in taken:
            poll_waits._reply_waiters.release()


def test_zero_keeps_flowers_handler(restored, monkeypatch):
    monkeypatch.setenv(poll_waits.REPLY_WAIT_ENV, "0")
    monkeypatch.setenv(poll_waits.NODE_WAIT_ENV, "0")
    runtime_before, fleet_before = runtime_handlers.pull_messages, fleet_handlers.pull_messages
    assert poll_waits.wait_in_polls() == (0.0, 0.0)
    assert runtime_handlers.pull_messages is runtime_before and fleet_handlers.pull_messages is fleet_before
    monkeypatch.setenv(poll_waits.NODE_WAIT_ENV, "2")
    assert poll_waits.wait_in_polls() == (0.0, 2.0)  # one on, the other Flower's
    assert runtime_handlers.pull_messages is runtime_before and fleet_handlers.pull_messages is not fleet_before


@pytest.mark.parametrize("raw", ["soon", "-1", "11"])
def test_a_bad_wait_is_one_line(monkeypatch, raw):
    monkeypatch.setenv(poll_waits.REPLY_WAIT_ENV, raw)
    monkeypatch.setenv(poll_waits.NODE_WAIT_ENV, raw)
    with pytest.raises(FedTuneError, match=f"FEDTUNE_REPLY_WAIT_SECONDS must be .*{raw}"):
        poll_waits.reply_wait_seconds()
    with pytest.raises(FedTuneError, match=f"FEDTUNE_NODE_POLL_WAIT_SECONDS must be .*{raw}"):
        poll_waits.node_wait_seconds()


# ---- a node's poll for its next instruction (Fleet API) ----------------------------------------------


def online_node(state: Any) -> int:
    node_id = state.create_node("test-aid", "test-owner", os.urandom(32), 10.0)  # a key per node
    assert state.activate_node(node_id, 10.0)
    return int(node_id)


def store_instruction(state: Any, run_id: int, node_id: int) -> str:
    """What the ServerApp's push_messages stores at the SuperLink: a train message for `node_id`."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree, no_object_id_recompute
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 1
    message = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=node_id,
                      message_type="train")
    with no_object_id_recompute():
        message.metadata.__dict__["_message_id"] = message.object_id
        stored, _ = state.store_message_and_object_tree(
            message, get_object_tree(message), state.start_session(run_id)
        )
    assert stored
    return str(message.metadata.message_id)


def node_poll(state: Any, node_id: int) -> Any:
    from flwr.proto.fleet_pb2 import PullMessagesRequest  # pylint: disable=no-name-in-module
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module

    request = PullMessagesRequest(node=Node(node_id=node_id))
    return fleet_handlers.pull_messages(request=request, state=state, store=state.object_store)


def fleet_run(state: Any) -> int:
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    return int(state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, ""))


def test_a_nodes_empty_poll_returns_the_instruction_stored_while_it_waits(restored, state, monkeypatch):
    monkeypatch.setenv(poll_waits.NODE_WAIT_ENV, "9")
    node_id, run_id = online_node(state), fleet_run(state)
    assert poll_waits.wait_in_polls()[1] == 9.0
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(node_poll(state, node_id)))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # nothing for it yet: it waits
    message_id = store_instruction(state, run_id, node_id)
    thread.join(6)  # woken by the store, long before its 9 s
    assert not thread.is_alive()
    assert [m.metadata.message_id for m in result[0].messages_list] == [message_id]
    assert len(node_poll(state, node_id).messages_list) == 0  # delivered once (Flower's claim)


def test_an_instruction_for_another_node_does_not_end_the_wait(restored, state, monkeypatch):
    monkeypatch.setenv(poll_waits.NODE_WAIT_ENV, "0.6")
    waiting_node, other_node, run_id = online_node(state), online_node(state), fleet_run(state)
    poll_waits.wait_in_polls()
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(node_poll(state, waiting_node)))
    thread.start()
    thread.join(0.2)
    store_instruction(state, run_id, other_node)
    thread.join(0.2)
    assert thread.is_alive()  # still waiting: the message is not for it
    thread.join(5)
    assert len(result[0].messages_list) == 0
    assert len(node_poll(state, other_node).messages_list) == 1  # the other node's is still there
