"""Client side of the node-local warm trainer (supernode/trainer_service.py), and the wire format both use.

Flower starts a fresh ClientApp process for every message. With `fedtune-supernode --warm-trainer`, a
trainer process started next to the SuperNode keeps the quantised model resident; the ClientApp (which then
never imports torch) hands it the round over a local Unix socket and replies with what comes back. If the
service is absent or dies mid-round, the ClientApp trains in-process as before (`train_remote` returns None).

Frame: 8-byte big-endian header length, a JSON header, then the bytes of the Flower Arrays it lists
(`{"key", "dtype", "shape", "stype", "nbytes"}`, in header order). An Array's bytes travel as Flower
serialised them (`Array.data`): neither side converts 77 MB of adapter to numpy and back to cross the socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger("fedtune.warm")

PROTOCOL_VERSION = 2
SOCKET_NODE_CONFIG_KEY = "trainer-socket"
SOCKET_ENV = "FEDTUNE_TRAINER_SOCKET"
CONNECT_TIMEOUT_S = 5.0
_HEADER = struct.Struct(">Q")
_CHUNK = 8 << 20


class ServiceGone(ConnectionError):
    """The warm trainer is not there, or went away mid-round."""


def socket_path(node_config: dict[str, Any]) -> str | None:
    """Where this node's warm trainer listens, if the SuperNode was started with one."""
    path = node_config.get(SOCKET_NODE_CONFIG_KEY) or os.environ.get(SOCKET_ENV)
    return str(path) if path else None


# ---- framing -------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> memoryview:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(_CHUNK, size - got))
        if n == 0:
            raise ServiceGone("connection closed mid-frame")
        got += n
    return view


def send_frame(sock: socket.socket, header: dict[str, Any], arrays: ArrayRecord | None = None) -> None:
    items = list(arrays.items()) if arrays is not None else []
    header = dict(
        header,
        v=PROTOCOL_VERSION,
        arrays=[
            {"key": key, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype, "nbytes": len(a.data)}
            for key, a in items
        ],
    )
    encoded = json.dumps(header).encode()
    sock.sendall(_HEADER.pack(len(encoded)) + encoded)
    for _, array in items:
        sock.sendall(array.data)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], ArrayRecord | None]:
    """The header and, if the frame lists any, its arrays as a Flower ArrayRecord."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    header = json.loads(bytes(_recv_exact(sock, size)))
    if header.get("v") != PROTOCOL_VERSION:
        raise FedTuneError(
            f"warm trainer speaks protocol {header.get('v')}, this ClientApp {PROTOCOL_VERSION}"
        )
    specs = header.pop("arrays")
    if not specs:
        return header, None
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for spec in specs:
        data = bytes(_recv_exact(sock, spec["nbytes"]))
        record[spec["key"]] = Array(
            dtype=spec["dtype"], shape=tuple(spec["shape"]), stype=spec["stype"], data=data
        )
    return header, record


# ---- client --------------------------------------------------------------------------------------


def connect(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise ServiceGone(f"no warm trainer at {path}: {err}") from err
    sock.settimeout(None)  # a round takes as long as it takes; the service answers or the socket breaks
    return sock


def train_remote(
    path: str,
    run_config: dict[str, Any],
    node_config: dict[str, Any],
    round_config: dict[str, Any],
    global_arrays: ArrayRecord,
) -> tuple[ArrayRecord, dict[str, int | float], dict[str, Any]] | None:
    """Have the warm trainer run the round. None if it is unreachable or died (train in-process then);
    a training error it reports is raised."""
    try:
        with connect(path) as sock:
            send_frame(
                sock,
                {"op": "train", "run_config": run_config, "node_config": node_config, "round": round_config},
                global_arrays,
            )
            header, arrays = recv_frame(sock)
    except (ServiceGone, OSError) as err:
        log.warning("warm trainer unavailable (%s): training in this process", err)
        return None
    if not header.get("ok"):
        raise FedTuneError(f"warm trainer: {header.get('error', 'unknown error')}")
    if arrays is None:
        raise FedTuneError("warm trainer replied without arrays")
    return arrays, header["metrics"], header.get("details", {})


def ping(path: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The service's status, or None if it does not answer."""
    try:
        with connect(path, timeout) as sock:
            send_frame(sock, {"op": "ping"})
            header, _ = recv_frame(sock)
            return header
    except (ServiceGone, OSError):
        return None
