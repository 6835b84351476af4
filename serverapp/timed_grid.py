"""A Grid that receives a round's replies side by side and stamps when messages went out and replies came in.

Flower's `Grid.send_and_receive` pushes the round's messages, then polls for replies every 3 s: a reply can
sit at the SuperLink for up to 3 s before the ServerApp pulls it, on every round. And one poll pulls the
replies it finds one after the other, so a reply that is in waits for the whole download of another (two
nodes finishing together: the second adapter's pull after the first's). Here each pending reply has its own
puller (up to MAX_PULLERS; beyond that a puller polls for several) polling every `REPLY_POLL_SECONDS` (one
small Runtime API request to the local SuperLink each, which fedtune's SuperLink holds until a reply is
stored or a second has passed: fedtune/poll_waits.py), so a reply is pulled while its upload still runs and
beside the others; `on_reply` (the strategy's check of a reply on its real data) runs in the puller as soon
as its reply is in. The wrapper records the wall-clock stamps the round timeline needs (fedtune/results.py):
pushed (= ServerApp sent) and, per node, when its reply was pulled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.supercore.run import Run

REPLY_POLL_SECONDS = 0.1
MAX_PULLERS = 8  # threads pulling replies at once (each adapter pull runs Flower's own 8 object pulls)


@dataclass
class Exchange:
    """One send_and_receive: epoch seconds."""

    pushed_at: float | None = None
    received_at: dict[int, float] = field(default_factory=dict)  # node id -> its reply pulled
    finished_at: float | None = None


class TimedGrid(Grid):
    def __init__(
        self,
        inner: Grid,
        poll_seconds: float = REPLY_POLL_SECONDS,
        on_reply: Callable[[Message], None] | None = None,
    ) -> None:
        self.inner = inner
        self.poll_seconds = poll_seconds
        self.on_reply = on_reply
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
        """Flower's semantics (push all, pull until every reply is in or `timeout` passed), with stamps.
        A message the SuperLink refused (no id) gets no reply: the strategy counts its node as failed."""
        exchange = self.last_exchange = Exchange()
        pending = [mid for mid in dict.fromkeys(self.inner.push_messages(messages)) if mid]
        exchange.pushed_at = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        if pending:
            pullers = min(len(pending), MAX_PULLERS)
            groups = [set(pending[i::pullers]) for i in range(pullers)]
            with ThreadPoolExecutor(pullers, thread_name_prefix="reply-puller") as pool:
                for pulled in pool.map(lambda ids: self._receive(ids, deadline, exchange), groups):
                    replies.extend(pulled)
        exchange.finished_at = time.time()
        return replies

    def _receive(self, pending: set[str], deadline: float | None, exchange: Exchange) -> list[Message]:
        """Poll for the replies to `pending` until all are in (timeout None: Flower waits for every one)."""
        replies: list[Message] = []
        while pending:
            pulled = list(self.inner.pull_messages(pending))
            now = time.time()
            for reply in pulled:
                exchange.received_at.setdefault(reply.metadata.src_node_id, now)
                if self.on_reply is not None:
                    self.on_reply(reply)
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_seconds)
        return replies
