"""Following a run: the stream's JSON lines become readable lines, the status line tracks the round,
its phase, the nodes and the budget, and the raw stream is kept for machines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from fedtune.follow import NodeLogs, RunFollower, StreamRenderer, status_text
from fedtune.report.view import load
from tests.conftest import REPO
from tests.console.test_report import run_dir  # noqa: F401 - fixture


def serverapp_lines() -> list[str]:
    """What a ServerApp's stream carries: its log lines through fedtune.logs as JSON (real pipeline)."""
    code = textwrap.dedent("""
        from logging import INFO, WARNING, getLogger
        from flwr.common.logger import log
        from fedtune.logs import configure_logging
        configure_logging(fmt="json", run_id=7)
        log(WARNING, "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        log(INFO, "[ROUND %s/%s]", 1, 2)
        log(INFO, "configure_train: Sampled 2 nodes (out of 2)")
        getLogger("fedtune.strategy").info("round 1: sent the global adapter to 2 nodes (lr 0.0002, 7.07 MB each)")
        log(INFO, "aggregate_train: Received 2 results and 0 failures")
        getLogger("fedtune.strategy").info("round 1: loss 1.4356 | down 14.15 MB, up 14.15 MB | budget 28.30 MB")
        getLogger("fedtune.strategy").warning("round 2: node 3 failed: lost")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            getLogger("fedtune.serverapp").exception("run failed")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return ["Successfully started run 7\n", *done.stdout.splitlines(keepends=True)]


def test_stream_lines_become_readable_and_state_follows_the_round():
    renderer = StreamRenderer()
    shown = [text for line in serverapp_lines() if (text := renderer.feed(line)) is not None]
    assert not [s for s in shown if "{" in s and '"event"' in s], shown
    assert any("round 1: loss 1.4356" in s for s in shown)
    assert any("warning" in s and "node 3 failed" in s for s in shown)
    assert any("error" in s and "run failed" in s and "RuntimeError: boom" in s for s in shown), shown
    assert not [s for s in shown if "fraction_evaluate" in s or "configure_train" in s or "[ROUND" in s]
    state = renderer.state
    assert (state.run_id, state.round, state.planned, state.sampled, state.finished_rounds) == (7, 1, 2, 2, 1)
    assert state.errors == ["run failed"]


def test_node_logs_give_each_nodes_phase(tmp_path):
    path = tmp_path / "supernode-0.log"
    node = NodeLogs([path])
    assert node.poll() == {}
    lines = [
        {"event": "Receiving: train message (ID: ab)", "logger": "flwr"},
        {"event": "Received successfully", "logger": "flwr"},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert node.poll() == {"node 0": "starting"}
    with open(path, "a") as handle:
        handle.write(json.dumps({"event": "no CUDA device", "round": 1}) + "\n")
        handle.write('{"event": "round 1: loss 1.6 over 5 st')  # half a line: not read yet
    assert node.poll() == {"node 0": "training"}
    with open(path, "a") as handle:
        handle.write('eps, 10.0 tokens/s", "round": 1}\n' + json.dumps({"event": "Sending: train message"}) + "\n")
    assert node.poll() == {"node 0": "uploading"}


def test_status_line_has_round_phase_nodes_loss_and_budget(run_dir):  # noqa: F811
    renderer = StreamRenderer()
    for line in serverapp_lines()[:5]:
        renderer.feed(line)
    view = load(run_dir)
    text = status_text(renderer.state, view, {"node 0": "training", "node 1": "uploading"})
    assert text.startswith("round 1/2 · 2 nodes training · node 0 training, node 1 uploading")
    assert "round 3: sampled 3 replied 3 failed 0 rejected 0" in text
    assert f"loss {view.rounds[-1].train_loss:.4f}" in text
    assert f"{view.budget_mb:,.2f} MB of the 2,942.79 MB reference (cap 200,000)" in text


def test_follower_prints_progress_without_a_terminal_and_keeps_the_raw_stream(tmp_path, run_dir):  # noqa: F811
    lines = serverapp_lines()
    outputs = run_dir.parent
    lines[0] = f"Successfully started run {run_dir.name}\n"

    def slow() -> Iterator[str]:
        for line in lines:
            time.sleep(0.05)
            yield line

    out = io.StringIO()
    follower = RunFollower(Console(file=out, width=200), outputs=outputs, raw_log=tmp_path / "raw.log",
                           refresh=0.02)
    state = follower.follow(slow())  # type: ignore[arg-type]
    text = out.getvalue()
    assert "[progress] round" in text and "MB of the 2,942.79 MB reference" in text, text
    assert '"event"' not in text
    assert state.run_id == int(run_dir.name)
    assert Path(tmp_path / "raw.log").read_text().splitlines() == [line.rstrip("\n") for line in lines]
