"""The shared plumbing (issue 17): atomic writes, TOML in/out, the parent-death watcher and signal, P-384 keys."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from fedtune import atomic, keygen, toml_io
from tests.conftest import REPO
from tests.host import alive


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "file.json"
    atomic.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    atomic.write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_secret_is_private_from_the_first_byte(tmp_path):
    key = atomic.write_bytes(tmp_path / "key", b"secret", mode=0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = atomic.write_text(tmp_path / "f", "old")

    def boom(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_concurrent_writers_never_tear_a_file(tmp_path):
    target = tmp_path / "shared.txt"
    bodies = [str(i) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic.write_text, args=(target, b)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in bodies


def test_toml_round_trip_and_flat_run_config_keys(tmp_path):
    path = toml_io.write(tmp_path / "run.toml", {"num-server-rounds": 3, "train": {"seq-length": 64}})
    assert toml_io.read(path) == {"num-server-rounds": 3, "train": {"seq-length": 64}}
    assert toml_io.read_flat(path) == {"num-server-rounds": 3, "train.seq-length": 64}
    flat = toml_io.write(tmp_path / "flat.toml", {"train.seq-length": 64})  # dotted keys stay one key
    assert toml_io.read(flat) == {"train.seq-length": 64}


def test_exit_with_parent_fires_when_the_parent_dies(tmp_path):
    """A parent starts a helper that watches it; the parent dies; the helper notices and exits."""
    marker = tmp_path / "gone"
    helper = (
        "import sys, time; from fedtune.process import exit_with_parent; "
        f"exit_with_parent(int(sys.argv[1]), on_gone=lambda: open({str(marker)!r}, 'w').close(), interval=0.1); "
        "time.sleep(30)"
    )
    parent = (  # the helper must not hold our pipes, or run() waits for it
        "import os, subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {helper!r}, str(os.getpid())], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid, flush=True)"
    )
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=REPO, timeout=60)
    helper_pid = int(done.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.1)
    alive = subprocess.run(["kill", "-0", str(helper_pid)], capture_output=True).returncode == 0
    if alive:
        os.kill(helper_pid, 9)
    assert marker.exists()  # noticed within a few polls, while it still had 30 s to sleep


def test_die_with_parent_stops_the_child_of_a_killed_parent():
    """A parent spawns `sleep` with die_with_parent() and is SIGKILLed: the kernel sends sleep SIGTERM."""
    parent = (
        "import subprocess, sys, time; from fedtune.process import die_with_parent; "
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent()); print(p.pid, flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        assert alive(child)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, 9)


def test_die_with_parent_refuses_other_threads():
    from fedtune.process import die_with_parent

    errors: list[Exception] = []

    def spawn() -> None:
        try:
            die_with_parent()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def test_one_key_type():
    key = keygen.new_private_key()
    assert keygen.is_fedtune_key(key) and keygen.is_fedtune_key(key.public_key())
    from cryptography.hazmat.primitives.asymmetric import ec

    assert not keygen.is_fedtune_key(ec.generate_private_key(ec.SECP256R1()))
