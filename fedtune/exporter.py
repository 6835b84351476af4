"""`fedtune-exporter`: Prometheus metrics of fedtune runs, from a long-lived process on the SuperLink host.

Why a separate process: Flower starts a new, short-lived ServerApp process per run, so an endpoint inside it
would vanish between runs (and with a crashed run). The exporter lives as long as the SuperLink (the
`fedtune-superlink` launcher starts it next to the SuperLink when FEDTUNE_METRICS_PORT is set; it exits
when the SuperLink does) and is fed from two sources:

1. results.json of every run under the output root(s) (FEDTUNE_OUTPUT_DIR): the ServerApp rewrites it
   atomically after every round, so it is the durable source of truth. The exporter re-reads a file when
   its mtime/size changes and rebuilds every series from it: an exporter restart loses nothing, and
   counters stay monotonic. The ServerApp also POSTs the file's path to /api/v1/notify after each round
   (loopback only) so a round shows up at once, and runs writing outside the output root are found.
2. The SuperLink's Control API (what `flwr ls` shows): per-run status and network traffic, the bytes the
   SuperLink actually exchanged for the run (`kind="wire"`), polled every few seconds.

The HTTP endpoint runs in its own threads: it keeps answering while a round is in flight.
See docs/observability.md for the metric reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger("fedtune.exporter")

DEFAULT_PORT = 9400
PORT_ENV = "FEDTUNE_METRICS_PORT"
HOST_ENV = "FEDTUNE_METRICS_HOST"
NOTIFY_URL_ENV = "FEDTUNE_METRICS_NOTIFY_URL"
METRICS_PATH = "/metrics"
NOTIFY_PATH = "/api/v1/notify"
RESULTS_FILE = "results.json"
MB = 1024 * 1024
REFERENCE_BUDGET_MB = 2942.79  # fedtune.accounting.REFERENCE_BUDGET_MB (kept import-free here)
DEFAULT_LIMIT_MB = 200_000.0
ROUND_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
RUN_STATUSES = ("pending", "running", "completed", "failed", "stopped")
NODE_STATES = ("sampled", "replied", "failed", "rejected")
DIRECTIONS = ("down", "up")  # down: SuperLink -> SuperNode (global adapter); up: SuperNode -> SuperLink


# ---------------------------------------------------------------------------------------------------
# State: what the exporter knows about each run
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunView:
    """One run's results.json, as last read."""

    path: Path
    stamp: tuple[float, int] = (0.0, 0)  # (mtime, size): re-read only on change
    payload: dict[str, Any] = field(default_factory=dict)
    last_round_at: float = 0.0  # when the latest finished round was first seen (unix time)

    @property
    def run_id(self) -> str:
        return str(self.payload.get("run_id", self.path.parent.name))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.payload.get("rounds") or [])


@dataclass
class Traffic:
    """A run as the SuperLink lists it (`flwr ls`)."""

    status: str
    bytes_sent: int  # SuperLink -> SuperNodes
    bytes_recv: int  # SuperNodes -> SuperLink
    started_at: float = 0.0


