"""CPU smoke of the whole-federation benchmark (bench/federation.py): a real TLS SuperLink with SuperNode
auth, two SuperNodes with warm trainers, `flwr run` of the tiny model. Structure only: every hop of the
timeline is stamped, every process's requests are traced (--trace), the JSON is complete; timings are the
benchmark's business, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

HOPS = (
    "ServerApp sent", "SuperNode receiving", "SuperNode received", "ClientApp started", "trainer has adapter",
    "trained", "ClientApp replied", "SuperNode sending", "SuperNode sent", "ServerApp has reply",
)
ROUND_HOPS = ("ServerApp has all replies", "aggregated", "checkpoint written")


def test_federation_benchmark_times_every_hop(tmp_path):
    out = tmp_path / "federation.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.federation", "--work", str(tmp_path / "work"), "--tiny",
            "--nodes", "2", "--rounds", "2", "--steps", "1", "--runs", "reference:packed,reference:per-tensor",
            "--json", str(out), "--trace", str(tmp_path / "trace"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["machine"] and payload["command"].startswith("python -m bench.federation")
    assert [(r["profile"], r["transport"]) for r in payload["runs"]] == [
        ("reference", "packed"), ("reference", "per-tensor")
    ]
    for run in payload["runs"]:
        assert run["status"] == "finished:completed"
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        for rnd in run["rounds"]:
            assert not rnd["failed"] and not rnd["rejected"]
            nodes = rnd["timeline"]["nodes"]
            assert len(nodes) == 2
            for hops in nodes.values():
                assert list(hops) == list(HOPS)
                assert all(isinstance(v, float) for v in hops.values()), hops
            assert list(rnd["timeline"]["round"]) == list(ROUND_HOPS)
            assert all(isinstance(v, float) for v in rnd["timeline"]["round"].values())
            for key in ("wall_seconds", "slowest_train_seconds", "non_training_seconds", "sent_bytes"):
                assert isinstance(rnd[key], (int, float))
        summary = run["summary"]
        for key in ("run_wall_seconds", "sum_slowest_train_seconds", "extrapolated_10_rounds"):
            assert key in summary
    assert "| hop (s from round start) |" in done.stdout and "SuperNode sent" in done.stdout
    # --trace: every process's requests and the servers' object handlers, by role
    requests = {(r["role"], r["kind"], r["name"]): r for r in payload["requests"]}
    for traced in [
        ("SuperNode", "client", "/v1/fleet/pull-object"), ("SuperNode", "client", "/v1/fleet/push-object"),
        ("ServerApp", "client", "/v1/runtime/push-object"), ("ServerApp", "client", "/v1/runtime/pull-object"),
        ("ClientApp", "client", "/v1/runtime/pull-object"), ("ClientApp", "client", "/v1/runtime/push-object"),
        ("SuperLink", "handler", "fleet.pull_object"), ("SuperLink", "handler", "fleet.push_object"),
        ("SuperNode", "handler", "node-runtime.pull_object"),
    ]:
        assert requests[traced]["count"] > 0 and requests[traced]["bytes"] > 0, traced
        assert 0 <= requests[traced]["median_s"] <= requests[traced]["max_s"]
    assert "| process | request / handler |" in done.stdout
