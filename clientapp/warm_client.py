"""Client side of the node-local warm trainer (supernode/trainer_service.py), and the wire format both use.

Flower starts a fresh ClientApp process for every message. With `fedtune-supernode --warm-trainer`, a
trainer process started next to the SuperNode keeps the quantised model resident; the ClientApp (which then
never imports torch) hands it the round over a local Unix socket and replies with what comes back. If the
service is absent or dies mid-round, the ClientApp trains in-process as before (`train_remote` returns None).

Frame: 8-byte big-endian header length, a JSON header, then the raw bytes of the arrays it lists
(`{"key", "dtype", "shape", "nbytes"}`, C order, in header order).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger("fedtune.warm")

PROTOCOL_VERSION = 1
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


def send_frame(
    sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
) -> None:
    arrays = arrays or {}
    header = dict(
        header,
        v=PROTOCOL_VERSION,
        arrays=[
            {"key": key, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": int(a.nbytes)}
            for key, a in arrays.items()
        ],
    )
    encoded = json.dumps(header).encode()
    sock.sendall(_HEADER.pack(len(encoded)) + encoded)
    for array in arrays.values():
        sock.sendall(memoryview(np.ascontiguousarray(array)).cast("B"))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    header = json.loads(bytes(_recv_exact(sock, size)))
    if header.get("v") != PROTOCOL_VERSION:
        raise FedTuneError(
            f"warm trainer speaks protocol {header.get('v')}, this ClientApp {PROTOCOL_VERSION}"
        )
    arrays = {}
    for spec in header.pop("arrays"):
        data = _recv_exact(sock, spec["nbytes"])
        arrays[spec["key"]] = np.frombuffer(data, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return header, arrays


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.ascontiguousarray(a)) for key, a in arrays.items()})


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
                record_to_numpy(global_arrays),
            )
            header, arrays = recv_frame(sock)
    except (ServiceGone, OSError) as err:
        log.warning("warm trainer unavailable (%s): training in this process", err)
        return None
    if not header.get("ok"):
        raise FedTuneError(f"warm trainer: {header.get('error', 'unknown error')}")
    return numpy_to_record(arrays), header["metrics"], header.get("details", {})


def ping(path: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The service's status, or None if it does not answer."""
    try:
        with connect(path, timeout) as sock:
            send_frame(sock, {"op": "ping"})
            header, _ = recv_frame(sock)
            return header
    except (ServiceGone, OSError):
        return None