class State:
    def __init__(self, roots: Iterable[Path], max_runs: int = 20) -> None:
        self.roots = [Path(r).expanduser() for r in roots]
        self.max_runs = max_runs
        self.lock = threading.Lock()
        self.runs: dict[Path, RunView] = {}
        self.extra_files: set[Path] = set()  # announced via /api/v1/notify
        self.traffic: dict[str, Traffic] = {}
        self.superlink_up: float | None = None  # None: polling disabled
        self.last_refresh = 0.0
        self.errors: dict[str, int] = {"results": 0, "superlink": 0}
        self.wake = threading.Event()

    # -- results.json -----------------------------------------------------------------------------
    def announce(self, path: Path) -> None:
        with self.lock:
            self.extra_files.add(path)
        self.wake.set()

    def _candidates(self) -> set[Path]:
        found: set[Path] = set()
        for root in self.roots:
            if root.is_dir():
                found.update(p for p in root.glob(f"*/{RESULTS_FILE}"))
        with self.lock:
            found.update(self.extra_files)
        return found

    def refresh(self) -> None:
        now = time.time()
        for path in self._candidates():
            try:
                st = path.stat()
            except OSError:
                continue
            view = self.runs.get(path)
            stamp = (st.st_mtime, st.st_size)
            if view is not None and view.stamp == stamp:
                continue
            try:
                payload = json.loads(path.read_text())
            except (OSError, ValueError):
                # The ServerApp writes atomically (rename), so this is a foreign/broken file.
                self.errors["results"] += 1
                log.warning("cannot parse %s", path)
                continue
            if not isinstance(payload, dict) or "rounds" not in payload:
                continue
            new = RunView(path, stamp, payload)
            if view is None:
                new.last_round_at = st.st_mtime if payload["rounds"] else _parse_time(payload, "started_at")
            elif len(new.rounds) != len(view.rounds):
                new.last_round_at = now
                log.info(
                    "run %s: round %s recorded",
                    new.run_id,
                    new.rounds[-1].get("round") if new.rounds else 0,
                    extra={"run_id": new.run_id},
                )
            else:
                new.last_round_at = view.last_round_at
            with self.lock:
                self.runs[path] = new
        with self.lock:
            self.last_refresh = now

    # -- SuperLink Control API --------------------------------------------------------------------
    def set_traffic(self, traffic: dict[str, Traffic] | None) -> None:
        with self.lock:
            if traffic is None:
                self.superlink_up = 0.0
                self.errors["superlink"] += 1
            else:
                self.superlink_up = 1.0
                self.traffic = traffic

    # -- the set of runs exported -----------------------------------------------------------------
    def snapshot(self) -> tuple[list[RunView], dict[str, Traffic]]:
        """The most recent `max_runs` runs (running ones always), by start time."""
        with self.lock:
            views = {v.run_id: v for v in self.runs.values()}
            traffic = dict(self.traffic)
        ids = set(views) | set(traffic)

        def started(run_id: str) -> float:
            if run_id in views:
                return _parse_time(views[run_id].payload, "started_at")
            return traffic[run_id].started_at

        def running(run_id: str) -> bool:
            return run_status(views.get(run_id), traffic.get(run_id)) in ("pending", "running")

        ordered = sorted(ids, key=started, reverse=True)
        keep = set(ordered[: self.max_runs]) | {r for r in ids if running(r)}
        return [v for r, v in views.items() if r in keep], {r: t for r, t in traffic.items() if r in keep}


def _parse_time(payload: dict[str, Any], key: str) -> float:
    value = payload.get(key)
    if not value:
        return 0.0
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0


def run_status(view: RunView | None, traffic: Traffic | None) -> str:
    """fedtune's status (results.json) reconciled with Flower's (a killed ServerApp leaves 'running')."""
    flower = traffic.status if traffic is not None else ""
    if flower.startswith("finished:"):
        outcome = flower.split(":", 1)[1]
        ours = str(view.payload.get("status")) if view is not None else ""
        if ours in ("completed", "failed"):
            return ours
        return outcome if outcome in RUN_STATUSES else "failed"
    if view is not None:
        status = str(view.payload.get("status", "running"))
        return status if status in RUN_STATUSES else "running"
    if flower in ("pending", "starting"):
        return "pending"
    return "running" if flower == "running" else "pending"


# ---------------------------------------------------------------------------------------------------
# Collector: every series is computed from the state at scrape time
# ---------------------------------------------------------------------------------------------------
def _reason_class(reason: str) -> str:
    """Bounded label values: serverapp.validation returns short codes; keep only the code."""
    return str(reason).split(":", 1)[0].strip().replace(" ", "-")[:40] or "unknown"


