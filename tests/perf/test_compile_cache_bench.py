"""CPU smoke of bench/compile_cache.py: two fresh trainer processes with the warm trainer's compile-cache
environment, the tiny model with compiled layers (the fast profile). Structure and the cache's own counters
(the restarted process compiles nothing Inductor has cached), never the timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_a_restarted_trainer_takes_its_compiled_layers_from_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    work, out = tmp_path / "work", tmp_path / "compile-cache.json"
    prepared = subprocess.run(
        [sys.executable, "-m", "bench.supernode_round", "prepare", "--out", str(work), "--tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "bench.compile_cache", "--work", str(work), "--profile", "fast", "--steps", "1",
         "--cache", str(tmp_path / "cache"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = json.loads(out.read_text())["processes"]
    for process in (first, second):
        assert [sorted(r) for r in process["rounds"]] == [
            ["compile_seconds", "setup_seconds", "train_seconds"]
        ] * 2
        assert process["cache_env"]["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
        assert process["rounds"][0]["compile_seconds"], "nothing was compiled: the profile lost compile-layers"
    assert first["counters"].get("inductor.fxgraph_cache_miss", 0) > 0
    assert second["counters"].get("inductor.fxgraph_cache_hit", 0) > 0
    assert second["counters"].get("inductor.fxgraph_cache_miss", 0) == 0
    assert "process 2:" in done.stdout and "cache counters:" in done.stdout
