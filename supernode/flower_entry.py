"""`flower-supernode` with a shorter wait between polls and a prestarted ClientApp, through fedtune's logs.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a poll of the SuperLink finds no message, and 0.5 s
between checks for the ClientApp's reply and for its content: a round's message waits 1.5 s on average (up to
3 s) before the node even starts to download it, and the reply up to 0.5 s before the upload starts
(bench/federation.py shows both hops). We start a poll every FEDTUNE_SUPERNODE_POLL_SECONDS (default 0.5 s:
one small HTTPS request every half second per idle node), counted from the start of the last one, and check
for the reply every 0.05 s (an in-memory lookup). fedtune's SuperLink holds an empty poll until a message for
the node is stored or 2 s have passed (fedtune.poll_waits): the next poll then starts at once, so an idle node
is nearly always waiting at the SuperLink and sees the round's message the moment it is listed; against
Flower's SuperLink (empty answers at once) the node still polls every half second. A poll may find a message
whose chunks the ServerApp is still pushing: the SuperLink holds each early pull until its chunk is in
(fedtune.object_waits), so the download runs alongside the push instead of retrying against it. Object pulls
that do come back empty retry within 0.25 s (fedtune.flower_pulls). Each downloaded object is stored the
moment it arrives (fedtune.store_on_arrival), and the ClientApp's pulls from this SuperNode wait for it the
same way, so its copy runs alongside the download; its pushes reach Flower's middleware as whole bodies
(fedtune.whole_body).

The SuperNode starts its SuperExec as `flower-superexec`; we start `fedtune.prestart clientapp`
instead (the same CLI, with a ClientApp process started before each message) unless
FEDTUNE_CLIENTAPP_PRESTART=0.
Everything else is Flower's own CLI.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from fedtune.errors import FedTuneError, one_line_errors
from fedtune.preflight import env_seconds

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_SECONDS"
DEFAULT_POLL_S = 0.5
REPLY_CHECK_S = 0.05
_FLWR_IDLE_S = 3  # the literal waits in flwr.supernode.start_client_internal
_FLWR_REPLY_S = 0.5
PRESTART_ENV = "FEDTUNE_CLIENTAPP_PRESTART"


class PollClock:
    """The `time` module as start_client_internal sees it: its two fixed waits shortened (the idle wait
    counted from the start of the last poll), all else time's."""

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.poll_started: float | None = None  # monotonic, set by `polling`
        for name in dir(time):
            if not name.startswith("__") and name != "sleep":
                setattr(self, name, getattr(time, name))

    def polling(self, pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
        """start_client_internal's `_pull_and_store_message`, which polls first thing: its start noted."""

        @functools.wraps(pull_and_store)  # its signature too: fedtune.store_on_arrival binds by name
        def timed_pull_and_store(*args: Any, **kwargs: Any) -> Any:
            self.poll_started = time.monotonic()
            return pull_and_store(*args, **kwargs)

        return timed_pull_and_store

    def sleep(self, seconds: float) -> None:
        if seconds == _FLWR_IDLE_S:
            since = 0.0 if self.poll_started is None else time.monotonic() - self.poll_started
            seconds = max(0.0, self.poll - since)
        elif seconds == _FLWR_REPLY_S:
            seconds = REPLY_CHECK_S
        time.sleep(seconds)


def poll_seconds() -> float:
    try:
        return env_seconds(POLL_ENV, DEFAULT_POLL_S, 0.05, 60)
    except FedTuneError as err:
        raise SystemExit(f"error: {err}") from None


@one_line_errors
def main() -> None:
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli import flower_supernode

    from fedtune.flower_pulls import retry_pulls_sooner
    from fedtune.logs import run_with_logging
    from fedtune.object_waits import wait_for_objects_in_pulls
    from fedtune.prestart import prestarting_subprocess
    from fedtune.process import exit_even_if_threads_hang
    from fedtune.runtime_env import env_tristate
    from fedtune.store_on_arrival import store_downloads_on_arrival
    from fedtune.whole_body import read_bodies_whole_in_supernode

    clock = PollClock(poll_seconds())
    internal.time = clock  # type: ignore[assignment]
    internal._pull_and_store_message = clock.polling(internal._pull_and_store_message)
    retry_pulls_sooner()  # a message is listed before the ServerApp has pushed all its chunks
    wait_for_objects_in_pulls()  # the ClientApp's pulls, while this node still downloads
    store_downloads_on_arrival()  # ... which it stores object by object
    read_bodies_whole_in_supernode()  # the ClientApp's pushes of its reply
    if env_tristate(PRESTART_ENV) is not False:  # on unless set to 0/false
        internal.subprocess = prestarting_subprocess("flwr-clientapp")  # type: ignore[assignment]
    try:
        run_with_logging(flower_supernode, ["flower-supernode", *sys.argv[1:]])
    except SystemExit as stop:  # how run_with_logging always ends
        exit_even_if_threads_hang(stop.code if isinstance(stop.code, int) else 1)
        raise
    except BaseException:  # the node's loop died of an error: its traceback, then a non-zero exit
        exit_even_if_threads_hang(1)
        raise


if __name__ == "__main__":
    main()
