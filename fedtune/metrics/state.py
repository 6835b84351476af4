"""What the exporter knows about each run: its results.json (typed, fedtune.results) and the SuperLink's view.

Bounded and defensive, because the files and the notify endpoint are inputs: only regular files up to
MAX_RESULTS_BYTES are read (a FIFO or a device named results.json is skipped without blocking), the newest
`scan_limit` files are read, announced paths are an LRU of `max_announced`, and a file that is gone is
forgotten at the next scan. A file that does not parse is counted once per version and never stops a scan.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedtune.results import RESULTS_FILE, RunResults

log = logging.getLogger("fedtune.metrics")

MAX_RESULTS_BYTES = 16 * 1024 * 1024  # a 10-round run is ~20 KB; 1,000 rounds of 20 nodes fit easily
RUN_STATUSES = ("pending", "running", "completed", "failed", "stopped")


class NotAResultsFile(ValueError):
    """The path is not a regular file of acceptable size."""


def check_results_file(path: Path) -> os.stat_result:
    """stat() of `path` if it is a regular file within MAX_RESULTS_BYTES; NotAResultsFile otherwise."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotAResultsFile(f"{path} is not a regular file")
    if st.st_size > MAX_RESULTS_BYTES:
        raise NotAResultsFile(f"{path} is larger than {MAX_RESULTS_BYTES} bytes")
    return st


def read_capped(path: Path) -> bytes:
    """The file's bytes; never blocks on a FIFO (O_NONBLOCK) and never reads past the cap, even when the
    path was swapped for something else after it was checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAResultsFile(f"{path} is not a regular file")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_RESULTS_BYTES:
                raise NotAResultsFile(f"{path} is larger than {MAX_RESULTS_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class RunView:
    """One run's results.json, as last read."""

    path: Path
    stamp: tuple[int, int]  # (mtime ns, size): re-read only on change
    results: RunResults
    last_round_at: float = 0.0  # when the latest finished round was first seen (unix time)

    @property
    def run_id(self) -> str:
        return str(self.results.run_id)


@dataclass
class Traffic:
    """A run as the SuperLink lists it (`flwr ls`)."""

    status: str
    bytes_sent: int  # SuperLink -> SuperNodes
    bytes_recv: int  # SuperNodes -> SuperLink
    started_at: float = 0.0


def parse_time(value: str | None) -> float:
    """ISO-8601 (results.json, the Control API) to unix time; 0.0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def run_status(view: RunView | None, traffic: Traffic | None) -> str:
    """fedtune's status (results.json) reconciled with Flower's (a killed ServerApp leaves 'running')."""
    flower = traffic.status if traffic is not None else ""
    ours = view.results.status if view is not None else ""
    if flower.startswith("finished:"):
        if ours in ("completed", "failed"):
            return ours
        outcome = flower.split(":", 1)[1]
        return outcome if outcome in RUN_STATUSES else "failed"
    if view is not None:
        return ours if ours in RUN_STATUSES else "running"
    return "running" if flower == "running" else "pending"


class State:
    def __init__(self, roots: Iterable[Path], max_runs: int = 20) -> None:
        self.roots = [Path(r).expanduser() for r in roots]
        self.max_runs = max_runs
        self.scan_limit = max(4 * max_runs, 64)  # results files read per scan, newest first
        self.max_announced = max(4 * max_runs, 64)
        self.lock = threading.Lock()
        self.runs: dict[Path, RunView] = {}
        self.announced: OrderedDict[Path, None] = OrderedDict()  # via /api/v1/notify, LRU
        self.traffic: dict[str, Traffic] = {}
        self.superlink_up: float | None = None  # None: polling disabled
        self.last_refresh = 0.0
        self.errors: dict[str, int] = {"results": 0, "superlink": 0, "notify": 0, "collect": 0}
        self.wake = threading.Event()
        self._bad: dict[Path, tuple[int, int]] = {}  # files that did not parse, by version (logged once)

    def count_error(self, source: str) -> None:
        with self.lock:
            self.errors[source] = self.errors.get(source, 0) + 1

    # -- results.json -----------------------------------------------------------------------------
    def announce(self, path: Path) -> None:
        with self.lock:
            self.announced[path] = None
            self.announced.move_to_end(path)
            while len(self.announced) > self.max_announced:
                self.announced.popitem(last=False)
        self.wake.set()

    def _candidates(self) -> dict[Path, os.stat_result]:
        paths: set[Path] = set()
        for root in self.roots:
            if root.is_dir():
                paths.update(root.glob(f"*/{RESULTS_FILE}"))
        with self.lock:
            paths.update(self.announced)
        found: dict[Path, os.stat_result] = {}
        for path in paths:
            try:
                found[path] = check_results_file(path)
            except (OSError, NotAResultsFile):
                with self.lock:
                    self.announced.pop(path, None)  # gone or not a file: forget it
        newest = sorted(found, key=lambda p: found[p].st_mtime_ns, reverse=True)[: self.scan_limit]
        return {p: found[p] for p in newest}

    def _read(self, path: Path, stamp: tuple[int, int]) -> RunResults | None:
        try:
            return RunResults.from_json(json.loads(read_capped(path)))
        except Exception as err:  # any content at all: the file is an input, not our invariant
            if self._bad.get(path) != stamp:
                self._bad[path] = stamp
                self.count_error("results")
                log.warning("cannot read %s: %s", path, err)
            return None

    def refresh(self) -> None:
        now = time.time()
        fresh: dict[Path, RunView] = {}
        candidates = self._candidates()
        for path, st in candidates.items():
            stamp = (st.st_mtime_ns, st.st_size)
            view = self.runs.get(path)
            if view is not None and view.stamp == stamp:
                fresh[path] = view
                continue
            results = None if self._bad.get(path) == stamp else self._read(path, stamp)
            if results is None:
                if view is not None:
                    fresh[path] = view  # keep the last good version of a file being replaced badly
                continue
            new = RunView(path, stamp, results)
            if view is None:
                new.last_round_at = st.st_mtime if results.rounds else parse_time(results.started_at)
            elif len(results.rounds) != len(view.results.rounds):
                new.last_round_at = now
                log.info(
                    "run %s: round %d recorded", new.run_id, results.last_round, extra={"run_id": new.run_id}
                )
            else:
                new.last_round_at = view.last_round_at
            fresh[path] = new
        self._bad = {p: s for p, s in self._bad.items() if p in candidates}  # still there: still bad
        with self.lock:
            self.runs = fresh
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
    def snapshot(self) -> tuple[dict[str, RunView], dict[str, Traffic]]:
        """The most recent `max_runs` runs (running ones always), by start time."""
        with self.lock:
            views = {v.run_id: v for v in self.runs.values()}
            traffic = dict(self.traffic)
        ids = set(views) | set(traffic)

        def started(run_id: str) -> float:
            if run_id in views:
                return parse_time(views[run_id].results.started_at)
            return traffic[run_id].started_at

        def running(run_id: str) -> bool:
            return run_status(views.get(run_id), traffic.get(run_id)) in ("pending", "running")

        ordered = sorted(ids, key=started, reverse=True)
        keep = set(ordered[: self.max_runs]) | {r for r in ids if running(r)}
        return {r: v for r, v in views.items() if r in keep}, {r: t for r, t in traffic.items() if r in keep}
