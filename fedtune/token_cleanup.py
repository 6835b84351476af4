"""The SuperLink's sweep of expired task tokens runs at most once a second, not on every object request.

Flower's SQL state runs `_cleanup_expired_task_tokens` (two UPDATE statements over the task table, a
write transaction) at the start of `get_run_status`, and every object push and pull checks its run's
status first (`check_abort`): a fast round's ~60 object requests each take SQLite's write lock for a sweep
that finds nothing, one after the other, beside the transfers. On an H200 host the sweep was 16 % of the
SuperLink's request threads' GIL time during a federation (py-spy `--gil`, bench/RESULTS.md session 12).

The sweep only does bookkeeping: a token past its `active_until` is refused by `get_task_by_token` on its
own, whether or not it was swept. So here a sweep within CLEANUP_ENV seconds (default 1 s) of the last one
in this process is skipped: a task whose heartbeat expired is marked failed (or put back to pending) up to
a second later, against heartbeat timeouts of tens of seconds. Set the variable to 0 to sweep on every
call, as Flower does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.patching import wrap_once
from fedtune.preflight import env_seconds

CLEANUP_ENV = "FEDTUNE_TOKEN_CLEANUP_SECONDS"
DEFAULT_CLEANUP_S = 1.0
MAX_CLEANUP_S = 10.0
_PATCHED = "_fedtune_token_cleanup"


def cleanup_seconds(env: Mapping[str, str] = os.environ) -> float:
    return env_seconds(CLEANUP_ENV, DEFAULT_CLEANUP_S, 0, MAX_CLEANUP_S, env)


class Throttle:
    """True at most once per `seconds` (monotonic), across threads."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.seconds:
                return False
            self._last = now  # before the sweep runs: callers meanwhile skip, not queue for the lock
            return True


def _throttled(cleanup: Callable[..., None], throttle: Throttle) -> Callable[..., None]:
    def cleanup_now_and_then(state: Any) -> None:
        if throttle.due():
            cleanup(state)

    return cleanup_now_and_then


def sweep_tokens_once_a_second() -> float:
    """Throttle the SQL state's token sweep in this process (idempotent). Returns the interval in seconds
    (0: not patched)."""
    seconds = cleanup_seconds()
    if seconds == 0:
        return 0.0
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    throttle = Throttle(seconds)
    wrap_once(
        SqlCoreState, "_cleanup_expired_task_tokens", lambda sweep: _throttled(sweep, throttle), _PATCHED
    )
    return seconds
