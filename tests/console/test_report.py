"""`fedtune report RUN_DIR`: report.html in a real headless browser — it renders, it needs no network,
and every figure's numbers are the run's (results.json), including failed and rejected nodes and the
eval table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.config import FedTuneConfig
from fedtune.results import NodeRecord, NodeTimeline, RoundRecord, RoundTimeline, RunResults
from tests.conftest import REPO
from tests.console.browser import ARTEFACTS, Dom, dump_dom, screenshot

MB = 2**20
FIGURES = ("loss", "budget", "node_bytes", "phases")


def _round(number: int, t0: float, nodes: dict[int, tuple[str, int, int]], loss: float | None,
           cumulative: int) -> RoundRecord:
    """A round with `nodes` = {node id: (status, down bytes, up bytes)}."""
    records = {
        str(node_id): NodeRecord(node_id=node_id, status=status, partition_id=i, num_examples=40,
                                 train_loss=None if status == "failed" else 1.0 + i,
                                 train_seconds=30.0 + i, down_bytes=down, up_bytes=up,
                                 stage_seconds={"data": 1.0, "model_load": 5.0 + i, "train": 20.0 + i},
                                 rejection="shape mismatch" if status == "rejected" else None,
                                 timeline=NodeTimeline(server_sent=t0 + 1))
        for i, (node_id, (status, down, up)) in enumerate(sorted(nodes.items()))
    }
    down = sum(d for _, d, _ in nodes.values())
    up = sum(u for _, _, u in nodes.values())
    return RoundRecord(
        round=number, learning_rate=1e-4,
        sampled=sorted(nodes), replied=sorted(n for n, (s, _, _) in nodes.items() if s != "failed"),
        failed=sorted(n for n, (s, _, _) in nodes.items() if s == "failed"),
        rejected={str(n): "shape mismatch" for n, (s, _, _) in nodes.items() if s == "rejected"},
        aggregated=loss is not None, train_loss=loss, bytes_down=down, bytes_up=up, bytes_total=down + up,
        mb_total=(down + up) / MB, budget_bytes=cumulative + down + up, budget_mb=(cumulative + down + up) / MB,
        duration_seconds=50.0 + number, checkpoint_seconds=0.4,
        timeline=RoundTimeline(started=t0, sent=t0 + 2.5, all_replies=t0 + 40.0 + number,
                               aggregated=t0 + 41.0 + number),
        nodes=records,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs" / "4242"
    cfg = FedTuneConfig.from_run_config({"num-server-rounds": 4})
    size = 7_413_760  # one adapter message
    plan = [
        {11: ("accepted", size, size), 22: ("accepted", size, size), 33: ("accepted", size, size)},
        {11: ("accepted", size, size), 22: ("failed", size, 0), 33: ("rejected", size, size)},
        {11: ("accepted", size, size), 22: ("accepted", size, size), 33: ("accepted", size, size)},
    ]
    rounds, total = [], 0
    for number, nodes in enumerate(plan, start=1):
        rounds.append(_round(number, 1_700_000_000.0 + 100 * number, nodes, 2.0 / number, total))
        total = rounds[-1].budget_bytes
    results = RunResults(run_id=4242, status="failed", config=cfg.to_dict(), rounds=rounds,
                         budget_bytes=total, budget_mb=total / MB, budget_limit_mb=200_000.0,
                         error="RuntimeError: SuperLink went away", final_adapter=None)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results.to_json()))
    (folder / "eval").mkdir()
    methods = [
        {"name": "base", "average": 0.25, "categories": {
            "STEM": {"accuracy": 0.2}, "Social Sciences": {"accuracy": 0.3}, "Humanities": {"accuracy": 0.25},
            "Other": {"accuracy": 0.1}}},
        {"name": "fedtune (adapter)", "average": 0.5, "categories": {
            "STEM": {"accuracy": 0.4}, "Social Sciences": {"accuracy": 0.6}, "Humanities": {"accuracy": 0.5},
            "Other": {"accuracy": 0.3}}},
    ]
    (folder / "eval" / "mmlu_results.json").write_text(json.dumps(
        {"methods": methods, "num_questions": 12, "mmlu_source": "embedded/mmlu-sample", "budget_mb": 1.0}))
    return folder


def _value(cell: str | None) -> float:
    assert cell is not None
    return float(cell)


def check_report_in_browser(run_dir: Path, tmp_path: Path, artefact: str) -> Dom:
    """Load report.html in Chromium and compare every figure's numbers with results.json; returns the DOM.
    Shared with the demo's end-to-end test (tests/e2e/test_demo.py)."""
    page = run_dir / "report.html"
    results = json.loads((run_dir / "results.json").read_text())
    html_text = page.read_text()
    assert "http://" not in html_text and "https://" not in html_text, "the page must load nothing"
    dom = Dom(dump_dom(page, tmp_path))

    for name in FIGURES:
        assert f"fig-{name}" in dom.ids, name
        assert (run_dir / f"{name}.png").is_file()
    assert len(dom.images) == len(FIGURES)
    assert all(img.get("data-rendered") == "true" for img in dom.images), dom.images  # decoded by Chromium

    rounds = results["rounds"]
    assert [int(_value(r["round"])) for r in dom.tables["data-loss"]] == [r["round"] for r in rounds]
    for row, record in zip(dom.tables["data-loss"], rounds, strict=True):
        assert _value(row["train_loss"]) == pytest.approx(record["train_loss"])
    for row, record in zip(dom.tables["data-budget"], rounds, strict=True):
        assert _value(row["budget_mb"]) == pytest.approx(record["budget_mb"])
        assert _value(row["round_mb"]) == pytest.approx((record["bytes_down"] + record["bytes_up"]) / MB)
    assert _value(dom.ids["budget-mb"]["data-value"]) == pytest.approx(results["budget_mb"])
    for row, record in zip(dom.tables["rounds"], rounds, strict=True):
        assert int(_value(row["failed"])) == len(record["failed"])
        assert int(_value(row["rejected"])) == len(record["rejected"])
        assert int(_value(row["down_bytes"])) == record["bytes_down"]
        assert int(_value(row["up_bytes"])) == record["bytes_up"]

    per_node: dict[str, list[int]] = {}
    for record in rounds:
        for node_id, node in record["nodes"].items():
            totals = per_node.setdefault(node_id, [0, 0])
            totals[0] += node["down_bytes"]
            totals[1] += node["up_bytes"]
    shown = {row["node_id"]: [int(_value(row["down_bytes"])), int(_value(row["up_bytes"]))]
             for row in dom.tables["data-node_bytes"]}
    assert shown == per_node

    for row, record in zip(dom.tables["data-phases"], rounds, strict=True):
        timeline = record["timeline"]
        on_nodes = sum(_value(row[k]) for k in ("wait", "setup", "train"))
        assert on_nodes == pytest.approx(timeline["all_replies"] - timeline["sent"])
        assert _value(row["send"]) == pytest.approx(timeline["sent"] - timeline["started"])
        assert _value(row["aggregate"]) == pytest.approx(timeline["aggregated"] - timeline["all_replies"])
        stages = [n["stage_seconds"] for n in record["nodes"].values() if n["stage_seconds"]]
        if stages:  # the slowest node's stages
            slowest = max(stages, key=lambda st: sum(st.values()))
            assert _value(row["train"]) == pytest.approx(slowest["train"])
            assert _value(row["setup"]) == pytest.approx(sum(v for k, v in slowest.items() if k != "train"))
        assert _value(row["duration_s"]) == pytest.approx(record["duration_seconds"])
        parts = sum(_value(row[k]) for k in ("send", "wait", "setup", "train", "aggregate", "other"))
        assert parts == pytest.approx(record["duration_seconds"])

    problems = sum(len(r["failed"]) + len(r["rejected"]) for r in rounds)
    assert int(str(dom.ids["problems"]["data-count"])) == problems
    assert dom.text_by_id["status"].strip() == results["status"]
    if results.get("final_adapter"):
        assert dom.text_by_id["final-adapter"].strip() == results["final_adapter"]

    shot = screenshot(page, ARTEFACTS / artefact, tmp_path)
    (tmp_path / artefact).write_bytes(shot.read_bytes())  # also beside the test's other files
    return dom


def test_report_command_writes_a_page_that_matches_the_results(run_dir, tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "fedtune"), "report", str(run_dir)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    for record in results["rounds"]:
        assert f"| {record['budget_mb']:>9.2f}" in done.stdout
    assert "round 2: failed 22 | rejected 33: shape mismatch" in done.stdout
    assert f"report: {run_dir / 'report.html'}" in done.stdout

    dom = check_report_in_browser(run_dir, tmp_path, "report-fixture.png")
    assert "RuntimeError: SuperLink went away" in dom.text_by_id["run-error"]
    # the eval table: accuracies in %, Other not in it
    assert "fedtune (adapter)" in dom.text_by_id["eval"] and "50.00" in dom.text_by_id["eval"]
    assert "Other" not in dom.text_by_id["eval"]


def test_report_of_a_run_without_rounds_still_renders(tmp_path):
    from fedtune.report import write_report

    folder = tmp_path / "7"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(RunResults(run_id=7, config={}).to_json()))
    page = write_report(folder)
    dom = Dom(dump_dom(page, tmp_path))
    assert all(img.get("data-rendered") == "true" for img in dom.images)
    assert dom.tables["rounds"] == [] and "eval-missing" in dom.ids