class FedTuneCollector(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        views, traffic = self.state.snapshot()
        by_id = {v.run_id: v for v in views}
        rid = ["run_id"]

        comm = CounterMetricFamily(
            "fedtune_communication_bytes",
            "Adapter bytes exchanged, per run, node and direction. "
            "kind=leaderboard: ArrayRecord.count_bytes() (the FlowerTune budget formula), per node; "
            "kind=wire: bytes the SuperLink reports for the run "
            '(flwr ls network-traffic), node="all". Rounds carried over by a resume are not counted again.',
            labels=["run_id", "node", "direction", "kind"],
        )
        round_bytes = GaugeMetricFamily(
            "fedtune_round_communication_bytes",
            "Leaderboard bytes of the latest finished round, per node and direction.",
            labels=["run_id", "node", "direction"],
        )
        budget_bytes = GaugeMetricFamily(
            "fedtune_communication_budget_bytes",
            "Cumulative communication budget of the run (all rounds, both directions, resumes included).",
            labels=rid,
        )
        budget_mb = GaugeMetricFamily(
            "fedtune_communication_budget_mb",
            "Cumulative communication budget in MB as the leaderboard reports it (bytes / 1024^2).",
            labels=rid,
        )
        limit_mb = GaugeMetricFamily(
            "fedtune_communication_budget_limit_mb",
            "Configured budget limit in MB (comm.budget-limit-mb; the leaderboard's cap is 200000).",
            labels=rid,
        )
        reference_mb = GaugeMetricFamily(
            "fedtune_communication_budget_reference_mb",
            "Budget of the FlowerTune reference submission, in MB (for comparison).",
        )
        reference_mb.add_metric([], REFERENCE_BUDGET_MB)
        current_round = GaugeMetricFamily(
            "fedtune_round", "Latest finished round of the run (0 before the first).", labels=rid
        )
        planned = GaugeMetricFamily("fedtune_rounds_planned", "num-server-rounds of the run.", labels=rid)
        last_round_ts = GaugeMetricFamily(
            "fedtune_round_last_timestamp_seconds",
            "Unix time the latest round finished (the run's start before the first round).",
            labels=rid,
        )
        duration = HistogramMetricFamily(
            "fedtune_round_duration_seconds",
            "Wall time of a round on the ServerApp: from sending the global adapter to the checkpoint.",
            labels=rid,
        )
        nodes = GaugeMetricFamily(
            "fedtune_round_nodes",
            "Nodes in the latest finished round by state (sampled, replied, failed, rejected).",
            labels=["run_id", "state"],
        )
        failures = CounterMetricFamily(
            "fedtune_node_failures",
            "Replies that carried an error (node failed or timed out).",
            labels=["run_id", "node"],
        )
        rejected = CounterMetricFamily(
            "fedtune_rejected_updates",
            "Updates refused by validation, by reason.",
            labels=["run_id", "reason"],
        )
        run_loss = GaugeMetricFamily(
            "fedtune_train_loss", "Aggregated (example-weighted) train loss of the latest round.", labels=rid
        )
        node_loss = GaugeMetricFamily(
            "fedtune_node_train_loss",
            "Train loss a node reported for its latest round.",
            labels=["run_id", "node"],
        )
        node_examples = GaugeMetricFamily(
            "fedtune_node_train_examples",
            "Training examples of a node (num-examples of its latest round).",
            labels=["run_id", "node"],
        )
        node_seconds = GaugeMetricFamily(
            "fedtune_node_train_seconds",
            "Local training wall time of a node's latest round.",
            labels=["run_id", "node"],
        )
        node_seconds_total = CounterMetricFamily(
            "fedtune_node_train_seconds",
            "Local training wall time summed over a node's rounds.",
            labels=["run_id", "node"],
        )
        node_tps = GaugeMetricFamily(
            "fedtune_node_tokens_per_second",
            "Training throughput of a node's latest round.",
            labels=["run_id", "node"],
        )
        node_mem = GaugeMetricFamily(
            "fedtune_node_peak_memory_bytes",
            "Peak accelerator memory of a node's latest round (CUDA max allocated; CPU: peak RSS).",
            labels=["run_id", "node"],
        )
        ckpt = GaugeMetricFamily(
            "fedtune_checkpoint_write_seconds",
            "Time to write the latest round's adapter checkpoint(s).",
            labels=rid,
        )
        ckpt_total = CounterMetricFamily(
            "fedtune_checkpoint_write_seconds",
            "Time spent writing checkpoints, summed over rounds.",
            labels=rid,
        )
        status = GaugeMetricFamily(
            "fedtune_run_status",
            "1 for the run's current status, 0 for the others.",
            labels=["run_id", "status"],
        )
        info = GaugeMetricFamily(
            "fedtune_run_info", "Static facts about the run (value 1).", labels=["run_id", "model", "dataset"]
        )
        started = GaugeMetricFamily(
            "fedtune_run_start_timestamp_seconds", "Unix time the run started.", labels=rid
        )

        for run_id in sorted(set(by_id) | set(traffic)):
            view, flow = by_id.get(run_id), traffic.get(run_id)
            current = run_status(view, flow)
            for name in RUN_STATUSES:
                status.add_metric([run_id, name], 1.0 if name == current else 0.0)
            if flow is not None:
                comm.add_metric([run_id, "all", "down", "wire"], float(flow.bytes_sent))
                comm.add_metric([run_id, "all", "up", "wire"], float(flow.bytes_recv))
            if view is None:
                if flow is not None and flow.started_at:
                    started.add_metric([run_id], flow.started_at)
                continue
            payload, rounds = view.payload, view.rounds
            config = payload.get("config") or {}
            model = str((config.get("model") or {}).get("name", ""))
            dataset = str((config.get("dataset") or {}).get("name", ""))
            info.add_metric([run_id, model, dataset], 1.0)
            started.add_metric([run_id], _parse_time(payload, "started_at"))
            budget_bytes.add_metric([run_id], float(payload.get("budget_bytes", 0)))
            budget_mb.add_metric([run_id], float(payload.get("budget_bytes", 0)) / MB)
            limit_mb.add_metric([run_id], float(payload.get("budget_limit_mb", DEFAULT_LIMIT_MB)))
            current_round.add_metric([run_id], float(rounds[-1].get("round", len(rounds)) if rounds else 0))
            if "num_server_rounds" in config:
                planned.add_metric([run_id], float(config["num_server_rounds"]))
            last_round_ts.add_metric([run_id], view.last_round_at)

            own = rounds[self._carried(payload, by_id) :]
            sums: dict[tuple[str, str], float] = {}
            fails: dict[str, int] = {}
            reasons: dict[str, int] = {}
            latest: dict[str, dict[str, Any]] = {}
            train_total: dict[str, float] = {}
            buckets = [0] * len(ROUND_DURATION_BUCKETS)
            dur_sum, ckpt_sum = 0.0, 0.0
            for record in rounds:  # gauges: latest values, resumed rounds included
                for node, stats in (record.get("nodes") or {}).items():
                    latest.setdefault(node, {}).update(stats)
            for record in own:
                for node, stats in (record.get("nodes") or {}).items():
                    for direction in DIRECTIONS:
                        key = (node, direction)
                        sums[key] = sums.get(key, 0.0) + float(stats.get(f"{direction}-bytes", 0))
                    if "train-seconds" in stats:
                        train_total[node] = train_total.get(node, 0.0) + float(stats["train-seconds"])
                for node in record.get("failed") or []:
                    fails[str(node)] = fails.get(str(node), 0) + 1
                for reason in (record.get("rejected") or {}).values():
                    reasons[_reason_class(reason)] = reasons.get(_reason_class(reason), 0) + 1
                seconds = float(record.get("duration_seconds", 0.0))
                dur_sum += seconds
                for i, bound in enumerate(ROUND_DURATION_BUCKETS):
                    if seconds <= bound:
                        buckets[i] += 1
                ckpt_sum += float(record.get("checkpoint_seconds", 0.0))
            for (node, direction), value in sorted(sums.items()):
                comm.add_metric([run_id, node, direction, "leaderboard"], value)
            for node, count in sorted(fails.items()):
                failures.add_metric([run_id, node], float(count))
            for reason, count in sorted(reasons.items()):
                rejected.add_metric([run_id, reason], float(count))
            duration.add_metric(
                [run_id],
                buckets=[
                    (str(float(b)), float(c)) for b, c in zip(ROUND_DURATION_BUCKETS, buckets, strict=True)
                ]
                + [("+Inf", float(len(own)))],
                sum_value=dur_sum,
            )
            ckpt_total.add_metric([run_id], ckpt_sum)
            for node, value in sorted(train_total.items()):
                node_seconds_total.add_metric([run_id, node], value)
            if rounds:
                last = rounds[-1]
                for node, stats in sorted((last.get("nodes") or {}).items()):
                    for direction in DIRECTIONS:
                        round_bytes.add_metric(
                            [run_id, node, direction], float(stats.get(f"{direction}-bytes", 0))
                        )
                counts = {
                    "sampled": len(last.get("sampled") or []),
                    "replied": len(last.get("replied") or []),
                    "failed": len(last.get("failed") or []),
                    "rejected": len(last.get("rejected") or {}),
                }
                for state in NODE_STATES:
                    nodes.add_metric([run_id, state], float(counts[state]))
                if last.get("train_loss") is not None:
                    run_loss.add_metric([run_id], float(last["train_loss"]))
                ckpt.add_metric([run_id], float(last.get("checkpoint_seconds", 0.0)))
            for node, stats in sorted(latest.items()):
                for family, key in (
                    (node_loss, "train-loss"),
                    (node_examples, "num-examples"),
                    (node_seconds, "train-seconds"),
                    (node_tps, "tokens-per-second"),
                    (node_mem, "peak-memory-bytes"),
                ):
                    if key in stats and stats[key] is not None:
                        family.add_metric([run_id, node], float(stats[key]))

        up = GaugeMetricFamily(
            "fedtune_superlink_up", "1 if the last poll of the SuperLink's Control API succeeded."
        )
        refreshed = GaugeMetricFamily(
            "fedtune_exporter_last_refresh_timestamp_seconds", "Unix time the exporter last scanned results."
        )
        errors = CounterMetricFamily(
            "fedtune_exporter_errors", "Errors reading a source, by source.", labels=["source"]
        )
        with self.state.lock:
            if self.state.superlink_up is not None:
                up.add_metric([], self.state.superlink_up)
            refreshed.add_metric([], self.state.last_refresh)
            for source, count in sorted(self.state.errors.items()):
                errors.add_metric([source], float(count))

        yield from (
            comm,
            round_bytes,
            budget_bytes,
            budget_mb,
            limit_mb,
            reference_mb,
            current_round,
            planned,
            last_round_ts,
            duration,
            nodes,
            failures,
            rejected,
            run_loss,
            node_loss,
            node_examples,
            node_seconds,
            node_seconds_total,
            node_tps,
            node_mem,
            ckpt,
            ckpt_total,
            status,
            info,
            started,
            up,
            refreshed,
            errors,
        )

    @staticmethod
    def _carried(payload: dict[str, Any], by_id: dict[str, RunView]) -> int:
        """Rounds a resumed run copied from its predecessor (counted there already)."""
        previous = payload.get("resumed_from")
        if previous is None:
            return 0
        view = by_id.get(str(previous))
        return len(view.rounds) if view is not None else 0


# ---------------------------------------------------------------------------------------------------
# SuperLink Control API poller
# ---------------------------------------------------------------------------------------------------
class SuperLinkPoller:
    """Lists runs over the SuperLink's Control API in-process (what `flwr ls --format json` shows)."""

    def __init__(self, address: str, root_certificates: str | None, insecure: bool) -> None:
        self.address = address
        self.root_certificates = root_certificates
        self.insecure = insecure
        self._client: Any = None

    def _connect(self) -> Any:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        return ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )

    def poll(self) -> dict[str, Traffic]:
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        if self._client is None:
            self._client = self._connect()
        try:
            response = self._client.ListRuns(ListRunsRequest())
        except Exception:
            self.close()
            raise
        result: dict[str, Traffic] = {}
        for proto in response.run_dict.values():
            run = run_from_proto(proto)
            status = run.status.status
            if run.status.sub_status:
                status = f"{status}:{run.status.sub_status}"
            result[str(run.run_id)] = Traffic(
                status=status,
                bytes_sent=int(run.bytes_sent),
                bytes_recv=int(run.bytes_recv),
                started_at=_iso_to_unix(run.starting_at or run.pending_at),
            )
        return result

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # best effort
                self._client.close()
            self._client = None


