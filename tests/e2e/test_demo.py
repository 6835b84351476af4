"""`make demo` end to end: the embedded SmolLM2 model on the generated data, exactly as the demo runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_the_embedded_default_over_tls(tmp_path):
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    results_files = list((workdir / "outputs").glob("*/results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert results["status"] == "completed"
    assert results["config"]["model"]["name"] == "embedded/smollm2-135m-instruct"
    assert results["config"]["model"]["quantization"] == 4
    assert len(results["rounds"]) == 3

    # the printed table has one row per round with the results' loss and cumulative budget
    for record in results["rounds"]:
        row = re.search(rf"^\s+{record['round']} \|\s+([\d.]+) \|.*\|\s+([\d.]+)$", done.stdout, re.MULTILINE)
        assert row, done.stdout[-3000:]
        assert float(row.group(1)) == pytest.approx(record["train_loss"], abs=1e-4)
        assert float(row.group(2)) == pytest.approx(record["budget_mb"], abs=0.01)
    assert f"communication budget: {results['budget_mb']:.2f} MB" in done.stdout
    assert "status: finished:completed" in done.stdout
    assert (Path(results["final_adapter"]) / "adapter_model.safetensors").is_file()

    # every process the demo started is gone
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
