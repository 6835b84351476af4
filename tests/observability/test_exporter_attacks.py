"""Attacks on the exporter (issue 13, item 9), each performed for real and shown to fail:

- a run whose results.json holds a list where a number belongs: /metrics keeps answering 200 for every
  other run (also to a real Prometheus), and the run is back once its file is fixed; gone once it is gone;
- a FIFO, /dev/zero (through a symlink) or an oversize file posted to notify: refused at once; under the
  output root: the scan neither blocks nor reads them;
- `Content-Length: -1`, an absurd length, no length, a body that never comes, a silent connection:
  refused or dropped, no thread pinned past the request timeout;
- thousands of announced paths or run folders: what the exporter tracks stays bounded;
- the bind address follows the SuperLink's host (loopback stays loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedtune.federation import free_port
from fedtune.metrics import cli, http
from fedtune.metrics.service import Exporter
from fedtune.metrics.sidecar import control_address, sidecar_command
from fedtune.metrics.state import MAX_RESULTS_BYTES
from tests.observability.helpers import Prometheus, need_tool
from tests.observability.test_exporter import get, round_record, scrape, write_results

NOTIFY = "/api/v1/notify"


@pytest.fixture
def exporter(tmp_path, monkeypatch):
    monkeypatch.setattr(http._Handler, "timeout", 1.0)  # the attacks below wait for it
    exp = Exporter([tmp_path / "outputs"], host="127.0.0.1", port=free_port(), interval=0.1, max_runs=3).start()
    yield exp
    exp.stop()


def post(port: int, payload: object) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{NOTIFY}", data=json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def raw_request(port: int, head: bytes, wait: float = 5.0) -> bytes:
    """Send `head` as is; whatever the server answers before it closes (or `wait` runs out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(head)
        chunks = []
        try:
            while chunk := conn.recv(4096):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open>")
        return b"".join(chunks)


def in_thread(target, timeout: float = 20.0) -> None:
    """Run `target`; fail if it has not returned within `timeout` (it would block forever)."""
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"{target} blocked"


def errors(samples, source: str) -> float:
    return samples.get(("fedtune_exporter_errors_total", (("source", source),)), 0.0)


def test_list_valued_metric_isolated_then_recovers(tmp_path, exporter):
    root = tmp_path / "outputs"
    write_results(root, 1, [round_record(1, {"11": 1000})])
    bad_round = round_record(1, {"21": 1000})
    bad_round["nodes"]["21"]["train_loss"] = [1.0, 2.0]  # what a node's list-valued train-loss became
    bad = write_results(root, 2, [bad_round])
    exporter.state.refresh()
    s = scrape(exporter.port)  # 200, not 500
    assert get(s, "fedtune_round", run_id=1) == 1
    assert ("fedtune_round", (("run_id", "2"),)) not in s
    assert errors(s, "collect") >= 1
    bad.unlink()  # gone: nothing about it is left, nothing fails any more
    exporter.state.refresh()
    before = errors(scrape(exporter.port), "collect")
    s = scrape(exporter.port)
    assert errors(s, "collect") == before
    assert not [k for k in s if ("run_id", "2") in k[1]]
    write_results(root, 2, [round_record(1, {"21": 1000})])  # fixed: back
    exporter.state.refresh()
    assert get(scrape(exporter.port), "fedtune_round", run_id=2) == 1


def test_garbage_results_files_never_stop_a_scan(tmp_path, exporter):
    root = tmp_path / "outputs"
    for run, text in enumerate(['{"rounds": 5}', "[]", '{"run_id": 1, "rounds": [{"round": "x"}]}', "{"]):
        (root / f"g{run}").mkdir(parents=True)
        (root / f"g{run}" / "results.json").write_text(text)
    write_results(root, 7, [round_record(1, {"11": 10})])
    exporter.state.refresh()
    once = errors(scrape(exporter.port), "results")
    exporter.state.refresh()
    exporter.state.refresh()
    s = scrape(exporter.port)
    assert errors(s, "results") == once  # counted (and logged) once per file version, not once per scan
    assert get(s, "fedtune_round", run_id=7) == 1
    assert errors(s, "results") + errors(s, "collect") >= 4


def test_fifo_and_devices_refused_and_never_block(tmp_path, exporter):
    root = tmp_path / "outputs"
    fifo = root / "fifo" / "results.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    zero = root / "zero" / "results.json"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")
    big = root / "big" / "results.json"
    big.parent.mkdir()
    with open(big, "wb") as handle:
        handle.truncate(MAX_RESULTS_BYTES + 1)  # sparse: costs no disk
    for path in (fifo, zero, big):
        assert post(exporter.port, {"results": str(path)}) == 400, path
    write_results(root, 1, [round_record(1, {"11": 10})])
    in_thread(exporter.state.refresh)  # the scan skips them without opening the FIFO's writer end
    s = scrape(exporter.port)
    assert get(s, "fedtune_round", run_id=1) == 1
    assert errors(s, "notify") == 3
    assert set(exporter.state.snapshot()[0]) == {"1"}


