"""An empty poll for messages waits at the SuperLink for one to be stored, instead of coming back empty.

Two kinds of client ask the SuperLink for messages over and over, and Flower answers an empty ask at once:
- the ServerApp, for the round's replies (serverapp/timed_grid.py: every 0.1 s per pending reply; the
  Runtime API's `pull_messages`). Each empty answer is a whole HTTPS request to the SuperLink's one Python
  process, with the task token check that deletes expired tokens and the delete of answered messages:
  twenty a second while the nodes upload their replies, competing with those very uploads;
- each idle SuperNode, for its next instruction (every FEDTUNE_SUPERNODE_POLL_SECONDS, 0.5 s; the Fleet
  API's `pull_messages`). The poll's phase decides when a node sees the round's message: a quarter of a
  second after the ServerApp listed it on average, up to half a second, and its download starts that late.

Here a `pull_messages` that finds nothing waits, up to its seconds, for a message addressed to the one who
asked (the SuperLink's own node id for the ServerApp's replies, the node's id for a node's instruction) to
be stored, then looks once more: a message is seen the moment it is listed, with a fraction of the
requests. The SuperNode starts its next poll right after a held one comes back (supernode/flower_entry.py
counts its poll period from the start of the last poll), so an idle node is nearly always waiting at the
SuperLink. A waiting poll holds one of the SuperLink's request threads (anyio's 40, shared with the object
waits of fedtune.object_waits), so at most MAX_REPLY_WAITERS / MAX_NODE_WAITERS wait at a time; a poll
beyond that answers at once, as Flower's does. Set a variable to 0 for Flower's behaviour.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from flwr.common.constant import SUPERLINK_NODE_ID  # the ServerApp's replies are addressed to it

from fedtune.patching import wrap_once
from fedtune.preflight import env_seconds

REPLY_WAIT_ENV = "FEDTUNE_REPLY_WAIT_SECONDS"  # the ServerApp's polls for replies (Runtime API)
NODE_WAIT_ENV = "FEDTUNE_NODE_POLL_WAIT_SECONDS"  # an idle SuperNode's polls for instructions (Fleet API)
DEFAULT_REPLY_WAIT_S = 1.0
DEFAULT_NODE_WAIT_S = 2.0
MAX_WAIT_S = 10.0  # well inside the clients' HTTP timeouts (a node's httpx 30 s, nginx's above 60 s)
# 8 + 8 here and object_waits' 16 leave anyio's 40 request threads at least 8 for the transfers themselves
MAX_REPLY_WAITERS = 8
MAX_NODE_WAITERS = 8
_PATCHED = "_fedtune_poll_waits"

NodeOf = Callable[[tuple[Any, ...], dict[str, Any]], int]


class StoredMessages:
    """How many messages were stored per destination node in this process; a poll waits for its count to
    change."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._stores: Counter[int] = Counter()

    def seen(self, node_id: int) -> int:
        with self._changed:
            return self._stores[node_id]

    def announce(self, node_id: int) -> None:
        with self._changed:
            self._stores[node_id] += 1
            self._changed.notify_all()

    def wait(self, node_id: int, seen: int, seconds: float) -> bool:
        """True once a message for `node_id` was stored after `seen`; False after `seconds`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._stores[node_id] != seen, seconds)


_stored = StoredMessages()
_reply_waiters = threading.BoundedSemaphore(MAX_REPLY_WAITERS)
_node_waiters = threading.BoundedSemaphore(MAX_NODE_WAITERS)


def reply_wait_seconds(env: Mapping[str, str] = os.environ) -> float:
    return env_seconds(REPLY_WAIT_ENV, DEFAULT_REPLY_WAIT_S, 0, MAX_WAIT_S, env)


def node_wait_seconds(env: Mapping[str, str] = os.environ) -> float:
    return env_seconds(NODE_WAIT_ENV, DEFAULT_NODE_WAIT_S, 0, MAX_WAIT_S, env)


def _announcing(store: Callable[..., Any]) -> Callable[..., Any]:
    def store_and_announce(state: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return store(state, message, *args, **kwargs)
        finally:  # its transaction has committed (or failed): a woken poll sees what it stored
            _stored.announce(int(message.metadata.dst_node_id))

    return store_and_announce


def _waiting(
    pull_messages: Callable[..., Any], wait_s: float, waiters: threading.BoundedSemaphore, node_of: NodeOf
) -> Callable[..., Any]:
    def pull_messages_or_wait(*args: Any, **kwargs: Any) -> Any:
        node_id = node_of(args, kwargs)
        seen = _stored.seen(node_id)  # before the first look: a message stored after it ends the wait
        response = pull_messages(*args, **kwargs)
        if len(response.messages_list) or not waiters.acquire(blocking=False):
            return response  # a message (or too many waiting already)
        try:
            stored = _stored.wait(node_id, seen, wait_s)
        finally:
            waiters.release()
        return pull_messages(*args, **kwargs) if stored else response

    return pull_messages_or_wait


def _asking_node(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The Fleet handler's caller: `pull_messages(request, state, store)`, the node in the request."""
    request = kwargs["request"] if "request" in kwargs else args[0]
    return int(request.node.node_id)


def wait_in_polls() -> tuple[float, float]:
    """Make this SuperLink's empty `pull_messages` wait for a message: the Runtime API's (the ServerApp's
    replies) and the Fleet API's (a node's instructions). Idempotent. Returns the two waits in seconds
    (0: that one not patched)."""
    reply_s, node_s = reply_wait_seconds(), node_wait_seconds()
    if not reply_s and not node_s:
        return 0.0, 0.0
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    for state_class in (InMemoryLinkState, SqlLinkState):
        # both the ServerApp's instructions and the nodes' replies are stored through it
        wrap_once(state_class, "store_message_and_object_tree", _announcing, _PATCHED)
    if reply_s:
        wrap_once(
            runtime_handlers, "pull_messages",
            lambda pull: _waiting(pull, reply_s, _reply_waiters, lambda _a, _k: SUPERLINK_NODE_ID),
            _PATCHED,
        )
    if node_s:
        wrap_once(
            fleet_handlers, "pull_messages",
            lambda pull: _waiting(pull, node_s, _node_waiters, _asking_node),
            _PATCHED,
        )
    return reply_s, node_s
