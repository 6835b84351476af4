"""The reference submission's own mode: `flwr run . local-simulation` with Flower's simulation engine
(Ray) and 20 virtual SuperNodes, the same app, the tiny model.

`flwr` starts a detached local `flower-superlink --simulation` for a `:local:` connection; this test
gives it its own port and FLWR_HOME and stops it (and whatever it started) afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.federation import TERMINAL_STATUSES, free_port
from fedtune.flwr_config import LOCAL_SIMULATION, write_simulation_connection
from fedtune.process import process_parents
from fedtune.runtime_env import flwr_env
from tests.conftest import REPO, per_message_bytes, sent_message_bytes, tiny_run_config
from tests.host import cmdline, process_tree

pytest.importorskip("ray", reason="needs the simulation extra: pip install 'flwr[simulation]==1.42.0'")

pytestmark = pytest.mark.slow
ROUNDS = 2
NUM_SUPERNODES = 20
# 2 of 20 virtual SuperNodes per round (fraction 0.1); one CPU per ClientApp and two for Ray in all,
# so both ClientApps of a round run side by side on a 2-core machine.
FEDERATION_CONFIG = f"num-supernodes={NUM_SUPERNODES} client-resources-num-cpus=1 init-args-num-cpus=2"


def stop_local_superlink(flwr_home: Path, timeout: float = 20.0) -> list[int]:
    """Stop the detached `flower-superlink --simulation` that `flwr` started for this FLWR_HOME (its
    log file lies under it), with its process group and every descendant (flwr-simulation, Ray)."""
    marker = str(flwr_home / "local-superlink")
    roots = [pid for pid in process_parents() if "flower-superlink" in cmdline(pid) and marker in cmdline(pid)]
    targets = {pid for root in roots for pid in [root, *process_tree(root)]}
    for root in roots:  # started with start_new_session: its process group is its pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGTERM)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in targets):
        time.sleep(0.3)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return sorted(roots)


def _flwr(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("flwr")), *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("simulation")
    flwr_home, outputs = work / "flwr-home", work / "outputs"
    write_simulation_connection(flwr_home)
    env = flwr_env(
        FLWR_HOME=str(flwr_home),
        FEDTUNE_OUTPUT_DIR=str(outputs),
        # our own port: never reuse (or collide with) a local SuperLink someone else started
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        # dependencies are preinstalled; the simulation engine must not `uv sync` the app
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    overrides = tiny_run_config(
        tiny_model_dir,
        **{
            "num-server-rounds": ROUNDS,
            "strategy.fraction-train": 0.1,
            "train.max-steps": 2,
            "train.seq-length": 64,
            "static.num-partitions": NUM_SUPERNODES,
        },
    )
    run_config = work / "run-config.toml"  # flwr takes one TOML file or key=value pairs, not both
    run_config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in overrides.items()))
    started = time.monotonic()
    try:
        done = _flwr(
            env, work, "run", str(REPO), LOCAL_SIMULATION,
            "--federation-config", FEDERATION_CONFIG,
            "--run-config", str(run_config), "--format", "json",
        )
        payload = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        assert done.returncode == 0 and payload.get("success"), f"{done.stdout[-2000:]} {done.stderr[-2000:]}"
        run_id = int(payload["run-id"])
        info: dict = {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            listed = _flwr(env, work, "ls", LOCAL_SIMULATION, "--format", "json")
            runs = json.loads(listed.stdout).get("runs", []) if listed.returncode == 0 else []
            info = next((r for r in runs if int(r.get("run-id", -1)) == run_id), {})
            if info.get("status") in TERMINAL_STATUSES:
                break
            time.sleep(3)
        log = _flwr(env, work, "log", str(run_id), LOCAL_SIMULATION, "--show").stdout
        results_path = outputs / str(run_id) / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        yield {
            "run_id": run_id, "info": info, "results": results, "overrides": overrides, "log": log,
            "seconds": time.monotonic() - started, "flwr_home": flwr_home,
        }
    finally:
        stop_local_superlink(flwr_home)


def test_simulation_run_completes(simulation):
    info, results = simulation["info"], simulation["results"]
    assert info.get("status") == "finished:completed", (info, results.get("error"), simulation["log"][-3000:])
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == list(range(1, ROUNDS + 1))
    print(f"simulation run {simulation['run_id']}: {simulation['seconds']:.0f} s wall")


def test_two_of_twenty_virtual_supernodes_per_round(simulation):
    for record in simulation["results"]["rounds"]:
        assert len(record["sampled"]) == 2 and len(record["replied"]) == 2, record
        assert not record["failed"] and not record["rejected"]
        # partition ids come from the simulation engine's node config, one per virtual SuperNode
        partitions = [int(node["partition_id"]) for node in record["nodes"].values()]
        assert len(set(partitions)) == 2 and all(0 <= p < NUM_SUPERNODES for p in partitions), partitions
        assert record["train_loss"] is not None


def test_simulation_budget_is_the_leaderboard_formula(simulation):
    results = simulation["results"]
    per_message = per_message_bytes(simulation["overrides"])
    expected = per_message * 2 * 2 * ROUNDS  # 2 nodes, both directions, every round
    assert results["budget_bytes"] == expected
    assert results["budget_mb"] == expected / 1024**2
    for record in results["rounds"]:
        assert record["bytes_down"] == record["bytes_up"] == 2 * per_message
        sent = sent_message_bytes(simulation["overrides"])
        assert record["sent_bytes_down"] == record["sent_bytes_up"] == 2 * sent


def test_local_superlink_is_stopped(simulation):
    stop_local_superlink(simulation["flwr_home"])
    marker = str(simulation["flwr_home"] / "local-superlink")
    assert not [pid for pid in process_parents() if "flower-superlink" in cmdline(pid) and marker in cmdline(pid)]
