"""The ClientApp's side of the node-local warm trainer (clientapp/warm/service.py).

With `fedtune-supernode --warm-trainer` the ClientApp (which then never imports torch) hands the round to the
trainer over a Unix socket and replies with what comes back. If the trainer is absent, not this user's, or
dies mid-round, the ClientApp trains in-process as before (`train_remote` returns None); a training error it
reports is raised.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from clientapp.warm.protocol import (
    IO_TIMEOUT_S,
    PeerGone,
    ProtocolError,
    check_peer,
    recv_frame,
    send_frame,
)
from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger("fedtune.warm")

CONNECT_TIMEOUT_S = 5.0


def connect(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        check_peer(sock)  # a socket someone else bound must not receive the round
    except (OSError, PermissionError) as err:
        sock.close()
        raise PeerGone(f"no warm trainer of this user at {path}: {err}") from err
    return sock


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


def ping(path: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The service's status (`rounds`, `model`, `preload`, `busy`, …), or None if it does not answer."""
    try:
        with connect(path, timeout) as sock:
            send_frame(sock, {"op": "ping"})
            header, _ = recv_frame(sock)
            return header
    except (PeerGone, OSError, ProtocolError):
        return None
