"""The wire protocol between a ClientApp and its node-local warm trainer (clientapp/warm/service.py).

One request and one reply per Unix-socket connection. A frame is an 8-byte big-endian header length, a JSON
header, then the bytes of the Flower Arrays the header lists (`{"key", "dtype", "shape", "stype", "nbytes"}`,
in order). An Array's bytes travel as Flower serialised them (`Array.data`), so neither side converts the
adapter to numpy and back to cross the socket, and a packed adapter (fedtune/packing.py) crosses as its few
large buffers. Both ends import this module — the ClientApp, the service, and the SuperNode's supervisor
(which only `ping`s the service) — and it imports neither torch nor numpy.

Limits, because the socket is a trust boundary even on one host: the header is at most `MAX_HEADER_BYTES`,
the arrays at most `max_payload_bytes()` together, every field is type-checked before it is used, and a
connection that stalls mid-frame for `IO_TIMEOUT_S` is dropped. A malformed frame raises `ProtocolError`
(the service answers it and keeps serving); a peer that goes away raises `PeerGone`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

PROTOCOL_VERSION = 3
SOCKET_NODE_CONFIG_KEY = "trainer-socket"  # the node config entry `fedtune-supernode` adds
SOCKET_ENV = "FEDTUNE_TRAINER_SOCKET"
SOCKET_NAME = "trainer.sock"  # inside the node's private (0700) runtime directory
MAX_HEADER_BYTES = 1 << 20  # run config + node config + round config: kilobytes
DEFAULT_MAX_PAYLOAD_BYTES = 8 << 30  # an 8B model's r16 q/k/v/o adapter is 77 MB; leave room for big LoRAs
MAX_PAYLOAD_ENV = "FEDTUNE_WARM_MAX_PAYLOAD_BYTES"
IO_TIMEOUT_S = 30.0  # longest silence while a frame is in flight
CONNECT_TIMEOUT_S = 5.0
_LENGTH = struct.Struct(">Q")
_CHUNK = 8 << 20
_SPEC_KEYS = {"key": str, "dtype": str, "stype": str}


class ProtocolError(ValueError):
    """A frame that breaks the protocol: too large, not JSON, wrong version, a missing or mistyped field."""


class PeerGone(ConnectionError):
    """The other end is not there, closed the connection mid-frame, or stalled past the timeout."""


def max_payload_bytes() -> int:
    value = os.environ.get(MAX_PAYLOAD_ENV, "").strip()
    return int(value) if value.isdigit() else DEFAULT_MAX_PAYLOAD_BYTES


def socket_path(node_config: dict[str, Any]) -> str | None:
    """Where this node's warm trainer listens, if the SuperNode was started with one."""
    path = node_config.get(SOCKET_NODE_CONFIG_KEY) or os.environ.get(SOCKET_ENV)
    return str(path) if path else None


# ---- the socket's directory and peer ------------------------------------------------------------------


def check_private_dir(directory: Path) -> None:
    """The socket's folder must be ours and closed to everyone else: a socket in a shared folder (/tmp) can be
    bound first by another local user, who would then receive the node's rounds and answer for it."""
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{directory} is owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    if info.st_mode & 0o077:
        raise PermissionError(f"{directory} is open to other users (mode {info.st_mode & 0o777:o}; need 700)")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def check_peer(sock: socket.socket) -> None:
    """Only processes of this user may talk to the trainer (and a ClientApp only to a trainer of its own)."""
    uid = peer_uid(sock)
    if uid != os.getuid():
        raise PermissionError(f"peer uid {uid} is not this user ({os.getuid()})")


# ---- frames ---------------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> memoryview:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            n = sock.recv_into(view[got:], min(_CHUNK, size - got))
        except TimeoutError as err:
            raise PeerGone(f"peer silent for {sock.gettimeout()} s mid-frame") from err
        if n == 0:
            raise PeerGone("connection closed mid-frame")
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
    if len(encoded) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(encoded)} bytes exceeds {MAX_HEADER_BYTES}")
    sock.sendall(_LENGTH.pack(len(encoded)) + encoded)
    for _, array in items:
        sock.sendall(array.data)


def _array_specs(header: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    specs = header.pop("arrays", None)
    if not isinstance(specs, list):
        raise ProtocolError("header lacks its 'arrays' list")
    total = 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise ProtocolError("an array spec is not an object")
        for key, kind in _SPEC_KEYS.items():
            if not isinstance(spec.get(key), kind):
                raise ProtocolError(f"array spec field {key!r} missing or not a {kind.__name__}")
        shape, nbytes = spec.get("shape"), spec.get("nbytes")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"array {spec['key']!r}: shape must be a list of non-negative integers")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError(f"array {spec['key']!r}: nbytes must be a non-negative integer")
        total += nbytes
        if total > limit:
            raise ProtocolError(f"arrays exceed {limit} bytes ({MAX_PAYLOAD_ENV})")
    return specs


def recv_frame(
    sock: socket.socket, max_payload: int | None = None
) -> tuple[dict[str, Any], ArrayRecord | None]:
    """The header and, if the frame lists any, its arrays as a Flower ArrayRecord."""
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {size} exceeds {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(bytes(_recv_exact(sock, size)))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    specs = _array_specs(header, max_payload_bytes() if max_payload is None else max_payload)
    if not specs:
        return header, None
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for spec in specs:
        data = bytes(_recv_exact(sock, spec["nbytes"]))
        try:
            record[spec["key"]] = Array(
                dtype=spec["dtype"], shape=tuple(spec["shape"]), stype=spec["stype"], data=data
            )
        except (TypeError, ValueError) as err:
            raise ProtocolError(f"array {spec['key']!r}: {err}") from err
    return header, record


# ---- the calling end: connect, ping -------------------------------------------------------------------


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


def ping(path: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The service's status (`rounds`, `model`, `preload`, `busy`, …), or None if it does not answer."""
    try:
        with connect(path, timeout) as sock:
            send_frame(sock, {"op": "ping"})
            header, _ = recv_frame(sock)
            return header
    except (PeerGone, OSError, ProtocolError):
        return None
