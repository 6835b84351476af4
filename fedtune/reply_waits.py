"""The ServerApp's poll for replies waits at the SuperLink for one to come, instead of coming back empty.

The ServerApp polls for the round's replies (serverapp/timed_grid.py: every 0.1 s, one poll per pending
reply), and each of Flower's empty answers costs the SuperLink a whole HTTPS request: middleware, the task
token check that deletes expired tokens, the reply lookup and a delete of the messages answered, several
SQLite writes each. Twenty such polls a second while the nodes upload their replies compete with those very
uploads. Here a runtime `pull_messages` that finds nothing waits, up to REPLY_WAIT_ENV seconds (default 1 s),
for a message to be stored at the SuperLink (a node's reply), then looks once more: a reply is seen the
moment it is listed, with a tenth of the requests. A waiting poll holds one of the SuperLink's request
threads (anyio's 40), so at most MAX_WAITERS wait at a time; a poll beyond that answers at once, as Flower's
does. Set the variable to 0 for Flower's behaviour.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.patching import wrap_once
from fedtune.preflight import env_seconds

REPLY_WAIT_ENV = "FEDTUNE_REPLY_WAIT_SECONDS"
DEFAULT_REPLY_WAIT_S = 1.0
MAX_REPLY_WAIT_S = 10.0  # well inside the ServerApp's HTTP timeout
MAX_WAITERS = 8
_PATCHED = "_fedtune_reply_waits"

_stored = threading.Condition()
_waiters = threading.BoundedSemaphore(MAX_WAITERS)
_stores = 0  # messages stored so far in this process: a poll waits for it to change


def reply_wait_seconds(env: Mapping[str, str] = os.environ) -> float:
    return env_seconds(REPLY_WAIT_ENV, DEFAULT_REPLY_WAIT_S, 0, MAX_REPLY_WAIT_S, env)


def _announcing(store: Callable[..., Any]) -> Callable[..., Any]:
    def store_and_announce(state: Any, *args: Any, **kwargs: Any) -> Any:
        global _stores
        try:
            return store(state, *args, **kwargs)
        finally:
            with _stored:
                _stores += 1
                _stored.notify_all()

    return store_and_announce


def _waiting(pull_messages: Callable[..., Any], wait_s: float) -> Callable[..., Any]:
    def pull_messages_or_wait(request: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        with _stored:
            seen = _stores  # before the first look: a reply stored after it ends the wait
        response = pull_messages(request, state, *args, **kwargs)
        if len(response.messages_list) or not _waiters.acquire(blocking=False):
            return response  # a reply (or too many waiting already)
        try:
            with _stored:
                stored = _stored.wait_for(lambda: _stores != seen, wait_s)
        finally:
            _waiters.release()
        return pull_messages(request, state, *args, **kwargs) if stored else response

    return pull_messages_or_wait


def wait_for_replies_in_polls() -> float:
    """Make this SuperLink's runtime `pull_messages` wait for a reply (idempotent). Returns the wait in
    seconds (0: not patched)."""
    wait_s = reply_wait_seconds()
    if wait_s == 0:
        return 0.0
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.servicer.runtime import runtime_handlers

    for state_class in (InMemoryLinkState, SqlLinkState):
        # the fleet's push_messages stores a node's reply through it; its transaction has committed when it
        # returns, so a woken poll sees the reply
        wrap_once(state_class, "store_message_and_object_tree", _announcing, _PATCHED)
    wrap_once(runtime_handlers, "pull_messages", lambda pull: _waiting(pull, wait_s), _PATCHED)
    return wait_s
