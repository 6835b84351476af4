"""The whole federation, timed hop by hop: a TLS SuperLink (behind its Fleet-only proxy) with SuperNode
authentication, N SuperNodes with warm trainers, and `flwr run` of R rounds — the path users run.

    python -m bench.federation --work DIR [--tiny] [--nodes 2] [--rounds 2]
        [--runs reference:packed,reference:per-tensor,fast:packed,...] [--transport packed|per-tensor]
        [--superlink-db file|sqlite-memory|flwr-memory] [--object-store memory|database]
        [--transfer-concurrency N] [--cold-clientapp] [--cold-serverapp] [--steps N] [--json PATH]

DIR holds `python -m bench.supernode_round prepare` output (built here if missing: the InternLM3-8B-shaped
random model on a GPU, `--tiny` the 2-layer one for a CPU). Every run of `--runs` (profile:transport; a
profile is `reference` or a file in profiles/) goes through the same federation, one after the other.

Per round it prints the wall time, the slowest node's training time and a timeline of every hop, in seconds
from the round's start: ServerApp sent → SuperNode received → ClientApp started → trainer has the adapter →
trained → ClientApp replied → SuperNode sent → ServerApp has all replies → aggregated → checkpoint written.
The ServerApp's and the ClientApp's stamps come from results.json (fedtune/results.py); the SuperNode's from
its log (Flower's `Receiving`/`Received successfully`/`Sending`/`Sent successfully` lines). All processes run
on this host, so their wall clocks agree. JSON with every figure goes beside the table (`--json`).

Here: the command line and the federation (`start_federation`); one run on it: bench/federation_run.py; its
figures: bench/federation_timeline.py; its tables: bench/federation_table.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import request_trace
from bench.federation_run import REPO, one_run, run_config
from bench.federation_table import print_comparison
from clientapp.warm.protocol import ping
from fedtune.errors import FedTuneError
from fedtune.federation import LocalFederation
from fedtune.flower_pulls import RETRY_ENV as PULL_RETRY_ENV
from fedtune.runtime_env import CHUNK_ENV, TRANSFER_CONCURRENCY_ENV, chunk_bytes, silence_flwr
from fedtune.toml_io import write as write_toml
from superlink.flower_entry import OBJECT_STORES

TRACE_ENV = "FEDTUNE_TRACE_DIR"
TRACE_HOOK = REPO / "bench" / "trace"  # its sitecustomize.py patches Flower when FEDTUNE_TRACE_DIR is set

# --superlink-db: what LocalFederation's SuperLink gets as --database (None: its SQLite file)
DATABASES = {"file": None, "sqlite-memory": ":memory:", "flwr-memory": ":flwr-in-memory:"}


def machine() -> str:
    gpu = ""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        gpu = "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())
    return f"{gpu or 'no GPU'} | {os.cpu_count()} CPUs | {platform.platform()}"


def http_stack() -> str:
    """The event loop and HTTP parser uvicorn picks for Flower's servers (loop and http "auto"): uvloop and
    httptools come with `pip install flwr` (uvicorn[standard]), a bare image may lack them, and every hop
    through the SuperLink and the SuperNode runs on that stack, so each result says which it measured
    (session 5 on an H200: no difference beyond the noise, bench/RESULTS.md)."""
    import uvicorn
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    loop = "uvloop" if "uvloop" in auto_loop_factory(use_subprocess=False).__module__ else "asyncio"
    parser = "httptools" if "httptools" in AutoHTTPProtocol.__module__ else "h11"
    return f"uvicorn {uvicorn.__version__} on {loop} + {parser}"


def ensure_prepared(work: Path, shape: str | None) -> None:
    if (work / "shape.json").is_file():
        return
    cmd = [sys.executable, "-m", "bench.supernode_round", "prepare", "--out", str(work)]
    subprocess.run(cmd + ([f"--{shape}"] if shape else []), cwd=REPO, check=True)


def wait_preloaded(sockets: list[str], timeout: float, nodes: list[Any]) -> float:
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


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--object-store", choices=OBJECT_STORES, default=OBJECT_STORES[0],
        help="the SuperLink's message objects: in memory (fedtune's default) or in its database (Flower's)",
    )
    parser.add_argument(
        "--transfer-concurrency", type=int, default=None,
        help="objects each Flower process pushes/pulls at a time (default: fedtune's, 8; Flower's is 2)",
    )
    parser.add_argument(
        "--flower-transfer", action="store_true",
        help="Flower's own transfer settings: objects in the database, 5 MiB chunks, 2 at a time, pulls "
        "backing off 1-10 s",
    )
    parser.add_argument(
        "--chunk-mib", type=float, default=None,
        help=f"size of the objects Flower cuts each array into, MiB (default: {CHUNK_ENV}, else fedtune's "
        "16; Flower's is 5)",
    )
    parser.add_argument(
        "--trace", type=Path, default=None, metavar="DIR",
        help="time every HTTP request and SuperLink/SuperNode object handler of every process into DIR "
        "(bench/trace/sitecustomize.py) and print their summary (bench/request_trace.py)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override train.max-steps (CPU smoke)")
    parser.add_argument("--no-preload", action="store_true", help="load the model in round 1 instead")
    parser.add_argument(
        "--cold-clientapp", action="store_true",
        help="SuperNodes start a fresh flwr-clientapp per message, as Flower does (default: prestarted)",
    )
    parser.add_argument(
        "--cold-serverapp", action="store_true",
        help="the SuperLink starts each run's flwr-serverapp when the run comes, as Flower does "
        "(default: prestarted)",
    )
    parser.add_argument("--run-timeout", type=float, default=3600.0)
    parser.add_argument("--json", type=Path, default=None)
    return parser


def parse_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """`--runs` as (profile, transport, rounds), one a run; one-line errors for a malformed entry."""
    specs = []
    for entry in (args.runs or f"reference:{args.transport}").split(","):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("packed", "per-tensor") or not all(parts):
            raise SystemExit(f"--runs entry {entry!r}: expected PROFILE:packed|per-tensor[:ROUNDS]")
        if len(parts) == 3 and not parts[2].isdigit():
            raise SystemExit(f"--runs entry {entry!r}: ROUNDS must be a number")
        specs.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else args.rounds))
    return specs


@contextlib.contextmanager
def start_federation(
    fed_dir: Path, work: Path, args: argparse.Namespace, first: tuple[str, str]
) -> Iterator[tuple[LocalFederation, list[str]]]:
    """The federation every run goes through: a TLS SuperLink (`--superlink-db` state) with SuperNode
    authentication, and `--nodes` SuperNodes, each with a warm trainer on its own private socket that
    preloads the first run's (profile, transport) configuration unless `--no-preload`. Yields the federation
    and the trainers' sockets; on exit stops every process and removes the sockets' folders."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.flower_transfer:
        env[PULL_RETRY_ENV] = "flower"
    env[CHUNK_ENV] = str(args.chunk_bytes)
    if args.trace:
        env[TRACE_ENV] = str(args.trace.resolve())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TRACE_HOOK), os.environ.get("PYTHONPATH", "")) if p)
    if args.transfer_concurrency:
        env.update(dict.fromkeys(TRANSFER_CONCURRENCY_ENV, str(args.transfer_concurrency)))
    fed = LocalFederation(fed_dir, supernode_auth=True, extra_env=env)
    sockets: list[str] = []
    try:
        database = DATABASES[args.superlink_db]
        db = ["--database", database] if database else []
        fed.start_superlink([*db, "--object-store", args.object_store,
                             *(["--cold-serverapp"] if args.cold_serverapp else [])])
        preload = fed_dir / "preload.toml"
        write_toml(preload, run_config(work, first[0], first[1], args))
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
            if args.cold_clientapp:
                extra.append("--cold-clientapp")
            fed.start_supernode(i, args.nodes, extra_args=extra)
        yield fed, sockets
    finally:
        fed.stop()
        for sock in sockets:
            shutil.rmtree(Path(sock).parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.flower_transfer:
        args.object_store, args.transfer_concurrency, args.chunk_mib = "database", 2, 5.0
    # the chunk size every process of the federation gets: --chunk-mib, else the environment's or fedtune's
    chunk_env = {CHUNK_ENV: str(int(args.chunk_mib * 2**20))} if args.chunk_mib else os.environ
    try:
        args.chunk_bytes = chunk_bytes(chunk_env)
    except FedTuneError as err:
        raise SystemExit(f"error: {err}") from None
    silence_flwr()
    # stopped from outside (timeout, kill): unwind, so the federation's processes are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = args.work.resolve()
    specs = parse_runs(args)
    ensure_prepared(work, args.shape)
    fed_dir = work / f"federation-{time.strftime('%Y%m%d-%H%M%S')}"
    payload: dict[str, Any] = {
        "machine": machine(),
        "http_stack": http_stack(),
        "command": "python -m bench.federation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "superlink_db": args.superlink_db,
        "flower_transfer": args.flower_transfer,
        "object_store": args.object_store,
        "transfer_concurrency": args.transfer_concurrency or int(
            TRANSFER_CONCURRENCY_ENV["FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS"]),
        "chunk_bytes": args.chunk_bytes,
        "clientapp": "cold" if args.cold_clientapp else "prestarted",
        "serverapp": "cold" if args.cold_serverapp else "prestarted",
        "runs": [],
    }
    print(f"machine: {payload['machine']} | {payload['http_stack']}", flush=True)
    started = time.monotonic()
    with start_federation(fed_dir, work, args, specs[0][:2]) as (fed, sockets):
        payload["superlink_and_nodes_up_seconds"] = time.monotonic() - started
        payload["preload_seconds"] = (
            0.0 if args.no_preload else wait_preloaded(sockets, args.run_timeout, fed.supernodes)
        )
        print(
            f"federation up: SuperLink + {args.nodes} SuperNodes in "
            f"{payload['superlink_and_nodes_up_seconds']:.1f} s, warm trainers preloaded "
            f"{payload['preload_seconds']:.1f} s later (db: {args.superlink_db}, "
            f"objects: {args.object_store}, "
            f"transfer concurrency: {payload['transfer_concurrency']}, "
            f"chunks: {payload['chunk_bytes'] / 2**20:g} MiB, "
            f"ClientApp: {payload['clientapp']}, ServerApp: {payload['serverapp']})",
            flush=True,
        )
        for profile, transport, rounds in specs:
            payload["runs"].append(one_run(fed, work, profile, transport, args, rounds))
            if args.json:
                args.json.write_text(json.dumps(payload, indent=1))
    print_comparison(payload["runs"])
    if args.trace:
        print(f"\nevery request, all runs (trace: {args.trace}):")
        payload["requests"] = request_trace.summarize(args.trace)
        request_trace.print_summary(payload["requests"])
    print(f"\nmachine: {payload['machine']} | {payload['http_stack']}\ncommand: {payload['command']}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
