"""Attacks on the node-local warm trainer (issue 13 items 6 and 8), each shown to fail: socket squatting,
another user's connection, malformed and idle clients; and its lifecycle: the SuperNode's start fails when the
trainer never becomes ready, and a trainer that dies is started again."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.host import processes_mentioning

NOBODY = 65534


def private_dir(tmp_path: Path, name: str = "run") -> Path:
    folder = tmp_path / name
    folder.mkdir(mode=0o700)
    return folder


def start_service(sock: Path, *extra: str, user: int | None = None) -> subprocess.Popen[bytes]:
    ready = sock.parent.parent / f"{sock.parent.name}.ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clientapp.warm.service", "--socket", str(sock), "--ready-file", str(ready), *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        user=user,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"service exited {proc.returncode}: {proc.stdout.read().decode()}")
        assert time.monotonic() < deadline, "service did not come up"
        time.sleep(0.05)
    return proc


@pytest.fixture
def service(tmp_path):
    sock = private_dir(tmp_path) / "trainer.sock"
    proc = start_service(sock, "--io-timeout", "1.5")
    yield proc, sock
    proc.kill()
    proc.wait(timeout=30)


def raw(sock: Path, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return whatever the service answers before it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def frame(header: dict) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack(">Q", len(encoded)) + encoded


def error_of(answer: bytes) -> str:
    (size,) = struct.unpack(">Q", answer[:8])
    header = json.loads(answer[8 : 8 + size])
    assert header["ok"] is False
    return header["error"]


def ping(sock: Path) -> dict | None:
    from clientapp.warm.protocol import ping as warm_ping

    return warm_ping(str(sock), timeout=5.0)


# ---- malformed and idle clients (item 8) -------------------------------------------------------------------

V = 3  # clientapp.warm.protocol.PROTOCOL_VERSION, spelled out: a change must be deliberate


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (struct.pack(">Q", 2**40), "header length"),
        (struct.pack(">Q", 9) + b"{not json", "not JSON"),
        (struct.pack(">Q", 4) + b"\xff\xfe\xfd\xfc", "not JSON"),
        (frame([1, 2]), "not a JSON object"),
        (frame({"op": "ping", "arrays": []}), "protocol version"),
        (frame({"op": "ping", "v": 2, "arrays": []}), "protocol version"),
        (frame({"op": "ping", "v": V}), "'arrays'"),
        (frame({"op": "train", "v": V, "arrays": []}), "'run_config'"),
        (frame({"op": "train", "v": V, "arrays": [], "run_config": {}, "node_config": {}, "round": {}}), "without adapter"),
        (frame({"op": "launch", "v": V, "arrays": []}), "unknown op"),
        (frame({"op": "ping", "v": V, "arrays": [{"key": "a", "dtype": "float32", "shape": [1], "stype": "numpy.ndarray", "nbytes": -4}]}), "nbytes"),
        (frame({"op": "ping", "v": V, "arrays": [{"key": "a", "dtype": "float32", "shape": [1], "stype": "numpy.ndarray", "nbytes": 2**50}]}), "exceed"),
        (frame({"op": "ping", "v": V, "arrays": [{"key": 7, "dtype": "float32", "shape": [1], "stype": "x", "nbytes": 4}]}), "'key'"),
        (frame({"op": "ping", "v": V, "arrays": ["x"]}), "not an object"),
    ],
)
def test_malformed_frames_get_an_error_and_the_service_stays_up(service, payload, reason):
    proc, sock = service
    assert reason in error_of(raw(sock, payload))
    assert proc.poll() is None
    status = ping(sock)
    assert status is not None and status["rejected"] >= 1


def test_truncated_frames_and_idle_connections_never_block_the_service(service):
    proc, sock = service
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(sock))  # says nothing
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(sock))
    stalled.sendall(struct.pack(">Q", 100) + b'{"op": ')  # half a header, then silence
    started = time.monotonic()
    assert ping(sock) is not None  # served while both are still open
    assert time.monotonic() - started < 2.0
    for conn in (idle, stalled):  # dropped after the 1.5 s I/O timeout
        conn.settimeout(10)
        assert conn.recv(1) == b""
        conn.close()
    flood = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(40)]
    for conn in flood:
        with contextlib.suppress(OSError):
            conn.connect(str(sock))
    for conn in flood:
        conn.close()
    time.sleep(2.0)
    assert ping(sock) is not None and proc.poll() is None


# ---- the socket's home (item 6) ----------------------------------------------------------------------------


def test_service_refuses_a_socket_in_a_folder_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    done = subprocess.run(
        [sys.executable, "-m", "clientapp.warm.service", "--socket", str(shared / "trainer.sock")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "open to other users" in done.stderr
    assert not (shared / "trainer.sock").exists()


def test_launcher_refuses_a_socket_path_too_long_for_unix_sockets(tmp_path):
    from fedtune.errors import FedTuneError
    from supernode.warm_trainer import private_socket

    with pytest.raises(FedTuneError, match="a Unix socket path may have 107"):
        private_socket(str(private_dir(tmp_path) / ("x" * 120 + ".sock")), 9094)


def test_launcher_socket_is_private_and_unpredictable(tmp_path):
    from fedtune.errors import FedTuneError
    from supernode.warm_trainer import private_socket

    first, second = Path(private_socket(None, 9094)), Path(private_socket(None, 9094))
    for path in (first, second):
        mode = stat.S_IMODE(path.parent.stat().st_mode)
        assert mode == 0o700 and path.parent.stat().st_uid == os.getuid()
    assert first != second  # no fixed name another user could bind first
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(FedTuneError, match="open to other users"):
        private_socket(str(shared / "trainer.sock"), 9094)
    created = Path(private_socket(str(tmp_path / "new" / "trainer.sock"), 9094))
    assert stat.S_IMODE(created.parent.stat().st_mode) == 0o700
    for path in (first, second):
        path.parent.rmdir()


@pytest.fixture
def traversable():
    """A folder other users may pass through (pytest's own tmp folders are closed to them)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fedtune-test-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_other_user(action) -> int:
    """Run `action()` in a forked child that has become another user (nobody); its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = int(action())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_is_not_served_even_if_the_socket_were_reachable(traversable):
    sock = private_dir(traversable) / "trainer.sock"
    proc = start_service(sock)
    # Defence in depth: open the folder and the socket as a misconfigured volume might; the uid check holds.
    sock.parent.chmod(0o711)
    sock.chmod(0o666)

    def attack() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(sock))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(frame({"op": "ping", "v": V, "arrays": []}))
            try:
                answer = conn.recv(1)
            except ConnectionResetError:
                answer = b""
        return 0 if answer == b"" else 3  # 0: closed unanswered

    try:
        assert as_other_user(attack) == 0
        assert ping(sock)["rejected"] == 1 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_squatters_socket_never_receives_the_round(traversable):
    """Another user bound the path first: the ClientApp sees a peer of the wrong uid and trains in-process."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from clientapp.warm.client import train_remote

    folder = traversable / "squat"
    folder.mkdir()
    folder.chmod(0o777)
    sock = folder / "trainer.sock"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the squatter
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(sock))
            os.chmod(sock, 0o666)
            server.listen(1)
            os.write(write_fd, b"1")
            server.settimeout(20)
            conn, _ = server.accept()
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    data += chunk
            os.write(write_fd, str(len(data)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    assert os.read(read_fd, 1) == b"1"
    arrays = ArrayRecord({"a": Array(np.zeros(1000, dtype=np.float32))})
    assert train_remote(str(sock), {}, {}, {"server-round": 1, "learning-rate": 0.1}, arrays) is None
    received = os.read(read_fd, 64)
    os.waitpid(pid, 0)
    assert received == b"0"  # not a byte of the round reached it


# ---- lifecycle: readiness and restarts ---------------------------------------------------------------------


def test_supernode_start_fails_when_the_trainer_never_becomes_ready(tmp_path):
    folder = private_dir(tmp_path)
    sock = folder / "trainer.sock"
    sock.mkdir()  # a folder where the socket should be: the service cannot listen there
    done = subprocess.run(
        [
            sys.executable, "-m", "supernode.launch", "--superlink", "127.0.0.1:1", "--insecure",
            "--partition-id", "0", "--warm-trainer", "--trainer-socket", str(sock),
            "--compile-cache", str(tmp_path / "cache"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "FEDTUNE_WARM_TRAINER_READY_TIMEOUT": "4"},
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "warm trainer not ready" in line]
    assert lines, done.stderr[-2000:]
    time.sleep(1.0)
    assert processes_mentioning(str(sock)) == []  # the supervisor and its service were stopped


def test_a_dead_trainer_is_started_again(tmp_path):
    from clientapp.warm.protocol import ping as warm_ping

    sock = private_dir(tmp_path) / "trainer.sock"
    # torch sets TORCHINDUCTOR_CACHE_DIR in this pytest process once anything compiled here; a node's own
    # setting wins over --compile-cache, so start the supervisor as a node starts: without it
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "supernode.warm_trainer", "--socket", str(sock),
         "--compile-cache", str(tmp_path / "cache")],
        cwd=REPO, env={**node_env, "PYTHONPATH": str(REPO)},
    )
    try:
        def wait_pid(not_pid: int | None, timeout: float = 60.0) -> int:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = warm_ping(str(sock), timeout=2.0)
                if status is not None and status["pid"] != not_pid:
                    return int(status["pid"])
                time.sleep(0.2)
            raise AssertionError("the warm trainer did not come (back) up")

        first = wait_pid(None)
        os.kill(first, 9)
        second = wait_pid(first)
        assert second != first and supervisor.poll() is None
        env = Path(f"/proc/{second}/environ").read_bytes().split(b"\0")
        assert f"TORCHINDUCTOR_CACHE_DIR={tmp_path / 'cache'}".encode() in env  # compile cache persists
    finally:
        supervisor.terminate()
        supervisor.wait(timeout=30)
    time.sleep(0.5)
    assert processes_mentioning(str(sock)) == []


def test_supernode_entry_shortens_only_flowers_fixed_waits(monkeypatch):
    """supernode/flower_entry.py: the idle poll (3 s) and the reply check (0.5 s) shrink; any other wait
    stays; the idle wait counts from the start of the last poll, so a poll the SuperLink held for longer
    than the period is followed by the next at once."""
    import flwr.supernode.start_client_internal as internal

    from supernode import flower_entry

    slept: list[float] = []
    monkeypatch.setattr(flower_entry.time, "sleep", slept.append)
    clock = flower_entry.PollClock(0.7)
    for seconds in (3, 0.5, 2.0):
        clock.sleep(seconds)
    assert slept == [0.7, flower_entry.REPLY_CHECK_S, 2.0]

    polls: list[float] = []
    now = [100.0]
    monkeypatch.setattr(flower_entry.time, "monotonic", lambda: now[0])

    def held_poll(hold: float) -> str:  # start_client_internal's _pull_and_store_message, held `hold` s
        polls.append(hold)
        now[0] += hold
        return "none"

    pull_and_store = clock.polling(held_poll)
    # fedtune.store_on_arrival binds the wrapped function's arguments by name
    assert inspect.signature(pull_and_store) == inspect.signature(held_poll)
    assert pull_and_store(0.5) == "none" and polls == [0.5]
    slept.clear()
    clock.sleep(3)  # 0.5 s of the 0.7 s period went to the poll itself
    pull_and_store(2.0)
    clock.sleep(3)  # held past the period: no wait at all
    assert slept == [pytest.approx(0.2), 0.0]
    assert clock.time is time.time and clock.perf_counter is time.perf_counter
    assert internal.time is time  # what main() replaces: start_client_internal's own `time`
    monkeypatch.setenv(flower_entry.POLL_ENV, "abc")
    with pytest.raises(SystemExit, match="must be a number"):
        flower_entry.poll_seconds()


_LOOP_DIES = """
import threading, time
import flwr.supernode.cli as cli
import fedtune.process
from supernode import flower_entry

fedtune.process.EXIT_GRACE_S = 1.0

def flower_supernode():  # Flower's: the Runtime API server in a non-daemon thread, then the node's loop
    threading.Thread(target=time.sleep, args=(3600,), name="supernode-runtime-http-api").start()
    raise KeyError("object_store")

cli.flower_supernode = flower_supernode
flower_entry.main()
"""


def test_a_supernode_whose_loop_dies_exits_non_zero_despite_flowers_server_thread(tmp_path):
    """Without the guard the process stays up for good (Python waits for the non-daemon thread)."""
    env = {**os.environ, "FEDTUNE_CLIENTAPP_PRESTART": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", _LOOP_DIES], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "KeyError: 'object_store'" in done.stderr  # the traceback is still printed
