"""ServerApp side: tell the local exporter that a run's results.json changed. Best effort and quick: the
exporter also finds the file by scanning, so a missing exporter costs nothing. Standard library only (no
prometheus_client in the ServerApp)."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune.metrics")

DEFAULT_PORT = 9400
PORT_ENV = "FEDTUNE_METRICS_PORT"
HOST_ENV = "FEDTUNE_METRICS_HOST"
NOTIFY_URL_ENV = "FEDTUNE_METRICS_NOTIFY_URL"
METRICS_PATH = "/metrics"
NOTIFY_PATH = "/api/v1/notify"


def metrics_port() -> int | None:
    """FEDTUNE_METRICS_PORT as a port, None when unset or 0 (the exporter is off)."""
    value = os.environ.get(PORT_ENV, "").strip()
    return int(value) if value and value != "0" else None


def notify_url() -> str | None:
    url = os.environ.get(NOTIFY_URL_ENV)
    if url:
        return url
    port = metrics_port()
    return None if port is None else f"http://127.0.0.1:{port}{NOTIFY_PATH}"


def notify(results_path: Path, timeout: float = 1.0) -> bool:
    """POST `results_path` to the exporter; False (and a debug line) when nobody answered."""
    url = notify_url()
    if url is None:
        return False
    body = json.dumps({"results": str(Path(results_path).resolve())}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except OSError as err:
        log.debug("exporter notify failed: %s", err)
        return False


def results_notifier(results_path: Path, timeout: float = 1.0) -> Callable[[Any], None]:
    """A per-round callback (the argument, the round's record, is not needed) that notifies the exporter."""

    def on_round(_record: Any = None) -> None:
        notify(results_path, timeout)

    return on_round
