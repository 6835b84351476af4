"""A Grid that stamps when the ServerApp's messages went out and when each reply came back.

Flower's `Grid.send_and_receive` pushes the round's messages, then polls for replies every 3 s: a reply can
sit at the SuperLink for up to 3 s before the ServerApp pulls it, on every round. This wrapper polls every
`REPLY_POLL_SECONDS` instead (one small Runtime API request to the local SuperLink each) and records the
wall-clock stamps the round timeline needs (fedtune/results.py): pushed (= ServerApp sent) and, per node,
when its reply was pulled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.supercore.run import Run

REPLY_POLL_SECONDS = 0.1


@dataclass
class Exchange:
    """One send_and_receive: epoch seconds."""

    pushed_at: float | None = None
    received_at: dict[int, float] = field(default_factory=dict)  # node id -> its reply pulled
    finished_at: float | None = None


class TimedGrid(Grid):
    def __init__(self, inner: Grid, poll_seconds: float = REPLY_POLL_SECONDS) -> None:
        self.inner = inner
        self.poll_seconds = poll_seconds
        self.last_exchange = Exchange()

    # ---- delegated ----------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # ---- timed ---------------------------------------------------------------------------------------

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's semantics (push all, pull until every reply is in or `timeout` passed), with stamps."""
        exchange = self.last_exchange = Exchange()
        pending = set(self.inner.push_messages(messages))
        exchange.pushed_at = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.inner.pull_messages(pending))
            now = time.time()
            for reply in pulled:
                exchange.received_at.setdefault(reply.metadata.src_node_id, now)
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break  # timeout None waits for every reply, as Flower's does
            time.sleep(self.poll_seconds)
        exchange.finished_at = time.time()
        return replies