def _iso_to_unix(value: str) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------------
# HTTP endpoint
# ---------------------------------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_app(state: State, registry: CollectorRegistry) -> Any:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == NOTIFY_PATH and method == "POST":
            if environ.get("REMOTE_ADDR") not in ("127.0.0.1", "::1"):
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [b"loopback only\n"]
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                body = json.loads(environ["wsgi.input"].read(min(length, 65536)) or b"{}")
                results = Path(str(body["results"]))
            except (ValueError, KeyError, TypeError):
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [b'expected {"results": "/abs/path/results.json"}\n']
            if results.name != RESULTS_FILE or not results.is_absolute():
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [b"not an absolute path to a results.json\n"]
            state.announce(results)
            start_response("202 Accepted", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path in ("/healthz", "/-/healthy"):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path in (METRICS_PATH, "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found; metrics are at /metrics\n"]

    return app


class Exporter:
    """The endpoint plus its refresh threads; `start()` returns at once, `stop()` ends it."""

    def __init__(
        self,
        roots: Iterable[Path],
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        poller: SuperLinkPoller | None = None,
        interval: float = 1.0,
        superlink_interval: float = 5.0,
        max_runs: int = 20,
    ) -> None:
        self.state = State(roots, max_runs)
        self.poller = poller
        self.interval = interval
        self.superlink_interval = superlink_interval
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FedTuneCollector(self.state))
        ProcessCollector(registry=self.registry, namespace="fedtune_exporter")
        self.server = make_server(
            host, port, make_app(self.state, self.registry), ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.server.daemon_threads = True
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> Exporter:
        self.state.refresh()
        targets = [("serve", self.server.serve_forever), ("results", self._results_loop)]
        if self.poller is not None:
            targets.append(("superlink", self._superlink_loop))
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"fedtune-exporter-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _results_loop(self) -> None:
        while not self._stop.is_set():
            self.state.wake.wait(self.interval)
            self.state.wake.clear()
            try:
                self.state.refresh()
            except Exception:  # keep serving whatever happens to one scan
                log.exception("scanning results failed")

    def _superlink_loop(self) -> None:
        assert self.poller is not None
        failing = False
        while not self._stop.is_set():
            try:
                self.state.set_traffic(self.poller.poll())
                if failing:
                    log.info("SuperLink Control API reachable again at %s", self.poller.address)
                failing = False
            except Exception as err:
                self.state.set_traffic(None)
                if not failing:
                    log.warning("SuperLink Control API at %s: %s", self.poller.address, err)
                failing = True
            self._stop.wait(self.superlink_interval)

    def stop(self) -> None:
        self._stop.set()
        self.state.wake.set()
        self.server.shutdown()
        self.server.server_close()
        if self.poller is not None:
            self.poller.close()


# ---------------------------------------------------------------------------------------------------
# ServerApp side: tell the exporter a round was written (best effort, never blocks a round for long)
# ---------------------------------------------------------------------------------------------------
def notify_url() -> str | None:
    url = os.environ.get(NOTIFY_URL_ENV)
    if url:
        return url
    port = os.environ.get(PORT_ENV, "").strip()
    if not port or port == "0":
        return None
    return f"http://127.0.0.1:{port}{NOTIFY_PATH}"


def results_notifier(results_path: Path, timeout: float = 1.0) -> Any:
    """A ROUND_OBSERVERS callable: POST the run's results.json path to the local exporter."""
    import urllib.request

    url = notify_url()
    body = json.dumps({"results": str(Path(results_path).resolve())}).encode()

    def notify(_record: dict[str, Any]) -> None:
        if url is None:
            return
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except OSError as err:  # the exporter also finds the file by scanning
            log.debug("exporter notify failed: %s", err)

    return notify


# ---------------------------------------------------------------------------------------------------
# SuperLink launcher side: run the exporter next to the SuperLink
# ---------------------------------------------------------------------------------------------------
def sidecar_command(superlink_args: argparse.Namespace, parent_pid: int | None = None) -> list[str] | None:
    """`fedtune-superlink` starts the exporter with the SuperLink when FEDTUNE_METRICS_PORT is set (not 0)."""
    port = os.environ.get(PORT_ENV, "").strip()
    if not port or port == "0":
        return None
    host = superlink_args.host
    local = "127.0.0.1" if host in ("0.0.0.0", "", "127.0.0.1") else ("::1" if host == "::" else host)
    if ":" in local:
        local = f"[{local}]"
    cmd = [
        sys.executable,
        "-m",
        "fedtune.exporter",
        "--port",
        port,
        "--superlink",
        f"{local}:{superlink_args.port}",
    ]
    if superlink_args.insecure:
        cmd.append("--insecure")
    else:
        ca = superlink_args.ssl_ca_certfile or os.path.join(superlink_args.certs_dir or ".", "ca.crt")
        cmd += ["--root-certificates", str(Path(ca).resolve())]
    cmd += ["--parent-pid", str(parent_pid or os.getpid())]
    return cmd


def start_sidecar(superlink_args: argparse.Namespace) -> int | None:
    """Spawn the exporter (same process group: it stops with the SuperLink); returns its pid."""
    import subprocess

    cmd = sidecar_command(superlink_args)
    if cmd is None:
        return None
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)
    return process.pid


