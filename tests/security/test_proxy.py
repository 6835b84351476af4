"""The Fleet-only proxy as `fedtune-superlink` runs it: the rendered config passes `nginx -t`, the public
port refuses Control/Runtime while the loopback port serves them, and the launcher never leaves one of
its two processes running alone (either dies -> the other is stopped, exit non-zero; the launcher killed
-> both stop)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.certs import generate
from fedtune.errors import FedTuneError
from fedtune.federation import LocalFederation
from superlink import proxy
from tests.host import alive, cmdline, process_tree

needs_nginx = pytest.mark.skipif(
    not (Path("/usr/sbin/nginx").exists() or os.system("command -v nginx >/dev/null 2>&1") == 0),
    reason="needs nginx (scripts/install-proxy.sh)",
)


def _config(tmp_path: Path, listen_port: int = 8000) -> proxy.ProxyConfig:
    files = generate(tmp_path / "certs", ["superlink.example.org"])
    return proxy.ProxyConfig(
        listen_host="0.0.0.0", listen_port=listen_port, upstream_port=9000,
        server_cert=files.server_cert, server_key=files.server_key, ca_cert=files.ca_cert,
        runtime_dir=tmp_path / "run",
    )


def test_config_allows_only_fleet_and_health(tmp_path):
    text = proxy.render(_config(tmp_path))
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location = /health {", "location / {"]
    assert "return 403;" in text.split("location / {")[1]
    assert "proxy_ssl_verify on;" in text and "proxy_ssl_name localhost;" in text
    assert "server 127.0.0.1:9000;" in text and "listen 0.0.0.0:8000 ssl;" in text
    assert "client_max_body_size 32m;" in text  # array chunks of at most 24 MiB, 10 MB FABs
    assert f"keepalive_timeout {proxy.UPSTREAM_IDLE_S}s;" in text
    assert proxy.UPSTREAM_IDLE_S < proxy.SUPERLINK_KEEP_ALIVE_S


def test_print_config_cli_is_the_same_text(tmp_path):
    cfg = _config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "superlink.proxy", "--print-config", "--listen-port", "8000",
         "--upstream-port", "9000", "--ssl-certfile", str(cfg.server_cert), "--ssl-keyfile", str(cfg.server_key),
         "--ssl-ca-certfile", str(cfg.ca_cert), "--runtime-dir", str(cfg.runtime_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == proxy.render(cfg)
    launcher = subprocess.run(
        [sys.executable, "-m", "superlink", "--certs-dir", str(cfg.ca_cert.parent), "--print-proxy-config",
         "--proxy-dir", str(cfg.runtime_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert launcher.returncode == 0, launcher.stderr
    assert launcher.stdout == proxy.render(cfg)


@needs_nginx
def test_nginx_accepts_the_config_and_rejects_a_bad_certificate(tmp_path):
    cfg = _config(tmp_path)
    nginx = proxy.find_nginx()
    proxy.check(nginx, proxy.write(cfg))
    cfg.server_key.write_text("not a key")
    with pytest.raises(FedTuneError, match=r"proxy config rejected by nginx: .*server\.key"):
        proxy.check(nginx, proxy.write(cfg))


def _children(pid: int) -> list[int]:
    out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in out]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@needs_nginx
@pytest.mark.parametrize("victim", ["nginx", "superlink.flower_entry"])
def test_either_process_dying_stops_the_other(tmp_path, victim):
    fed = LocalFederation(tmp_path / "fed")
    tree: list[int] = []
    try:
        fed.start_superlink()
        launcher = fed.superlink.process
        kids = {_cmdline(pid): pid for pid in _children(launcher.pid)}
        roles = {
            "nginx": next(pid for cmd, pid in kids.items() if "nginx" in cmd),
            "superlink.flower_entry": next(pid for cmd, pid in kids.items() if "superlink.flower_entry" in cmd),
        }
        target = roles.pop(victim)
        (other,) = roles.values()
        tree = process_tree(launcher.pid)
        os.kill(target, signal.SIGKILL)
        code = launcher.wait(timeout=60)
        assert code != 0
        deadline = time.monotonic() + 10
        while _alive(other) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(other), f"{_cmdline(other)} still running"
        # nor what the killed one had started: a SIGKILLed nginx master's workers would keep the public port
        # open (the launcher stops the dead master's process group); Flower's SuperExec, in a session of its
        # own, exits when it sees its SuperLink gone
        while [pid for pid in tree if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [cmdline(pid) for pid in tree if alive(pid)]
        assert fed.health() is None
        assert "exited" in fed.superlink.log_text()
    finally:
        fed.stop()
        for pid in tree:  # only if an assertion failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@needs_nginx
def test_public_port_refuses_control_while_loopback_serves_it(tmp_path):
    fed = LocalFederation(tmp_path / "fed")
    try:
        fed.start_superlink()
        assert fed.flwr("ls", "fedtune-local", "--format", "json").returncode == 0  # 127.0.0.1:internal
        from fedtune.flwr_config import write_connection

        write_connection(fed.flwr_home, "public", fed.address, fed.ca_cert, make_default=False)
        done = fed.flwr("ls", "public", "--format", "json")
        assert done.returncode != 0 or '"success": false' in done.stdout
        assert "403" in done.stdout + done.stderr, done.stdout + done.stderr
    finally:
        fed.stop()


def _get_health(conn: ssl.SSLSocket) -> bytes:
    """One GET /health on an open keep-alive connection; the response's status line."""
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received:
        piece = conn.recv(65536)
        if not piece:
            raise ConnectionError(f"the SuperLink closed the connection (got {received!r})")
        received += piece
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += conn.recv(65536)
    return head.split(b"\r\n")[0]


