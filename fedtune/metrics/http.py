"""The HTTP endpoint: /metrics, /healthz, and /api/v1/notify (loopback only).

Every request is bounded: a connection that stalls is dropped after REQUEST_TIMEOUT seconds (so a client
announcing a body it never sends, or a slow header, holds a thread for that long at most); a notify body
must declare a Content-Length between 0 and MAX_NOTIFY_BYTES; the announced path must be an absolute
results.json that is a regular file within the results size cap (a FIFO or /dev/zero is refused here, and
fedtune.metrics.state re-checks when it reads)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from fedtune.metrics.notify import METRICS_PATH, NOTIFY_PATH
from fedtune.metrics.state import NotAResultsFile, State, check_results_file
from fedtune.results import RESULTS_FILE

REQUEST_TIMEOUT = 10.0  # seconds a connection may stay silent
MAX_NOTIFY_BYTES = 4096  # {"results": "<an absolute path>"}
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
StartResponse = Callable[..., Any]


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # socketserver.StreamRequestHandler applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _answer(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode() + b"\n"]


def _notify(state: State, environ: dict[str, Any]) -> tuple[str, str]:
    """(HTTP status, text) for a POST to the notify path; announces the file when it is acceptable."""
    if environ.get("REMOTE_ADDR") not in LOOPBACK:
        return "403 Forbidden", "loopback only"
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return "411 Length Required", "a Content-Length is required"
    if length < 0:
        return "400 Bad Request", "negative Content-Length"
    if length > MAX_NOTIFY_BYTES:
        return "413 Content Too Large", f"at most {MAX_NOTIFY_BYTES} bytes"
    try:
        body = environ["wsgi.input"].read(length)
    except OSError:  # includes the socket timeout of a client that never sends its body
        return "408 Request Timeout", "body not received"
    try:
        results = Path(str(json.loads(body)["results"]))
    except (ValueError, KeyError, TypeError):
        return "400 Bad Request", 'expected {"results": "/abs/path/results.json"}'
    if results.name != RESULTS_FILE or not results.is_absolute():
        return "400 Bad Request", "not an absolute path to a results.json"
    try:
        check_results_file(results)
    except (OSError, NotAResultsFile) as err:
        return "400 Bad Request", f"not a readable results file: {err}"
    state.announce(results)
    return "202 Accepted", "ok"


WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(state: State, registry: CollectorRegistry) -> WsgiApp:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == NOTIFY_PATH and method == "POST":
            status, text = _notify(state, environ)
            if not status.startswith("202"):
                state.count_error("notify")
            return _answer(start_response, status, text)
        if path in ("/healthz", "/-/healthy"):
            return _answer(start_response, "200 OK", "ok")
        if path in (METRICS_PATH, "/"):
            return metrics_app(environ, start_response)
        return _answer(start_response, "404 Not Found", "not found; metrics are at /metrics")

    return app


class _Server(ThreadingWSGIServer):
    daemon_threads = True  # a stuck client never delays the exporter's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_http_server(host: str, port: int, state: State, registry: CollectorRegistry) -> WSGIServer:
    server_class = _Server6 if ":" in host else _Server
    return make_server(host, port, make_app(state, registry), server_class, handler_class=_Handler)
