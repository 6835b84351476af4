"""The whole federation, timed hop by hop: a TLS SuperLink (behind its Fleet-only proxy) with SuperNode
authentication, N SuperNodes with warm trainers, and `flwr run` of R rounds — the path users run.

    python -m bench.federation --work DIR [--tiny] [--nodes 2] [--rounds 2]
        [--runs reference:packed,reference:per-tensor,fast:packed,...] [--transport packed|per-tensor]
        [--superlink-db file|memory] [--steps N] [--json PATH]

DIR holds `python -m bench.supernode_round prepare` output (built here if missing: the InternLM3-8B-shaped
random model on a GPU, `--tiny` the 2-layer one for a CPU). Every run of `--runs` (profile:transport; a
profile is `reference` or a file in profiles/) goes through the same federation, one after the other.

Per round it prints the wall time, the slowest node's training time and a timeline of every hop, in seconds
from the round's start: ServerApp sent → SuperNode received → ClientApp started → trainer has the adapter →
trained → ClientApp replied → SuperNode sent → ServerApp has all replies → aggregated → checkpoint written.
The ServerApp's and the ClientApp's stamps come from results.json (fedtune/results.py); the SuperNode's from
its log (Flower's `Receiving`/`Received successfully`/`Sending`/`Sent successfully` lines). All processes run
on this host, so their wall clocks agree. JSON with every figure goes beside the table (`--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

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
# --superlink-db: what LocalFederation's SuperLink gets as --database (None: its SQLite file)
DATABASES = {"file": None, "sqlite-memory": ":memory:", "flwr-memory": ":flwr-in-memory:"}
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
    """The first receiving → received → sending → sent chain that starts inside [start, end)."""
    found: dict[str, float] = {}
    order = ["receiving", "received", "sending", "sent"]
    for name, when in events:
        if when < start or (end is not None and name == "receiving" and when >= end):
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


# ---- printing ---------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def print_round(r: dict) -> None:
    share = r["non_training_share"]
    if r["failed"] or r["rejected"]:
        print(f"\nround {r['round']}: FAILED nodes {r['failed']}, rejected {r['rejected']}")
    print(
        f"\nround {r['round']}: wall {r['wall_seconds']:.2f} s | slowest node's training "
        f"{r['slowest_train_seconds']:.2f} s | non-training {r['non_training_seconds']:.2f} s "
        f"({'—' if share is None else format(share, '.1%')})",
        flush=True,
    )
    nodes = r["timeline"]["nodes"]
    print("| hop (s from round start) | " + " | ".join(f"node {k}" for k in nodes) + " | longest step |")
    print("|---" * (len(nodes) + 2) + "|")
    previous: dict[str, float | None] = dict.fromkeys(nodes, 0.0)
    for label, _ in NODE_HOPS:
        values = {k: hops[label] for k, hops in nodes.items()}
        steps = [v - previous[k] for k, v in values.items() if v is not None and previous[k] is not None]
        print(
            f"| {label} | " + " | ".join(_fmt(v) for v in values.values())
            + f" | {_fmt(max(steps) if steps else None)} |"
        )
        previous = {k: (v if v is not None else previous[k]) for k, v in values.items()}
    last = max((v for v in previous.values() if v is not None), default=0.0)
    for label, value in r["timeline"]["round"].items():
        step = None if value is None else value - last
        print(f"| {label} | " + " | ".join(_fmt(value) for _ in nodes) + f" | {_fmt(step)} |")
        last = value if value is not None else last


def print_run(run: dict) -> None:
    s = run["summary"]
    print(
        f"\n== {run['profile']} / {run['transport']}: run {run['run_id']} {run['status']}, "
        f"{len(run['rounds'])} rounds, whole run {s['run_wall_seconds']:.1f} s "
        f"(ServerApp start {_fmt(s['serverapp_start_seconds'])} s); Σ slowest training "
        f"{s['sum_slowest_train_seconds']:.1f} s + first-round load {s['first_round_load_seconds']:.1f} s; "
        f"ratio {_fmt(s['run_wall_over_training_and_load'])}",
        flush=True,
    )
    if "extrapolated_10_rounds" in s:
        e = s["extrapolated_10_rounds"]
        print(
            f"   10 rounds (extrapolated): {e['run_wall_seconds']:.0f} s wall vs "
            f"{e['sum_slowest_train_seconds']:.0f} s training → ratio {_fmt(e['ratio'])} (target ≤ 1.2); "
            f"later rounds non-training {s['later_rounds_non_training_seconds']:.2f} s "
            f"({_fmt(100 * (s['later_rounds_non_training_share'] or 0))} %)"
        )


def print_comparison(runs: list[dict]) -> None:
    print("\n| profile | transport | round | wall s | slowest training s | non-training s | share |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["rounds"]:
            share = r["non_training_share"]
            print(
                f"| {run['profile']} | {run['transport']} | {r['round']} | {r['wall_seconds']:.2f} "
                f"| {r['slowest_train_seconds']:.2f} | {r['non_training_seconds']:.2f} "
                f"| {_fmt(None if share is None else 100 * share)} % |"
            )


# ---- the benchmark ----------------------------------------------------------------------------------------


def machine() -> str:
    gpu = ""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        gpu = "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())
    return f"{gpu or 'no GPU'} | {os.cpu_count()} CPUs | {platform.platform()}"


def profile_overrides(name: str) -> dict[str, Any]:
    if name == "reference":
        return {}
    from fedtune.toml_io import read_flat

    path = Path(name) if name.endswith(".toml") else REPO / "profiles" / f"{name}.toml"
    return read_flat(path)


def ensure_prepared(work: Path, shape: str | None) -> None:
    if (work / "shape.json").is_file():
        return
    cmd = [sys.executable, "-m", "bench.supernode_round", "prepare", "--out", str(work)]
    subprocess.run(cmd + ([f"--{shape}"] if shape else []), cwd=REPO, check=True)


def run_config(
    work: Path, profile: str, transport: str, args: argparse.Namespace, rounds: int | None = None
) -> dict[str, Any]:
    from bench.supernode_round import base_run_config

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


def wait_preloaded(sockets: list[str], timeout: float, nodes: list[Any]) -> float:
    from clientapp.warm.protocol import ping

    started = time.monotonic()
    pending = set(sockets)
    while pending and time.monotonic() - started < timeout:
        for node in nodes:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited: {node.log_text()[-1500:]}")
        for sock in list(pending):
            status = ping(sock, timeout=2.0)
            if status and status.get("preload") not in ("loading", "none"):
                if status["preload"] != "done":
                    raise RuntimeError(f"warm trainer preload {status['preload']}")
                pending.discard(sock)
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"warm trainers not preloaded after {timeout:.0f} s: {sorted(pending)}")
    return time.monotonic() - started


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.federation", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/tmp/fedtune-bench")))
    parser.add_argument(
        "--tiny", dest="shape", action="store_const", const="tiny",
        help="prepare the tiny model if DIR has none (CPU)",
    )
    parser.add_argument(
        "--deep-tiny", dest="shape", action="store_const", const="deep-tiny",
        help="prepare 48 narrow layers (the 8B's 384 adapter tensors) if DIR has none (CPU transport timing)",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--runs", default=None,
        help="profile:transport[:rounds],... (default: reference:<--transport>; rounds default --rounds)",
    )
    parser.add_argument("--transport", choices=["packed", "per-tensor"], default="packed")
    parser.add_argument(
        "--superlink-db", choices=sorted(DATABASES), default="file",
        help="SuperLink state: SQLite file (the default), SQLite :memory:, or Flower's in-memory state",
    )
    parser.add_argument("--steps", type=int, default=None, help="override train.max-steps (CPU smoke)")
    parser.add_argument("--no-preload", action="store_true", help="load the model in round 1 instead")
    parser.add_argument("--run-timeout", type=float, default=3600.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from fedtune.runtime_env import silence_flwr

    silence_flwr()
    # stopped from outside (timeout, kill): unwind, so the federation's processes are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from fedtune.federation import LocalFederation
    from fedtune.toml_io import write as write_toml

    work = args.work.resolve()
    specs = []
    for entry in (args.runs or f"reference:{args.transport}").split(","):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("packed", "per-tensor") or not all(parts):
            raise SystemExit(f"--runs entry {entry!r}: expected PROFILE:packed|per-tensor[:ROUNDS]")
        if len(parts) == 3 and not parts[2].isdigit():
            raise SystemExit(f"--runs entry {entry!r}: ROUNDS must be a number")
        specs.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else args.rounds))
    ensure_prepared(work, args.shape)
    fed_dir = work / f"federation-{time.strftime('%Y%m%d-%H%M%S')}"
    payload: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.federation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "superlink_db": args.superlink_db,
        "runs": [],
    }
    print(f"machine: {payload['machine']}", flush=True)
    started = time.monotonic()
    fed = LocalFederation(fed_dir, supernode_auth=True, extra_env={"OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")})
    sockets: list[str] = []
    try:
        database = DATABASES[args.superlink_db]
        db = ["--database", database] if database else []
        fed.start_superlink(db)
        preload = fed_dir / "preload.toml"
        write_toml(preload, run_config(work, specs[0][0], specs[0][1], args))
        for i in range(args.nodes):
            # a private folder with a short path (a Unix socket path has at most 107 bytes)
            sockets.append(str(Path(tempfile.mkdtemp(prefix=f"fedtune-bench-{i}-")) / "trainer.sock"))
            extra = [
                "--warm-trainer", "--trainer-socket", sockets[-1],
                "--data-path", str(work / "data" / "alpaca-like.jsonl"),
                "--compile-cache", str(work / "compile-cache"),
            ]
            if not args.no_preload:
                extra += ["--warm-trainer-preload", str(preload)]
            fed.start_supernode(i, args.nodes, extra_args=extra)
        payload["superlink_and_nodes_up_seconds"] = time.monotonic() - started
        payload["preload_seconds"] = (
            0.0 if args.no_preload else wait_preloaded(sockets, args.run_timeout, fed.supernodes)
        )
        print(
            f"federation up: SuperLink + {args.nodes} SuperNodes in "
            f"{payload['superlink_and_nodes_up_seconds']:.1f} s, warm trainers preloaded "
            f"{payload['preload_seconds']:.1f} s later (db: {args.superlink_db})",
            flush=True,
        )
        for profile, transport, rounds in specs:
            payload["runs"].append(one_run(fed, work, profile, transport, args, rounds))
            if args.json:
                args.json.write_text(json.dumps(payload, indent=1))
    finally:
        fed.stop()
        for sock in sockets:
            shutil.rmtree(Path(sock).parent, ignore_errors=True)
    print_comparison(payload["runs"])
    print(f"\nmachine: {payload['machine']}\ncommand: {payload['command']}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
