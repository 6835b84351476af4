"""Helpers for the observability tests: a real Prometheus on loopback, PromQL over its HTTP API, a TCP relay,
tshark byte counts, and the dashboard's expressions."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.federation import free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "fedtune.json"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
PROM_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
# Grafana variables -> values PromQL accepts, for checking the dashboard's expressions.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$run_id": ".*"}
METRIC_RE = re.compile(r"\b(fedtune_[a-z0-9_]+|up)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (scripts/install-monitoring.sh, `make tools`)")
    return path


# -- Prometheus ---------------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path] | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files or []],
            "scrape_configs": [
                {"job_name": "fedtune-superlink", "static_configs": [{"targets": targets}]},
            ],
        }
        self.config = self.workdir / "prometheus.yml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Prometheus:
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                need_tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as ready:
                if ready.status == 200:
                    return self
            time.sleep(0.5)
        raise AssertionError("Prometheus did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            payload = json.loads(response.read())
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])


# -- A byte-transparent TCP relay: the SuperNodes' connections, apart from the ServerApp's -------------
class Relay:
    """SuperNodes reach the SuperLink through this loopback relay, so a capture on its port holds exactly
    the SuperNode <-> SuperLink traffic (the ServerApp talks to the same SuperLink port over loopback)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.server.close()


# -- tshark ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture(port: int, pcap: Path) -> Iterator[Path]:
    """tshark on loopback, TCP port `port`, into `pcap` for the duration of the block."""
    tshark = need_tool("tshark")
    if os.geteuid() != 0:
        pytest.skip("capturing on loopback needs root (dumpcap is installed without setuid)")
    log = open(pcap.with_suffix(".log"), "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [tshark, "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap), "-q"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "Capturing on" not in pcap.with_suffix(".log").read_text():
        assert process.poll() is None, pcap.with_suffix(".log").read_text()
        time.sleep(0.2)
    try:
        yield pcap
    finally:
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
        log.close()


def tcp_payload_bytes(pcap: Path, server_port: int) -> dict[str, int]:
    """TCP payload bytes by direction: down = from `server_port`, up = to it."""
    out = subprocess.run(
        [need_tool("tshark"), "-r", str(pcap), "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.len"],
        capture_output=True, text=True, check=True,
    ).stdout
    totals = {"down": 0, "up": 0}
    for line in out.splitlines():
        src, _, length = line.partition("\t")
        if not length:
            continue
        totals["down" if int(src) == server_port else "up"] += int(length)
    return totals


# -- the dashboard ------------------------------------------------------------------------------------------
def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    flat: list[dict[str, Any]] = []
    for panel in panels:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in flat if p.get("type") != "row"]


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def exported_names(metrics_text: str) -> set[str]:
    """Metric names in a /metrics exposition (samples and TYPE lines)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