def start_for_federation(federation: Any, port: int, host: str = "127.0.0.1", **kwargs: Any) -> Exporter:
    """In-process exporter for a fedtune.federation.LocalFederation (demo, tests): its outputs, its CA."""
    poller = SuperLinkPoller(federation.address, str(federation.ca_cert), insecure=False)
    return Exporter([federation.outputs], host=host, port=port, poller=poller, **kwargs).start()


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    certs_dir = env("FEDTUNE_CERTS_DIR")
    parser = argparse.ArgumentParser(
        prog="fedtune-exporter",
        description="Serve Prometheus metrics of fedtune runs (results.json + the SuperLink's run traffic).",
    )
    parser.add_argument("--host", default=env(HOST_ENV, "0.0.0.0"), help=f"bind address (${HOST_ENV})")
    parser.add_argument(
        "--port", type=int, default=int(env(PORT_ENV) or DEFAULT_PORT), help=f"(${PORT_ENV}, default 9400)"
    )
    parser.add_argument(
        "--output-dir",
        action="append",
        default=None,
        help="folder holding <run-id>/results.json (repeatable; default $FEDTUNE_OUTPUT_DIR or ./outputs)",
    )
    parser.add_argument(
        "--superlink",
        default=env("FEDTUNE_METRICS_SUPERLINK", f"127.0.0.1:{env('FEDTUNE_PORT') or 8000}"),
        help="the SuperLink's HOST:PORT, for per-run status and network traffic",
    )
    parser.add_argument(
        "--root-certificates",
        default=os.path.join(certs_dir, "ca.crt") if certs_dir else None,
        help="CA of the SuperLink's certificate (default $FEDTUNE_CERTS_DIR/ca.crt)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=env("FEDTUNE_INSECURE", "").lower() in {"1", "true", "yes", "on"},
    )
    parser.add_argument("--no-superlink", action="store_true", help="do not poll the SuperLink")
    parser.add_argument("--interval", type=float, default=1.0, help="results scan period (s)")
    parser.add_argument("--superlink-interval", type=float, default=5.0, help="Control API poll period (s)")
    parser.add_argument("--max-runs", type=int, default=20, help="export the latest N runs (+ running ones)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    return parser


def main(argv: list[str] | None = None) -> None:
    from fedtune.logs import configure_logging
    from fedtune.runtime_env import silence_flwr

    silence_flwr()
    configure_logging(component="exporter")
    args = build_parser().parse_args(argv)
    roots = [Path(p) for p in (args.output_dir or [os.environ.get("FEDTUNE_OUTPUT_DIR") or "outputs"])]
    poller = None
    if not args.no_superlink:
        poller = SuperLinkPoller(args.superlink, args.root_certificates, args.insecure)
    try:
        exporter = Exporter(
            roots, args.host, args.port, poller, args.interval, args.superlink_interval, args.max_runs
        ).start()
    except OSError as err:
        log.error("cannot serve metrics on %s:%s: %s", args.host, args.port, err)
        raise SystemExit(1) from err
    log.info(
        "serving metrics on http://%s:%d%s (results under %s; SuperLink %s)",
        args.host,
        exporter.port,
        METRICS_PATH,
        ", ".join(map(str, roots)),
        "off" if poller is None else args.superlink,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(2.0):
        if args.parent_pid and os.getppid() != args.parent_pid:
            log.info("the SuperLink (pid %d) is gone; exporter exits", args.parent_pid)
            break
    exporter.stop()


if __name__ == "__main__":
    main()
