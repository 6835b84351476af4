"""serverapp/timed_grid.py: the round's replies are pulled side by side (one puller each), each reply is
handed to `on_reply` in its puller as it arrives, a message the SuperLink refused is not waited for, and
Flower's timeout still ends the wait. The inner Grid is a scripted stand-in for the SuperLink's Runtime
API (the e2e federation tests and bench/federation.py run TimedGrid on a real one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from serverapp.timed_grid import TimedGrid


def round_messages(nodes: Iterable[int]) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as in a ServerApp
    messages = []
    for node in nodes:
        message = Message(RecordDict(), dst_node_id=node, message_type="train")
        message.metadata.__dict__["_message_id"] = message.object_id
        messages.append(message)
    return messages


class ScriptedGrid:
    """push_messages returns the messages' ids; pull_messages returns the replies that are `ready`, after
    `pull_hook(message id)` (a pull that takes a while)."""

    def __init__(self, refused: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.refused = refused
        self.replies: dict[str, Message] = {}
        self.ready: set[str] = set()
        self.pull_hook = lambda message_id: None
        self.polls: dict[str, int] = {}
        self.lock = threading.Lock()

    def push_messages(self, messages: Iterable[Message]) -> list[str | None]:
        ids: list[str | None] = []
        for message in messages:
            if message.metadata.dst_node_id in self.refused:
                ids.append(None)
                continue
            self.replies[message.metadata.message_id] = Message(RecordDict(), reply_to=message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        pulled = []
        for message_id in sorted(message_ids):
            with self.lock:
                self.polls[message_id] = self.polls.get(message_id, 0) + 1
            if message_id in self.ready:
                self.pull_hook(message_id)
                pulled.append(self.replies[message_id])
        return pulled


def test_two_replies_are_pulled_side_by_side_and_checked_in_their_pullers():
    messages = round_messages([11, 22])
    inner = ScriptedGrid()
    grid = TimedGrid(inner, poll_seconds=0.01)  # type: ignore[arg-type]
    ids = [m.metadata.message_id for m in messages]
    inner.ready.update(ids)
    started = {message_id: threading.Event() for message_id in ids}

    def pull_waits_for_the_other(message_id: str) -> None:
        started[message_id].set()
        other = next(i for i in ids if i != message_id)
        # one after the other, the first pull would wait here for a pull that only starts after it
        assert started[other].wait(5), "the replies were pulled one after the other"

    inner.pull_hook = pull_waits_for_the_other
    checked: list[tuple[int, str]] = []
    grid.on_reply = lambda reply: checked.append((reply.metadata.src_node_id, threading.current_thread().name))

    replies = list(grid.send_and_receive(messages, timeout=30))

    assert sorted(r.metadata.src_node_id for r in replies) == [11, 22]
    assert sorted(node for node, _ in checked) == [11, 22]
    assert all(name.startswith("reply-puller") for _, name in checked)
    exchange = grid.last_exchange
    assert exchange.pushed_at is not None and exchange.finished_at is not None
    assert set(exchange.received_at) == {11, 22}
    assert all(exchange.pushed_at <= t <= exchange.finished_at for t in exchange.received_at.values())


def test_a_reply_that_is_in_does_not_wait_for_a_late_one():
    messages = round_messages([11, 22])
    inner = ScriptedGrid()
    grid = TimedGrid(inner, poll_seconds=0.01)  # type: ignore[arg-type]
    early, late = (m.metadata.message_id for m in messages)
    inner.ready.add(early)
    handed_over = threading.Event()
    grid.on_reply = lambda reply: handed_over.set()

    def late_reply_arrives() -> None:
        assert handed_over.wait(5)  # the early reply reached on_reply while the late one is not in
        inner.ready.add(late)

    threading.Thread(target=late_reply_arrives).start()
    replies = list(grid.send_and_receive(messages, timeout=30))
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 22]
    assert inner.polls[early] == 1  # pulled once and left alone after that


def test_a_refused_message_is_not_waited_for():
    messages = round_messages([11, 22])
    inner = ScriptedGrid(refused={22})
    grid = TimedGrid(inner, poll_seconds=0.01)  # type: ignore[arg-type]
    inner.ready.add(messages[0].metadata.message_id)
    replies = list(grid.send_and_receive(messages, timeout=None))  # None: wait for every reply
    assert [r.metadata.src_node_id for r in replies] == [11]


def test_the_timeout_ends_the_wait_for_a_reply_that_never_comes():
    messages = round_messages([11, 22])
    inner = ScriptedGrid()
    grid = TimedGrid(inner, poll_seconds=0.01)  # type: ignore[arg-type]
    inner.ready.add(messages[0].metadata.message_id)
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=0.3))
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert time.monotonic() - started >= 0.3
    assert inner.polls[messages[1].metadata.message_id] >= 2  # it kept polling until the deadline


@pytest.mark.parametrize("nodes", [0, 1, 12])
def test_any_number_of_messages(nodes):
    messages = round_messages(range(100, 100 + nodes))
    inner = ScriptedGrid()
    grid = TimedGrid(inner, poll_seconds=0.01)  # type: ignore[arg-type]
    inner.ready.update(m.metadata.message_id for m in messages)
    replies = list(grid.send_and_receive(messages, timeout=30))
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(100, 100 + nodes))
