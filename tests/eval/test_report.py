"""Accuracy arithmetic, the table exactly as documented (docs/eval.md), the budget line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.errors import FedTuneError
from fedtune.eval.data import Question
from fedtune.eval.report import find_run_results, read_budget, render_table, summarize

DOCUMENTED = """\
**MMLU · FlowerTune protocol (the leaderboard's evaluator)**

|  | STEM | Social Sciences | Humanities | Average |
| :---: | :---: | :---: | :---: | :---: |
| base | 25.00 | 50.00 | 33.33 | 36.11 |
| fedtune (adapter) | 50.00 | 50.00 | 66.67 | 55.56 |

**Communication budget: 2942.79 MB**

Other (not in the average): base 25.00 · fedtune (adapter) 50.00
"""


def _questions() -> list[Question]:
    def q(subject: str, answer: int) -> Question:
        return Question(subject, "?", ("a", "b", "c", "d"), answer)

    return [
        *[q("anatomy", 0), q("astronomy", 1), q("college_physics", 2), q("machine_learning", 3)],  # STEM
        *[q("sociology", 0), q("econometrics", 1)],  # Social Sciences
        *[q("philosophy", 0), q("prehistory", 1), q("world_religions", 2)],  # Humanities
        *[q("marketing", 0), q("virology", 1), q("nutrition", 2), q("management", 3)],  # Other
    ]


def test_summary_and_table_render_exactly_as_documented():
    questions = _questions()
    answers = [q.answer for q in questions]
    wrong = [(a + 1) % 4 for a in answers]
    # base: STEM 1/4, SS 1/2, Humanities 1/3, Other 1/4; adapter: 2/4, 1/2, 2/3, 2/4
    base = (
        answers[:1]
        + wrong[1:4]
        + answers[4:5]
        + wrong[5:6]
        + answers[6:7]
        + wrong[7:9]
        + answers[9:10]
        + wrong[10:]
    )
    tuned = (
        answers[:2]
        + wrong[2:4]
        + answers[4:5]
        + wrong[5:6]
        + answers[6:8]
        + wrong[8:9]
        + answers[9:11]
        + wrong[11:]
    )
    s_base, s_tuned = summarize(questions, base), summarize(questions, tuned)
    assert s_base["categories"]["STEM"] == {"correct": 1, "total": 4, "accuracy": 0.25}
    assert s_base["categories"]["Humanities"]["accuracy"] == pytest.approx(1 / 3)
    assert s_base["average"] == pytest.approx((0.25 + 0.5 + 1 / 3) / 3)  # mean of three, Other left out
    assert s_base["overall"] == {"correct": 4, "total": 13, "accuracy": 4 / 13}
    assert s_tuned["subjects"]["anatomy"] == {"correct": 1, "total": 1, "accuracy": 1.0}
    from fedtune.eval.command import TITLES

    table = render_table([("base", s_base), ("fedtune (adapter)", s_tuned)], 2942.7851, TITLES["flowertune"])
    assert table == DOCUMENTED
    untitled = render_table([("base", s_base), ("fedtune (adapter)", s_tuned)], 2942.7851)
    assert untitled == DOCUMENTED.split("\n\n", 1)[1]
    assert render_table([], None, TITLES["lm-eval"]).startswith(
        "**MMLU · lm-eval protocol (letter logits): not"
    )
    docs = Path(__file__).resolve().parents[2] / "docs" / "eval.md"
    assert DOCUMENTED in docs.read_text(encoding="utf-8"), "docs/eval.md shows another table"


def test_missing_category_and_budget_render_na():
    s = summarize([Question("anatomy", "?", ("a", "b", "c", "d"), 0)], [0])
    table = render_table([("base", s)], None)
    assert "| base | 100.00 | n/a | n/a | n/a |" in table
    assert "**Communication budget: n/a** (no run results.json: pass --results)" in table


def test_budget_from_run_results(tmp_path: Path):
    run = tmp_path / "run"
    (run / "checkpoints" / "round-0002").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "results.json").write_text(json.dumps({"budget_mb": 56.59912109375, "rounds": [{}, {}]}))
    assert find_run_results(run / "adapter") == (run / "results.json").resolve()
    assert find_run_results(run / "checkpoints" / "round-0002") == (run / "results.json").resolve()
    assert find_run_results(tmp_path) is None
    budget, payload = read_budget(run / "results.json")
    assert budget == 56.59912109375 and len(payload["rounds"]) == 2
    assert read_budget(run)[0] == budget  # the run folder works too
    assert "**Communication budget: 56.60 MB**" in render_table([], budget)
    with pytest.raises(FedTuneError, match="no such file"):
        read_budget(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(FedTuneError, match=r"not a fedtune run's results\.json"):
        read_budget(tmp_path / "other.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapter", "/nonexistent/adapter"], "error: --adapter /nonexistent/adapter: no such folder"),
        (["--adapter", "ADAPTER"], "error: pass --base-model NAME_OR_PATH, or --base-from-adapter"),
        (
            ["--adapter", "ADAPTER", "--base-from-adapter", "--mmlu", "/nonexistent/mmlu"],
            "error: --mmlu /nonexistent/mmlu: no such",
        ),
        (
            ["--adapter", "ADAPTER", "--base-model", "x"],
            "error: MMLU comes from the hub (lukaemon/mmlu) but HF_HUB_OFFLINE is set",
        ),
        (
            ["--protocol", "lm-eval", "--adapter", "ADAPTER", "--base-model", "x"],
            "error: MMLU comes from the hub (cais/mmlu) but HF_HUB_OFFLINE is set",
        ),
        (["--base-model", "x", "--quantization", "0"], "error: --quantization 0: the FlowerTune evaluator"),
        (
            [
                "--adapter",
                "ADAPTER",
                "--base-model",
                "x",
                "--results",
                "/nonexistent/results.json",
                "--mmlu",
                "x",
            ],
            "error: --results /nonexistent/results.json: no such file",
        ),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path: Path, argv: list[str], message: str):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    argv = [str(adapter) if a == "ADAPTER" else a for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "eval", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith(message), proc.stderr


def test_cli_help_lists_eval():
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "eval" in proc.stdout