def test_file_swapped_for_a_fifo_after_notify(tmp_path, exporter):
    path = write_results(tmp_path / "elsewhere", 5, [round_record(1, {"11": 10})])
    assert post(exporter.port, {"results": str(path)}) == 202
    exporter.state.refresh()
    assert get(scrape(exporter.port), "fedtune_round", run_id=5) == 1
    path.unlink()
    os.mkfifo(path)
    in_thread(exporter.state.refresh)
    assert not [k for k in scrape(exporter.port) if ("run_id", "5") in k[1]]


@pytest.mark.parametrize(
    ("header", "status"),
    [(b"Content-Length: -1\r\n", b"400"), (b"Content-Length: 1099511627776\r\n", b"413"),
     (b"Content-Length: abc\r\n", b"411"), (b"", b"411")],
)
def test_bad_content_length_refused_at_once(exporter, header, status):
    reply = raw_request(exporter.port, b"POST " + NOTIFY.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == status, reply[:200]


def test_stalled_clients_do_not_pin_threads(exporter):
    # A body announced but never sent, and a connection that says nothing: both closed by the server
    # after the request timeout (1 s here), long before our own 5 s wait.
    body_never_sent = b"POST " + NOTIFY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    assert b"<still open>" not in raw_request(exporter.port, body_never_sent)
    assert b"<still open>" not in raw_request(exporter.port, b"")
    before = threading.active_count()
    conns = [socket.create_connection(("127.0.0.1", exporter.port)) for _ in range(20)]
    try:
        reference = get(scrape(exporter.port), "fedtune_communication_budget_reference_mb")
        assert reference == pytest.approx(2942.79)  # still serving
        time.sleep(3.0)
        assert threading.active_count() <= before + 2  # their handler threads are gone
    finally:
        for conn in conns:
            conn.close()


def test_tracked_runs_are_bounded(tmp_path, exporter):
    elsewhere = tmp_path / "elsewhere"
    paths = [write_results(elsewhere, run, []) for run in range(300)]
    for path in paths:
        exporter.state.announce(path)
    assert len(exporter.state.announced) <= exporter.state.max_announced
    for run in range(300):
        write_results(tmp_path / "outputs", 1000 + run, [], status="completed")
    exporter.state.refresh()
    assert len(exporter.state.runs) <= exporter.state.scan_limit
    exported = {dict(k[1]).get("run_id") for k in scrape(exporter.port) if k[0] == "fedtune_run_status"}
    assert len(exported) <= 3  # max_runs (none of them is running)


def test_bad_run_alongside_good_one_scraped_by_real_prometheus(tmp_path, exporter):
    need_tool("prometheus")
    root = tmp_path / "outputs"
    write_results(root, 1, [round_record(1, {"11": 1000})])
    bad_round = round_record(1, {"21": 1000})
    bad_round["nodes"]["21"]["peak_memory_bytes"] = {"nested": "object"}
    write_results(root, 2, [bad_round])
    exporter.state.refresh()
    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{exporter.port}"]).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not prometheus.query('fedtune_round{run_id="1"}'):
            time.sleep(0.5)
        assert prometheus.value('up{job="fedtune-superlink"}') == 1
        assert prometheus.value('fedtune_round{run_id="1"}') == 1
        assert prometheus.query('fedtune_round{run_id="2"}') == []
        assert prometheus.value('fedtune_exporter_errors_total{source="collect"}') >= 1
    finally:
        prometheus.stop()


def test_binds_the_superlinks_host(monkeypatch):
    for name in ("FEDTUNE_METRICS_HOST", "FEDTUNE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert cli.build_parser().parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("FEDTUNE_HOST", "0.0.0.0")  # the SuperLink itself is public here
    assert cli.build_parser().parse_args([]).host == "0.0.0.0"
    monkeypatch.setenv("FEDTUNE_METRICS_PORT", "9400")
    args = argparse.Namespace(host="127.0.0.1", port=8000, internal_port=9000, insecure=False,
                              ssl_ca_certfile="/ca.crt", certs_dir=None)
    cmd = sidecar_command(args, parent_pid=1)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9000"  # the Control API behind the proxy
    assert control_address(argparse.Namespace(host="0.0.0.0", port=8000, insecure=True)) == "127.0.0.1:8000"
    monkeypatch.setenv("FEDTUNE_METRICS_PORT", "0")
    assert sidecar_command(args) is None


def test_loopback_exporter_is_not_reachable_elsewhere(exporter):
    host = exporter.server.server_address[0]
    assert host == "127.0.0.1"


def test_notifier_does_not_load_prometheus_client():
    code = "import sys, fedtune.metrics.notify; assert 'prometheus_client' not in sys.modules, 'loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


def test_old_import_path_and_module_still_work(tmp_path):
    code = ("import sys; from fedtune.exporter import results_notifier; "
            "assert 'prometheus_client' not in sys.modules; from fedtune.exporter import Exporter, main")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "fedtune.exporter", "--help"], capture_output=True, text=True,
                          cwd=repo)
    assert done.returncode == 0 and "fedtune-exporter" in done.stdout, done.stderr
