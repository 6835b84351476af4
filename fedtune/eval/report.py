"""Accuracy per subject and category, the leaderboard average, the reference submission's table and the
communication budget line.

Category accuracy pools the category's questions (correct / total, as lm-eval's `mmlu_*` groups and the
FlowerTune evaluation compute it); the leaderboard average is the plain mean of the STEM, Social Sciences
and Humanities accuracies; Other is reported apart and is not in the average.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.errors import FedTuneError
from fedtune.eval.categories import CATEGORIES, LEADERBOARD_CATEGORIES, OTHER
from fedtune.eval.data import Question
from fedtune.results import RESULTS_FILE

NOT_AVAILABLE = "n/a"


def _tally(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def summarize(questions: Sequence[Question], predictions: Sequence[int]) -> dict[str, Any]:
    """{"subjects": {s: tally}, "categories": {c: tally}, "average": float | None, "overall": tally}."""
    if len(questions) != len(predictions):
        raise ValueError("one prediction per question")
    subjects: dict[str, list[int]] = {}
    categories: dict[str, list[int]] = {c: [0, 0] for c in CATEGORIES}
    for q, p in zip(questions, predictions, strict=True):
        hit = int(p == q.answer)
        subjects.setdefault(q.subject, [0, 0])
        subjects[q.subject][0] += hit
        subjects[q.subject][1] += 1
        categories[q.category][0] += hit
        categories[q.category][1] += 1
    category_tallies = {c: _tally(*categories[c]) for c in CATEGORIES}
    accs = [category_tallies[c]["accuracy"] for c in LEADERBOARD_CATEGORIES]
    average = None if any(a is None for a in accs) else sum(accs) / len(accs)
    correct = sum(int(p == q.answer) for q, p in zip(questions, predictions, strict=True))
    return {
        "subjects": {s: _tally(*subjects[s]) for s in sorted(subjects)},
        "categories": category_tallies,
        "average": average,
        "overall": _tally(correct, len(questions)),
    }


def percent(accuracy: float | None) -> str:
    return NOT_AVAILABLE if accuracy is None else f"{100 * accuracy:.2f}"


def render_table(
    methods: Sequence[tuple[str, dict[str, Any]]], budget_mb: float | None, title: str | None = None
) -> str:
    """The reference submission's table: one row per method, accuracies in % with 2 decimals,
    the communication budget under it, then Other (not part of the average); `title` (the protocol)
    above it when given.

        |  | STEM | Social Sciences | Humanities | Average |
        | :---: | :---: | :---: | :---: | :---: |
        | base | 25.00 | 50.00 | 33.33 | 36.11 |
        | fedtune (adapter) | 50.00 | 50.00 | 66.67 | 55.56 |

        **Communication budget: 2942.79 MB**

        Other (not in the average): base 25.00 · fedtune (adapter) 50.00
    """
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "|  | " + " | ".join(LEADERBOARD_CATEGORIES) + " | Average |",
        "| " + " | ".join([":---:"] * (len(LEADERBOARD_CATEGORIES) + 2)) + " |",
    ]
    for name, summary in methods:
        cells = [percent(summary["categories"][c]["accuracy"]) for c in LEADERBOARD_CATEGORIES]
        lines.append(f"| {name} | " + " | ".join([*cells, percent(summary["average"])]) + " |")
    lines.append("")
    lines.append(budget_line(budget_mb))
    lines.append("")
    other = " · ".join(f"{name} {percent(s['categories'][OTHER]['accuracy'])}" for name, s in methods)
    lines.append(f"{OTHER} (not in the average): {other}")
    return "\n".join(lines) + "\n"


def budget_line(budget_mb: float | None) -> str:
    if budget_mb is None:
        return f"**Communication budget: {NOT_AVAILABLE}** (no run results.json: pass --results)"
    return f"**Communication budget: {budget_mb:.2f} MB**"


def find_run_results(adapter: Path) -> Path | None:
    """The run's results.json next to a run's adapter folders: RUN/adapter, RUN/latest,
    RUN/checkpoints/round-NNNN."""
    adapter = Path(adapter).resolve()
    for candidate in (adapter.parent / RESULTS_FILE, adapter.parent.parent / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_budget(path: Path) -> tuple[float, dict[str, Any]]:
    """(budget in MB, the whole results payload) from a run's results.json."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FedTuneError(f"--results {path}: no such file (a run's results.json)")
    try:
        payload = json.loads(path.read_text())
        budget = float(payload["budget_mb"])
    except (ValueError, KeyError, TypeError) as err:
        raise FedTuneError(f"{path}: not a fedtune run's results.json (no budget_mb: {err})") from None
    return budget, payload
