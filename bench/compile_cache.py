"""Does a restarted warm trainer skip round 1's compilation? Two (or more) fresh trainer processes, one
after the other, sharing one compile-cache folder exactly as `fedtune-supernode --warm-trainer
--compile-cache` sets it (supernode/warm_trainer.py's `service_env`); each loads the model and trains two
rounds through the real round code (clientapp/round.py's `run_round`), as a warm trainer's first two rounds.

    python -m bench.compile_cache --work /tmp/fedtune-bench [--profile fast] [--processes 2] [--steps N]
        [--cache DIR] [--json out.json]

Per process it prints round 1's and round 2's training seconds (round 1 - round 2 ~ what compiling cost),
where torch.compile spent its time (`torch._dynamo.utils.compile_times`: Dynamo's tracing, AOT autograd,
Inductor, per function) and the caches' counters (Inductor's FX-graph cache and the AOT-autograd cache:
hits, misses, bypasses). The model is the one `bench.supernode_round prepare` built in WORK; on a CPU:
`--work` of a `prepare --tiny` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.federation import machine
from bench.supernode_round import (
    REPO,
    base_run_config,
    load_global_arrays,
    node_config,
    profile_overrides,
    round_config_for,
)
from fedtune.runtime_env import flwr_env, silence_flwr

COUNTER_GROUPS = ("inductor", "aot_autograd")
COUNTER_WORDS = ("cache", "bypass")


def child(args: argparse.Namespace) -> None:
    """One trainer process: load, train two rounds, report compile figures as JSON on args.result."""
    silence_flwr()
    started = time.perf_counter()
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    from clientapp.round import NodeCache, run_round
    from fedtune.config import FedTuneConfig

    overrides = profile_overrides(args.profile)
    if args.steps:
        overrides["train.max-steps"] = args.steps
    cfg = FedTuneConfig.from_run_config(base_run_config(args.work, overrides))
    cache = NodeCache()
    cache.model_for(cfg)
    loaded = time.perf_counter() - started
    arrays = load_global_arrays(args.work, cfg.model.transport_dtype)
    rounds: list[dict[str, Any]] = []
    for server_round in (1, 2):
        round_config = round_config_for(cfg, server_round)
        arrays, metrics, _ = run_round(cfg, node_config(args.work), round_config, arrays, cache)
        rounds.append({
            "train_seconds": metrics["train-seconds"],
            "setup_seconds": metrics["time-trainer-setup"],
            # seconds torch.compile spent so far, per timed function (Dynamo, AOT autograd, Inductor, ...)
            "compile_seconds": {name: sum(times) for name, times in compilation_time_metrics.items()},
        })
    found = {
        f"{group}.{key}": count
        for group in COUNTER_GROUPS
        for key, count in counters[group].items()
        if any(word in key for word in COUNTER_WORDS)
    }
    result = {
        "load_seconds": loaded,
        "rounds": rounds,
        "counters": found,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cache_env": {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR_", "TRITON_"))},
    }
    Path(args.result).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-bench"))
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="train.max-steps override (CPU smoke runs)")
    parser.add_argument("--cache", type=Path, default=None, help="compile-cache folder (default: a new one)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child-result", dest="result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.result:
        child(args)
        return {}
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    from supernode.warm_trainer import service_env

    cache = args.cache or Path(tempfile.mkdtemp(prefix="fedtune-compile-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    env = flwr_env(service_env(str(cache)))  # the warm trainer's own environment, cache variables and all
    print(f"machine: {machine()}\nprofile {args.profile}, compile cache {cache}, "
          f"{args.processes} fresh processes", flush=True)
    processes = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.processes):
            result = Path(scratch) / f"process-{index}.json"
            command = [sys.executable, "-m", "bench.compile_cache", "--work", str(args.work),
                       "--profile", args.profile, "--child-result", str(result)]
            command += ["--steps", str(args.steps)] if args.steps else []
            started = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"trainer process {index + 1} exited with {done.returncode}")
            figures = json.loads(result.read_text())
            figures["wall_seconds"] = time.perf_counter() - started
            processes.append(figures)
            report(index + 1, figures)
    payload = {"machine": machine(), "profile": args.profile, "cache": str(cache), "processes": processes}
    if args.cache is None:
        shutil.rmtree(cache, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


def report(number: int, figures: dict[str, Any]) -> None:
    first, second = figures["rounds"]
    print(f"\nprocess {number}: load {figures['load_seconds']:.1f} s | round 1 trains "
          f"{first['train_seconds']:.1f} s | round 2 {second['train_seconds']:.1f} s | process wall "
          f"{figures['wall_seconds']:.1f} s")
    for label, figures_of_round in (("round 1", first), ("both rounds", second)):
        phases = sorted(figures_of_round["compile_seconds"].items(), key=lambda item: -item[1])
        print(f"  compile seconds by function, {label}: "
              + (", ".join(f"{name} {seconds:.1f}" for name, seconds in phases[:8]) or "none"))
    counted = ", ".join(f"{key} {count}" for key, count in sorted(figures["counters"].items()))
    print("  cache counters: " + (counted or "none"))


if __name__ == "__main__":
    main()
