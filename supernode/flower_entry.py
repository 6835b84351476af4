"""`flower-supernode` with a shorter wait between polls and a prestarted ClientApp, through fedtune's logs.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a poll of the SuperLink finds no message, and 0.5 s
between checks for the ClientApp's reply and for its content: a round's message waits 1.5 s on average (up
to 3 s) before the node even starts to download it, and the reply up to 0.5 s before the upload starts
(bench/federation.py shows both hops). We poll every FEDTUNE_SUPERNODE_POLL_SECONDS (default 0.5 s: one
small HTTPS request every half second per idle node) and check for the reply every 0.05 s (an in-memory
lookup). A poll may find a message whose chunks the ServerApp is still pushing: the SuperLink holds each
early pull until its chunk is in (fedtune.object_waits), so the download runs alongside the push instead
of retrying against it. Object pulls that do come back empty retry within 0.25 s (fedtune.flower_pulls).
Each downloaded object is stored the moment it arrives (fedtune.store_on_arrival), and the ClientApp's pulls
from this SuperNode wait for it the same way, so its copy runs alongside the download; its pushes reach
Flower's middleware as whole bodies (fedtune.whole_body).

The SuperNode starts its SuperExec as `flower-superexec`; we start `fedtune.prestart clientapp`
instead (the same CLI, with a ClientApp process started before each message) unless
FEDTUNE_CLIENTAPP_PRESTART=0.
Everything else is Flower's own CLI.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from fedtune.errors import FedTuneError, one_line_errors
from fedtune.preflight import env_seconds

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_SECONDS"
DEFAULT_POLL_S = 0.5
REPLY_CHECK_S = 0.05
_FLWR_IDLE_S = 3  # the literal waits in flwr.supernode.start_client_internal
_FLWR_REPLY_S = 0.5
PRESTART_ENV = "FEDTUNE_CLIENTAPP_PRESTART"


def patched_clock(poll: float) -> SimpleNamespace:
    """The `time` module as start_client_internal sees it: its two fixed waits shortened, all else time's."""

    def sleep(seconds: float) -> None:
        if seconds == _FLWR_IDLE_S:
            seconds = poll
        elif seconds == _FLWR_REPLY_S:
            seconds = REPLY_CHECK_S
        time.sleep(seconds)

    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = sleep
    return clock


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
    from fedtune.runtime_env import env_tristate
    from fedtune.store_on_arrival import store_downloads_on_arrival
    from fedtune.whole_body import read_bodies_whole_in_supernode

    internal.time = patched_clock(poll_seconds())  # type: ignore[assignment]
    retry_pulls_sooner()  # a message is listed before the ServerApp has pushed all its chunks
    wait_for_objects_in_pulls()  # the ClientApp's pulls, while this node still downloads
    store_downloads_on_arrival()  # ... which it stores object by object
    read_bodies_whole_in_supernode()  # the ClientApp's pushes of its reply
    if env_tristate(PRESTART_ENV) is not False:  # on unless set to 0/false
        internal.subprocess = prestarting_subprocess("flwr-clientapp")  # type: ignore[assignment]
    run_with_logging(flower_supernode, ["flower-supernode", *sys.argv[1:]])


if __name__ == "__main__":
    main()
