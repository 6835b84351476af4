"""A pull of an object that is on its way waits for it at the store, instead of coming back empty.

Flower lists a message before its objects are in: the ServerApp stores a round's message at the SuperLink,
then pushes its chunks; a SuperNode stores its reply, then uploads the chunks. A pull that comes early
(a node's poll right after the message is listed, the ServerApp's pull of a reply being uploaded) gets
"not available" and retries (fedtune.flower_pulls: every ≤ 0.25 s). Each retry is a whole HTTPS request
to the SuperLink's one Python process (middleware, SQL, node authentication), competing with the very
transfer it waits for: a node polling for messages every 0.2 s slowed the ServerApp's push from ~0.5-1.4 s
to 1.3-1.8 s on an H200 host (bench/RESULTS.md, session 5), so nodes had to poll slowly and start their
downloads only after the push.

Here the store's reader waits, up to OBJECT_WAIT_ENV seconds (default 1 s), for the object to be put, and
answers the moment it is: an early pull is one request that returns with the chunk, a download runs
alongside the push that feeds it, and the ServerApp's pull of a reply alongside the upload. A waiting
pull holds a server thread (uvicorn runs Flower's handlers on anyio's 40 threads), so at most MAX_WAITERS
wait at a time per process; a pull beyond that answers at once, as Flower's does. A chunk that never
comes (a sender that died) costs each waiter its timeout, then Flower's own retry limits apply. Set the
variable to 0 for Flower's behaviour.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.patching import wrap_once
from fedtune.preflight import env_seconds

OBJECT_WAIT_ENV = "FEDTUNE_OBJECT_WAIT_SECONDS"
DEFAULT_OBJECT_WAIT_S = 1.0
MAX_OBJECT_WAIT_S = 10.0  # well inside the HTTP timeouts on the way (a node's httpx 30 s, nginx's > 60 s)
MAX_WAITERS = 16

_arrivals = threading.Condition()
_waiters = threading.BoundedSemaphore(MAX_WAITERS)
_PATCHED = "_fedtune_waits_for_objects"


def object_wait_seconds(env: Mapping[str, str] = os.environ) -> float:
    return env_seconds(OBJECT_WAIT_ENV, DEFAULT_OBJECT_WAIT_S, 0, MAX_OBJECT_WAIT_S, env)


def _announcing(put: Callable[..., None]) -> Callable[..., None]:
    def put_and_announce(store: Any, object_id: str, object_content: bytes) -> None:
        put(store, object_id, object_content)
        with _arrivals:
            _arrivals.notify_all()

    return put_and_announce


def _waiting(get_object: Callable[..., bytes | None], wait_s: float) -> Callable[..., bytes | None]:
    def get_object_when_there(state: Any, run_id: int, object_id: str) -> bytes | None:
        content = get_object(state, run_id, object_id)
        if content != b"" or not _waiters.acquire(blocking=False):
            return content  # there (or unknown: None), or too many waiting already
        try:
            with _arrivals:
                # the store's own lookup (a dict under its lock), not Flower's get_object with its SQL
                arrived = _arrivals.wait_for(lambda: state.object_store.get(object_id) != b"", wait_s)
            # still on its way: the caller retries, as with Flower's
            return get_object(state, run_id, object_id) if arrived else content
        finally:
            _waiters.release()

    return get_object_when_there


def wait_for_objects_in_pulls() -> float:
    """Make this process's object pulls (the SuperLink's Fleet and Runtime APIs, the SuperNode's
    ClientAppIo API) wait for an object on its way. Returns the wait in seconds (0: not patched).
    Idempotent."""
    wait_s = object_wait_seconds()
    if wait_s == 0:
        return 0.0
    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    for store_class in (InMemoryObjectStore, SqlObjectStore):
        wrap_once(store_class, "put", _announcing, _PATCHED)
    for state_class in (InMemoryCoreState, SqlCoreState):
        wrap_once(state_class, "get_object", lambda get_object: _waiting(get_object, wait_s), _PATCHED)
    return wait_s

