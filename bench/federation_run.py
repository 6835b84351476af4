"""One run of bench/federation.py on a federation that is already up: `flwr run` of a profile and transport,
waited for, and turned into its figures (bench/federation_timeline.py) and tables (bench/federation_table.py).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from bench.federation_table import print_round, print_run
from bench.federation_timeline import round_figures, run_summary, supernode_stamps

REPO = Path(__file__).resolve().parent.parent


def run_config(
    work: Path, profile: str, transport: str, args: argparse.Namespace, rounds: int | None = None
) -> dict[str, Any]:
    from bench.supernode_round import base_run_config, profile_overrides

    config = base_run_config(work, profile_overrides(profile))
    config.update(
        {
            "num-server-rounds": rounds or args.rounds,
            "strategy.fraction-train": 1.0,
            "strategy.min-train-nodes": args.nodes,
            "strategy.min-available-nodes": args.nodes,
            "comm.transport": transport,
        }
    )
    if args.steps:
        config["train.max-steps"] = args.steps
    return config


def wait_finished(fed: Any, run_id: int, timeout: float) -> float:
    """When the ServerApp marked the run done in results.json (checked on the file: a `flwr ls` per poll
    would cost a CPU second each); `flwr ls` every 30 s catches a run that died before writing it."""
    from fedtune.results import RunResults

    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    path = fed.run_dir(run_id) / "results.json"
    while time.monotonic() < deadline:
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                if RunResults.read(path).status != "running":
                    return time.time()
        if time.monotonic() - asked > 30:
            asked = time.monotonic()
            if str(fed.run_info(run_id).get("status", "")).startswith("finished"):
                return time.time()
        time.sleep(0.2)
    raise RuntimeError(f"run {run_id} did not finish within {timeout:.0f} s")


def one_run(
    fed: Any, work: Path, profile: str, transport: str, args: argparse.Namespace, num_rounds: int
) -> dict:
    from fedtune.results import RunResults

    config = run_config(work, profile, transport, args, num_rounds)
    submitted = time.time()
    run_id = fed.submit(REPO, overrides=config, timeout=600.0)
    print(f"run {run_id} submitted: {profile} / {transport}", flush=True)
    finished = wait_finished(fed, run_id, args.run_timeout)
    info = fed.wait_for_run(run_id, timeout=120.0)
    results = RunResults.read(fed.run_dir(run_id))
    logs = {}
    for node in fed.supernodes:
        node_id, stamps = supernode_stamps(node.log_text())
        if node_id is not None:
            logs[node_id] = stamps
    starts = [r.timeline.started for r in results.rounds[1:]] + [None]
    rounds = [round_figures(r, logs, run_id, nxt) for r, nxt in zip(results.rounds, starts, strict=False)]
    if results.status != "completed":
        print(f"run {run_id} ended {results.status}: {results.error}", flush=True)
    first = rounds[0]["started_at"] if rounds else None
    run = {
        "profile": profile,
        "transport": transport,
        "run_id": run_id,
        "status": info.get("status"),
        "error": results.error,
        "network_traffic": info.get("network-traffic"),
        "budget_mb": results.budget_mb,
        "sent_mb": results.sent_mb,
        "rounds": rounds,
        "summary": run_summary(rounds, finished - submitted, first, submitted),
    }
    for r in rounds:
        print_round(r)
    print_run(run)
    return run
