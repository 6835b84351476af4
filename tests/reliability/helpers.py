"""Fault injection helpers: waiting on results.json, finding Flower's child processes, comparing adapters."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.host import cmdline, process_tree

REPORT: list[dict[str, Any]] = []  # what each test injected and what survived (printed at the end)


def report(test: str, **facts: Any) -> None:
    REPORT.append({"test": test, **facts})
    print(f"[reliability] {test}: {json.dumps(facts, default=str)}", flush=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_results(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def rounds_done(run_dir: Path) -> int:
    """Rounds finished and checkpointed: results.json lists a round before its checkpoint (written in the
    background) is on disk, and a resume continues from the checkpoint."""
    return sum(1 for r in read_results(run_dir).get("rounds", []) if r.get("checkpoint_written_at"))


def run_log(fed, run_id: int) -> str:
    """The ServerApp's log of a run, as the SuperLink stored it (`flwr log RUN_ID --show`)."""
    done = fed.flwr("log", str(run_id), "fedtune-local", "--show")
    return done.stdout + done.stderr


# ---- processes ----------------------------------------------------------------------------------
def descendants(pid: int, marker: str) -> list[int]:
    """Live descendants of `pid` whose command line contains `marker` (e.g. flwr-serverapp)."""
    return [child for child in process_tree(pid) if marker in cmdline(child)]


# A ClientApp task starting on a SuperNode, in its log: a prestarted worker taking its token
# (fedtune/prestart.py) or, started cold, Flower's `flwr-clientapp`. An idle prestarted worker is always
# there, so a process alone does not say that a message is being worked on.
CLIENTAPP_START_LINES = ("Start prestarted `flwr-clientapp` process", "Start `flwr-clientapp` process")


def clientapps_started(nodes: list[Any]) -> int:
    """ClientApp tasks started so far on these SuperNodes (their logs, killed ones included): lines, as a JSON
    line may name its message twice."""
    return sum(
        any(marker in line for marker in CLIENTAPP_START_LINES)
        for node in nodes for line in node.log_text().splitlines()
    )


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---- adapters -----------------------------------------------------------------------------------
def load_state(folder: Path) -> dict[str, Any]:
    from fedtune.checkpoint import load_adapter

    return dict(load_adapter(Path(folder)))


def states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def all_finite(state: dict[str, Any]) -> bool:
    import torch

    return all(bool(torch.isfinite(v).all()) for v in state.values())
