"""The ClientApp's side of the node-local warm trainer (clientapp/warm/service.py).

With `fedtune-supernode --warm-trainer` the ClientApp (which then never imports torch) hands the round to the
trainer over a Unix socket and replies with what comes back. If the trainer is absent, not this user's, or
dies mid-round, the ClientApp trains in-process as before (`train_remote` returns None); a training error it
reports is raised. Status pings (`ping`) live with the wire protocol (clientapp/warm/protocol.py), which the
SuperNode's supervisor imports too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from clientapp.warm.protocol import IO_TIMEOUT_S, PeerGone, ProtocolError, connect, recv_frame, send_frame
from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger("fedtune.warm")


def train_remote(
    path: str,
    run_config: dict[str, Any],
    node_config: dict[str, Any],
    round_config: dict[str, Any],
    global_arrays: ArrayRecord,
) -> tuple[ArrayRecord, dict[str, Any]] | None:
    """Have the warm trainer run the round: its arrays and reply header (`metrics`, `details`,
    `received_at`, `replied_at`), or None if it is unreachable or died (train in-process then)."""
    try:
        with connect(path) as sock:
            # a service busy loading its model may read slowly: the connect timeout is too short for this
            sock.settimeout(IO_TIMEOUT_S)
            send_frame(
                sock,
                {"op": "train", "run_config": run_config, "node_config": node_config, "round": round_config},
                global_arrays,
            )
            sock.settimeout(None)  # a round takes what it takes: the service answers or the socket breaks
            header, arrays = recv_frame(sock)
    except (PeerGone, OSError) as err:
        log.warning("warm trainer unavailable (%s): training in this process", err)
        return None
    except ProtocolError as err:
        raise FedTuneError(f"warm trainer: unreadable reply: {err}") from err
    if not header.get("ok"):
        raise FedTuneError(f"warm trainer: {header.get('error', 'unknown error')}")
    if arrays is None or not isinstance(header.get("metrics"), dict):
        raise FedTuneError("warm trainer replied without arrays or metrics")
    return arrays, header

