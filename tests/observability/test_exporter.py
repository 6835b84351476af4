"""The exporter on synthetic results.json files (fast): every series, counters across rounds, resumes,
status reconciliation, the notify endpoint, and serving while the sources are busy."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtune.federation import free_port
from fedtune.metrics.notify import results_notifier
from fedtune.metrics.service import Exporter
from fedtune.metrics.state import State, Traffic, run_status
from fedtune.results import RunResults

MB = 1024 * 1024


def round_record(n: int, nodes: dict[str, int], failed=(), rejected=None, budget_before: int = 0) -> dict:
    """A round as the ServerApp writes it (fedtune.results.RoundRecord.to_json shape)."""
    per_node = {
        node: {
            "node_id": int(node), "down_bytes": size, "up_bytes": size, "down_sent_bytes": size // 2,
            "up_sent_bytes": size // 2, "train_loss": 2.0 / n, "num_examples": 100, "train_seconds": 3.0,
            "tokens_per_second": 50.0, "peak_memory_bytes": 1 << 30,
            "stage_seconds": {"train": 3.0, "adapter_in": 0.25, "bogus-stage": 1.0},
            "timeline": {"server_sent": 1000.0 * n, "server_received": 1000.0 * n + 7.5},
        }
        for node, size in nodes.items()
    }
    rejected = rejected or {}
    total = sum(2 * s for s in nodes.values())
    start = 1000.0 * n
    return {
        "round": n, "learning_rate": 1e-4, "sampled": [int(k) for k in nodes] + [int(f) for f in failed],
        "replied": sorted(int(k) for k in nodes), "failed": [int(f) for f in failed],
        "rejected": rejected, "rejections": dict(Counter(rejected.values())), "aggregated": True,
        "train_loss": 2.0 / n, "nodes": per_node,
        "bytes_down": total // 2, "bytes_up": total // 2, "bytes_total": total,
        "budget_bytes": budget_before + total, "budget_mb": (budget_before + total) / MB,
        "duration_seconds": 10.0 * n, "checkpoint_seconds": 0.5,
        "timeline": {"started": start, "sent": start + 1, "all_replies": start + 9, "aggregated": start + 9.5,
                     "checkpoint_written": start + 10.0},
    }


def write_results(root: Path, run_id: int, rounds: list[dict], status="running", **extra) -> Path:
    path = root / str(run_id) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "run_id": run_id, "status": status, "started_at": "2026-01-01T00:00:00Z",
        "config": {"num_server_rounds": 3, "model": {"name": "m"}, "dataset": {"name": "d"}},
        "rounds": rounds, "budget_bytes": rounds[-1]["budget_bytes"] if rounds else 0,
        "budget_mb": (rounds[-1]["budget_bytes"] if rounds else 0) / MB,
        "sent_bytes": (rounds[-1]["budget_bytes"] if rounds else 0) // 2,
        "budget_limit_mb": 200000.0, **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
    return path


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def get(samples, name, **labels):
    return samples[(name, tuple(sorted({k: str(v) for k, v in labels.items()}.items())))]


@pytest.fixture
def exporter(tmp_path):
    exp = Exporter([tmp_path], host="127.0.0.1", port=free_port(), interval=0.1).start()
    yield exp
    exp.stop()


def test_rounds_become_series(tmp_path, exporter):
    r1 = round_record(1, {"11": 1000, "22": 1000})
    write_results(tmp_path, 7, [r1])
    exporter.state.refresh()
    s = scrape(exporter.port)
    assert get(s, "fedtune_communication_budget_bytes", run_id=7) == 4000
    assert get(s, "fedtune_communication_budget_mb", run_id=7) == pytest.approx(4000 / MB)
    assert get(s, "fedtune_communication_budget_limit_mb", run_id=7) == 200000
    assert get(s, "fedtune_communication_budget_reference_mb") == pytest.approx(2942.79)
    assert get(s, "fedtune_round", run_id=7) == 1
    assert get(s, "fedtune_run_status", run_id=7, status="running") == 1
    assert get(s, "fedtune_run_status", run_id=7, status="completed") == 0

    r2 = round_record(2, {"11": 1500}, failed=["22"], rejected={"11": "oversize"}, budget_before=4000)
    write_results(tmp_path, 7, [r1, r2], status="completed")
    exporter.state.refresh()
    s = scrape(exporter.port)
    key = {"run_id": 7, "kind": "leaderboard"}
    assert get(s, "fedtune_communication_bytes_total", node=11, direction="down", **key) == 2500
    assert get(s, "fedtune_communication_bytes_total", node=11, direction="up", **key) == 2500
    assert get(s, "fedtune_communication_bytes_total", node=22, direction="up", **key) == 1000
    assert get(s, "fedtune_round_communication_bytes", run_id=7, node=11, direction="down") == 1500
    assert get(s, "fedtune_node_failures_total", run_id=7, node=22) == 1
    assert get(s, "fedtune_rejected_updates_total", run_id=7, reason="oversize") == 1
    assert get(s, "fedtune_round_nodes", run_id=7, state="failed") == 1
    assert get(s, "fedtune_round_nodes", run_id=7, state="replied") == 1
    assert get(s, "fedtune_round_duration_seconds_count", run_id=7) == 2
    assert get(s, "fedtune_round_duration_seconds_sum", run_id=7) == 30
    assert get(s, "fedtune_round_duration_seconds_bucket", run_id=7, le="15.0") == 1
    assert get(s, "fedtune_node_train_loss", run_id=7, node=11) == pytest.approx(1.0)
    assert get(s, "fedtune_node_train_loss", run_id=7, node=22) == pytest.approx(2.0)  # its latest round
    assert get(s, "fedtune_node_train_examples", run_id=7, node=11) == 100
    assert get(s, "fedtune_node_train_seconds_total", run_id=7, node=11) == 6
    assert get(s, "fedtune_node_tokens_per_second", run_id=7, node=11) == 50
    assert get(s, "fedtune_node_peak_memory_bytes", run_id=7, node=11) == 1 << 30
    assert get(s, "fedtune_checkpoint_write_seconds_total", run_id=7) == 1.0
    assert get(s, "fedtune_run_status", run_id=7, status="completed") == 1
    assert get(s, "fedtune_rounds_planned", run_id=7) == 3


def test_resumed_run_does_not_count_carried_rounds_twice(tmp_path, exporter):
    r1 = round_record(1, {"11": 1000})
    write_results(tmp_path, 1, [r1], status="failed")
    r2 = round_record(2, {"11": 1000}, budget_before=2000)
    write_results(tmp_path, 2, [r1, r2], status="completed", resumed_from=1)
    exporter.state.refresh()
    s = scrape(exporter.port)
    key = {"node": 11, "direction": "down", "kind": "leaderboard"}
    assert get(s, "fedtune_communication_bytes_total", run_id=1, **key) == 1000
    assert get(s, "fedtune_communication_bytes_total", run_id=2, **key) == 1000
    assert get(s, "fedtune_communication_budget_bytes", run_id=2) == 4000  # the leaderboard counts both


def test_status_reconciled_with_the_superlink():
    view = type("V", (), {"results": RunResults(run_id=1, status="running")})()
    assert run_status(view, Traffic("finished:failed", 0, 0)) == "failed"  # ServerApp killed
    assert run_status(view, Traffic("running", 0, 0)) == "running"
    assert run_status(None, Traffic("pending", 0, 0)) == "pending"
    assert run_status(None, Traffic("finished:stopped", 0, 0)) == "stopped"


def test_wire_counters_from_the_superlink(tmp_path, exporter):
    exporter.state.set_traffic({"5": Traffic("running", 1234, 567)})
    s = scrape(exporter.port)
    assert get(s, "fedtune_communication_bytes_total", run_id=5, node="all", direction="down", kind="wire") == 1234
    assert get(s, "fedtune_communication_bytes_total", run_id=5, node="all", direction="up", kind="wire") == 567
    assert get(s, "fedtune_superlink_up") == 1
    exporter.state.set_traffic(None)
    assert get(scrape(exporter.port), "fedtune_superlink_up") == 0


def test_notify_finds_results_outside_the_output_root(tmp_path, exporter, monkeypatch):
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    path = write_results(elsewhere, 9, [round_record(1, {"11": 10})])
    monkeypatch.setenv("FEDTUNE_METRICS_PORT", str(exporter.port))
    results_notifier(path)({})
    for _ in range(50):
        s = scrape(exporter.port)
        if ("fedtune_round", (("run_id", "9"),)) in s:
            break
        import time

        time.sleep(0.1)
    assert get(s, "fedtune_round", run_id=9) == 1
    bad = urllib.request.Request(
        f"http://127.0.0.1:{exporter.port}/api/v1/notify", data=b'{"results": "/etc/passwd"}'
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=5)
    assert err.value.code == 400


def test_notifier_without_exporter_is_harmless(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_METRICS_PORT", str(free_port()))  # nothing listens
    results_notifier(tmp_path / "results.json")({})
    monkeypatch.delenv("FEDTUNE_METRICS_PORT")
    results_notifier(tmp_path / "results.json")({})


def test_keeps_serving_while_a_scan_is_stuck(tmp_path, exporter):
    write_results(tmp_path, 3, [round_record(1, {"11": 10})])
    exporter.state.refresh()
    with exporter.state.lock:  # a scan or poll holding the state: scrapes wait, never fail
        pass
    import threading

    release = threading.Event()
    original = exporter.state.refresh

    def slow_refresh():
        release.wait(10)
        original()

    exporter.state.refresh = slow_refresh
    exporter.state.wake.set()
    assert get(scrape(exporter.port), "fedtune_round", run_id=3) == 1
    release.set()


def test_only_latest_runs_exported(tmp_path):
    for run in range(5):
        write_results(tmp_path, run, [], status="completed", started_at=f"2026-01-0{run + 1}T00:00:00Z")
    write_results(tmp_path, 99, [], status="running", started_at="2025-01-01T00:00:00Z")
    state = State([tmp_path], max_runs=2)
    state.refresh()
    views, _ = state.snapshot()
    assert set(views) == {"4", "3", "99"}


def test_sent_bytes_phases_and_stages(tmp_path, exporter):
    r1 = round_record(1, {"11": 1000})
    r2 = round_record(2, {"11": 1000}, budget_before=2000)
    write_results(tmp_path, 4, [r1, r2])
    exporter.state.refresh()
    s = scrape(exporter.port)
    sent = {"run_id": 4, "node": 11, "kind": "sent"}
    assert get(s, "fedtune_communication_bytes_total", direction="down", **sent) == 1000  # 2 rounds × 500
    assert get(s, "fedtune_communication_bytes_total", direction="up", **sent) == 1000
    assert get(s, "fedtune_communication_sent_bytes", run_id=4) == 4000 // 2
    assert get(s, "fedtune_round_phase_seconds", run_id=4, phase="send") == 1
    assert get(s, "fedtune_round_phase_seconds", run_id=4, phase="replies") == 8
    assert get(s, "fedtune_round_phase_seconds", run_id=4, phase="aggregate") == 0.5
    assert get(s, "fedtune_round_phase_seconds", run_id=4, phase="checkpoint") == 0.5
    assert get(s, "fedtune_round_phases_seconds_total", run_id=4, phase="replies") == 16
    assert get(s, "fedtune_node_stage_seconds", run_id=4, node=11, stage="train") == 3
    assert get(s, "fedtune_node_stage_seconds", run_id=4, node=11, stage="adapter_in") == 0.25
    assert not [k for k in s if k[0] == "fedtune_node_stage_seconds" and ("stage", "bogus-stage") in k[1]]
    assert get(s, "fedtune_node_round_trip_seconds", run_id=4, node=11) == 7.5
    assert get(s, "fedtune_run_info", run_id=4, model="m", dataset="d", transport="packed") == 1


def test_older_kebab_case_files_still_export(tmp_path, exporter):
    record = round_record(1, {"11": 1000})
    record["nodes"]["11"] = {"down-bytes": 1000, "up-bytes": 1000, "train-loss": 1.5}
    del record["rejections"]
    record["rejected"] = {"22": "non-finite: train-loss"}
    write_results(tmp_path, 5, [record])
    exporter.state.refresh()
    s = scrape(exporter.port)
    assert get(s, "fedtune_node_train_loss", run_id=5, node=11) == 1.5
    assert get(s, "fedtune_rejected_updates_total", run_id=5, reason="non-finite") == 1
