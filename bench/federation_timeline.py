"""The figures of bench/federation.py: each round's hop timeline, in seconds from the round's start, and
the run's totals with the 10-round extrapolation.

The ServerApp's and the ClientApp's stamps come from results.json (fedtune/results.py); the SuperNode's from
its log (Flower's `Receiving`/`Received successfully`/`Sending`/`Sent successfully` lines). All processes run
on one host, so their wall clocks agree.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
from datetime import datetime
from typing import Any

# (label, where the stamp lives): "node.<field>" = fedtune.results.NodeTimeline, "round.<field>" =
# RoundTimeline, "log.<event>" = the SuperNode's log
NODE_HOPS = (
    ("ServerApp sent", "node.server_sent"),
    ("SuperNode receiving", "log.receiving"),
    ("SuperNode received", "log.received"),
    ("ClientApp started", "node.clientapp_started"),
    ("trainer has adapter", "node.adapter_in"),
    ("trained", "node.trained"),
    ("ClientApp replied", "node.clientapp_replied"),
    ("SuperNode sending", "log.sending"),
    ("SuperNode sent", "log.sent"),
    ("ServerApp has reply", "node.server_received"),
)
ROUND_HOPS = (
    ("ServerApp has all replies", "all_replies"),
    ("aggregated", "aggregated"),
    ("checkpoint written", "checkpoint_written"),
)
LOG_EVENTS = {
    "Receiving: train message": "receiving",
    "Received successfully": "received",
    "Sending: train message": "sending",
    "Sent successfully": "sent",
}



# ---- the SuperNode's log ----------------------------------------------------------------------------------


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def supernode_stamps(log_text: str) -> tuple[int | None, dict[int, list[tuple[str, float]]]]:
    """The node id and, per run id, the transfer events of a SuperNode's log in order: (event, epoch time).

    Flower logs `[RUN r]` (or `[RUN r, ROUND n]`) before each `Receiving:`/`Sending:` line; fedtune's log
    pipeline makes every line JSON with an ISO timestamp. Rounds are told apart by time (`window`)."""
    node_id: int | None = None
    run: int | None = None
    events: dict[int, list[tuple[str, float]]] = {}
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        event = str(entry.get("event", "")).strip()
        stamp = entry.get("timestamp")
        if event.startswith("SuperNode ID:"):
            with contextlib.suppress(ValueError):
                node_id = int(event.split(":", 1)[1])
        elif event.startswith("[RUN "):
            with contextlib.suppress(ValueError, IndexError):
                run = int(event.strip("[]").replace(",", " ").split()[1])
        elif run is not None and stamp:
            for prefix, name in LOG_EVENTS.items():
                if event.startswith(prefix):
                    events.setdefault(run, []).append((name, _epoch(stamp)))
    return node_id, events


def window(events: list[tuple[str, float]], start: float, end: float | None) -> dict[str, float]:
    """The first receiving → received → sending → sent chain inside [start, end): a step the log lacks stays
    out, rather than being taken from the next round (whose start is `end`)."""
    found: dict[str, float] = {}
    order = ["receiving", "received", "sending", "sent"]
    for name, when in events:
        if when < start or (end is not None and when >= end):
            continue
        step = order[len(found)] if len(found) < len(order) else None
        if name == step:
            found[name] = when
    return found


# ---- one run's figures ------------------------------------------------------------------------------------


def _get(record: Any, path: str) -> float | None:
    obj = record
    for part in path.split("."):
        obj = getattr(obj, part, None) if not isinstance(obj, dict) else obj.get(part)
        if obj is None:
            return None
    return float(obj)


def round_figures(
    record: Any, logs: dict[int, dict[int, list[tuple[str, float]]]], run_id: int, next_start: float | None
) -> dict:
    """Wall, training and the hop timeline of one round (seconds from the round's start)."""
    start = record.timeline.started
    nodes: dict[str, dict[str, float | None]] = {}
    train = []
    for key, node in sorted(record.nodes.items()):
        events = logs.get(int(key), {}).get(run_id, [])
        log_stamps = window(events, start, next_start) if start is not None else {}
        hops: dict[str, float | None] = {}
        for label, source in NODE_HOPS:
            kind, name = source.split(".", 1)
            value = log_stamps.get(name) if kind == "log" else _get(node.timeline, name)
            hops[label] = None if value is None or start is None else value - start
        nodes[key] = hops
        if node.train_seconds is not None:
            train.append(float(node.train_seconds))
    round_hops = {
        label: (getattr(record.timeline, name) - start)
        if start is not None and getattr(record.timeline, name) is not None
        else None
        for label, name in ROUND_HOPS
    }
    wall = record.duration_seconds
    slowest = max(train) if train else 0.0
    return {
        "round": record.round,
        "failed": list(record.failed),
        "rejected": dict(record.rejected),
        "wall_seconds": wall,
        "slowest_train_seconds": slowest,
        "non_training_seconds": wall - slowest,
        "non_training_share": (wall - slowest) / wall if wall else None,
        "aggregate_seconds": record.aggregate_seconds,
        "checkpoint_seconds": record.checkpoint_seconds,
        "model_load_seconds": max(
            (float(n.stage_seconds.get("model_load", 0.0)) for n in record.nodes.values()), default=0.0
        ),
        "stage_seconds": {k: dict(n.stage_seconds) for k, n in sorted(record.nodes.items())},
        "train_loss": record.train_loss,
        "bytes_total": record.bytes_total,
        "sent_bytes": record.sent_bytes_down + record.sent_bytes_up,
        "started_at": start,
        "timeline": {"nodes": nodes, "round": round_hops},
    }


def run_summary(
    rounds: list[dict], run_wall: float, first_round_started: float | None, submitted: float
) -> dict:
    """The run's totals and the 10-round target, measured and (for 10 rounds) extrapolated."""
    train = [r["slowest_train_seconds"] for r in rounds]
    load = rounds[0]["model_load_seconds"] if rounds else 0.0
    summary: dict[str, Any] = {
        "run_wall_seconds": run_wall,
        "serverapp_start_seconds": (first_round_started - submitted) if first_round_started else None,
        "sum_slowest_train_seconds": sum(train),
        "first_round_load_seconds": load,
        "run_wall_over_training_and_load": run_wall / (sum(train) + load) if sum(train) + load else None,
    }
    later = rounds[1:]
    if later:
        periods = [b["started_at"] - a["started_at"] for a, b in itertools.pairwise(later)]
        steady = statistics.mean(periods) if periods else statistics.mean(r["wall_seconds"] for r in later)
        fixed = run_wall - sum(r["wall_seconds"] for r in rounds)  # start-up, between-round gaps, teardown
        wall10 = fixed + rounds[0]["wall_seconds"] + 9 * steady
        train10 = train[0] + 9 * statistics.mean(r["slowest_train_seconds"] for r in later)
        summary["extrapolated_10_rounds"] = {
            "run_wall_seconds": wall10,
            "sum_slowest_train_seconds": train10,
            "ratio": wall10 / (train10 + load) if train10 + load else None,
            "how": "fixed costs + round 1 + 9 × the mean later round; training likewise",
        }
        shares = [r["non_training_share"] for r in later if r["non_training_share"] is not None]
        summary["later_rounds_non_training_share"] = statistics.mean(shares) if shares else None
        summary["later_rounds_non_training_seconds"] = statistics.mean(
            r["non_training_seconds"] for r in later
        )
    return summary
