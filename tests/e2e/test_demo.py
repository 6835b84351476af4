"""`make demo` end to end, as a person sees it: the demo's command runs in a pseudo-terminal (tmux) on the
embedded SmolLM2 model, and the test reads the screen back — live progress while it runs, no JSON lines,
the final table, the report's path — then checks results.json, the report in a real browser, and that
every process is gone. The suite runs the demo once, here.

A run that fails under `flwr run --stream` (which exits 0 for it) must fail the demo: one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.console.test_report import check_report_in_browser

pytestmark = pytest.mark.slow

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROGRESS = re.compile(r"round [123]/3 .*(sampling|sending|training|aggregating|round done|node \d)")


def leftovers(workdir: Path, grace: float = 15.0) -> str:
    """Processes whose command line names `workdir`, after `grace` seconds for ones already exiting."""
    deadline = time.monotonic() + grace
    while True:
        found = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True).stdout.strip()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1)


class Tmux:
    """A private tmux server (its own socket) holding one pane of a fixed size."""

    def __init__(self, tmp_path: Path, width: int = 160, height: int = 48) -> None:
        if shutil.which("tmux") is None:
            if os.environ.get("CI"):
                pytest.fail("tmux is not installed: scripts/install-tools.sh installs it")
            pytest.skip("tmux not installed")
        self.socket = f"fedtune-test-{os.getpid()}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g history-limit 200000\nset -g remain-on-exit on\n")
        self.size = (width, height)
        self.conf = conf

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, command: str) -> None:
        width, height = self.size
        self.tmux("new-session", "-d", "-s", "demo", "-x", str(width), "-y", str(height), command)

    def screen(self, history: bool = False) -> str:
        args = ["capture-pane", "-p", "-J", "-t", "demo"]
        return self.tmux(*args, *(["-S", "-", "-E", "-"] if history else []))

    def exit_status(self) -> int | None:
        """The command's exit code once it has ended (None while it runs); 128+N when signal N killed it,
        as a shell reports it. tmux 3.3 leaves pane_dead_status empty for exit 0 (and for a signal, which
        it puts in pane_dead_signal), so each field is prefixed to keep its place."""
        fields = self.tmux("display-message", "-p", "-t", "demo",
                           "#{pane_dead} s#{pane_dead_status} k#{pane_dead_signal}").split()
        if fields[:1] != ["1"]:
            return None
        status, killed_by = fields[1][1:], fields[2][1:]
        if killed_by:
            return 128 + int(killed_by)
        return int(status or 0)

    def stop(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def test_demo_in_a_terminal_shows_progress_table_and_report(tmp_path):
    workdir = tmp_path / "demo"
    env = " ".join(f"{k}={v}" for k, v in QUIET_ENV.items())
    # the terminal's own size, not one inherited from the test's environment
    command = f"cd {shlex.quote(str(REPO))} && env -u COLUMNS -u LINES {env} {shlex.quote(sys.executable)} " \
              f"-m fedtune.demo --workdir {shlex.quote(str(workdir))}"
    term = Tmux(tmp_path)
    screens: list[str] = []
    try:
        term.start(command)
        deadline = time.monotonic() + 1800
        status = None
        while status is None and time.monotonic() < deadline:
            time.sleep(2)
            screens.append(term.screen())
            status = term.exit_status()
        assert status is not None, "the demo did not finish in 30 min:\n" + term.screen()
        output = term.screen(history=True)
    finally:
        term.stop()
    (tmp_path / "terminal.txt").write_text(output)
    assert status == 0, output[-4000:]

    # what a person saw while it ran: the live status, never a JSON log line
    live = [s for s in screens if PROGRESS.search(s)]
    assert live, "no progress line on the screen during the run:\n" + "\n----\n".join(screens[-3:])
    for text in (output, *screens):
        assert '{"event"' not in text and '"level":' not in text, text[-3000:]
    for noise in ("FutureWarning", "gradient_checkpointing", "Aggregated MetricRecord", "Final results",
                  "Failed to load CPU gemm_4bit_forward", "weights packed is fastest"):
        assert noise not in output, noise

    results_files = list((workdir / "outputs").glob("*/results.json"))
    assert len(results_files) == 1
    run_dir = results_files[0].parent
    results = json.loads(results_files[0].read_text())
    assert results["status"] == "completed"
    assert results["config"]["model"]["name"] == "embedded/smollm2-135m-instruct"
    assert results["config"]["model"]["quantization"] == 4
    assert len(results["rounds"]) == 3

    # the final table: one row per round with the results' loss and cumulative budget
    for record in results["rounds"]:
        row = re.search(rf"^\s+{record['round']} \|\s+([\d.]+) \|.*\|\s+([\d.]+)\s*$", output, re.MULTILINE)
        assert row, output[-3000:]
        assert float(row.group(1)) == pytest.approx(record["train_loss"], abs=1e-4)
        assert float(row.group(2)) == pytest.approx(record["budget_mb"], abs=0.01)
    assert f"communication budget: {results['budget_mb']:.2f} MB" in output
    assert "status: finished:completed" in output
    assert (Path(results["final_adapter"]) / "adapter_model.safetensors").is_file()
    assert f"report: {run_dir / 'report.html'}" in output
    # the machines' copy of the stream is kept, as JSON lines
    raw = (workdir / "logs" / "serverapp.log").read_text().splitlines()
    assert any(line.startswith('{"event"') for line in raw)
    assert any(f"run report: {run_dir / 'report.html'}" in line for line in raw), "the ServerApp wrote it"

    # the report the run wrote, in a real browser, against results.json
    check_report_in_browser(run_dir, tmp_path, "report-demo.png")
    shutil.copy(tmp_path / "terminal.txt", REPO / "reports" / "demo-terminal.txt")

    # every process the demo started is gone
    assert leftovers(workdir) == ""


def test_a_run_that_fails_under_flwr_run_stream_fails_the_demo(tmp_path):
    """`flwr run --stream` exits 0 when the run fails; the demo must not look like success."""
    workdir = tmp_path / "demo"
    missing = tmp_path / "no-such-run"
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.demo", "--workdir", str(workdir),
         "--run-config", f'resume.from="{missing}"'],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **QUIET_ENV},
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: run "), done.stderr
    assert "finished:failed" in errors[0] and f"no results.json in {missing}" in errors[0], errors[0]
    assert "status: finished:completed" not in done.stdout and "communication budget" not in done.stdout
    run_dir = next((workdir / "outputs").iterdir())
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    assert f"report: {run_dir / 'report.html'}" in done.stdout  # the failed run has its report too
    assert leftovers(workdir) == ""