def test_superlink_keeps_an_idle_connection_longer_than_the_proxy(tmp_path):
    """uvicorn arms its idle timer when a response is handed to its socket, not when the proxy has read it;
    with Flower's 5 s, a chunk still draining to a slow node made nginx reuse a connection uvicorn was
    closing, and the node's request hung for its 30 s timeout. The SuperLink must outlast nginx's idle
    close by far: one connection, two requests UPSTREAM_IDLE_S + 4 s apart (past Flower's 5 s)."""
    fed = LocalFederation(tmp_path / "fed")
    try:
        fed.start_superlink()
        context = ssl.create_default_context(cafile=str(fed.ca_cert))
        with socket.create_connection(("127.0.0.1", fed.internal_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=proxy.UPSTREAM_TLS_NAME) as conn:
            assert _get_health(conn).endswith(b"200 OK")
            time.sleep(proxy.UPSTREAM_IDLE_S + 4)
            assert _get_health(conn).endswith(b"200 OK")
    finally:
        fed.stop()


@needs_nginx
def test_public_port_passes_the_largest_array_chunk_and_refuses_more(tmp_path):
    """Flower sends each array chunk in one request: the largest chunk size fedtune allows must get through
    nginx to the SuperLink (whatever it answers to a body that is no PushObjectRequest), a larger body not."""
    import httpx

    from fedtune.runtime_env import MAX_CHUNK_BYTES

    fed = LocalFederation(tmp_path / "fed")
    try:
        fed.start_superlink()
        with httpx.Client(verify=str(fed.ca_cert), timeout=60) as client:
            def push(nbytes: int) -> httpx.Response:
                return client.post(f"https://{fed.address}/v1/fleet/push-object", content=b"\0" * nbytes,
                                   headers={"content-type": "application/protobuf"})

            passed = push(MAX_CHUNK_BYTES + 4096)  # a chunk plus its protobuf framing
            assert passed.status_code != 413 and "nginx" not in passed.text, passed.text[:200]
            assert push(33 * 2**20).status_code == 413
    finally:
        fed.stop()


@needs_nginx
def test_a_sigkilled_launcher_leaves_no_process_behind(tmp_path):
    """kill -9 of the launcher alone (no handler of it runs; not its process group, as stop() would): the
    kernel's parent-death signal stops the SuperLink and nginx, which take their own children along
    (nginx's workers, Flower's SuperExec)."""
    fed = LocalFederation(tmp_path / "fed")
    tree: list[int] = []
    try:
        fed.start_superlink()
        launcher = fed.superlink.process
        tree = process_tree(launcher.pid)
        commands = [cmdline(pid) for pid in tree]
        assert any("superlink.flower_entry" in c for c in commands), commands
        assert any("nginx: master" in c for c in commands), commands
        assert any("nginx: worker" in c for c in commands), commands
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        killed_at = time.monotonic()
        left = tree
        while left and time.monotonic() < killed_at + 10:
            time.sleep(0.1)
            left = [pid for pid in tree if alive(pid)]
        print(f"all {len(tree)} processes of the launcher gone {time.monotonic() - killed_at:.1f} s after kill -9")
        assert not left, [cmdline(pid) for pid in left]
    finally:
        fed.stop()
        for pid in tree:  # only if the assertion failed: they are no longer in the launcher's reach
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
