"""MMLU test questions from a hub (cais/mmlu, config "all", split test) or from local files.

Local layouts:
- the original MMLU tarball: headerless CSV files `<subject>_test.csv` (question, A, B, C, D, answer
  letter), found anywhere under the given folder (`data/test/` in the tarball), or one such file;
- parquet, JSON lines or JSON (a list of records) with `question`, `choices` (4 strings), `answer`
  (0-3 or A-D) and `subject` — the cais/mmlu columns; a folder is searched for `all/test*`, then
  `test*`, then `**/test*` files of those types (the cais/mmlu repository layout).
  The lukaemon/mmlu columns (`input`, `A`..`D`, `target`) are accepted too.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedTuneError
from fedtune.eval.categories import SUBJECT_CATEGORY
from fedtune.runtime_env import env_flag

HUB_DATASET = "cais/mmlu"
HUB_CONFIG = "all"
HUB_SPLIT = "test"
LETTERS = ("A", "B", "C", "D")
_TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the right choice, 0-3

    @property
    def category(self) -> str:
        return SUBJECT_CATEGORY[self.subject]


def load_mmlu(source: str | None, limit: int | None = None) -> tuple[list[Question], str]:
    """Questions (sorted by subject, file order within a subject) and a description of where from.

    `source` None means the hub dataset; anything else must be an existing file or folder.
    `limit` keeps the first N questions of every subject (quick runs).
    """
    from fedtune.eval.sample import EMBEDDED_MMLU, sample_dir

    if source is None or source == HUB_DATASET:
        questions, where = _from_hub(), f"{HUB_DATASET} ({HUB_CONFIG}, {HUB_SPLIT})"
    elif source == EMBEDDED_MMLU:
        questions = _from_path(sample_dir())
        where = f"{EMBEDDED_MMLU} (our own sample questions, not MMLU)"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FedTuneError(f"--mmlu {source}: no such file or folder")
        questions, where = _from_path(path), str(path.resolve())
    if not questions:
        raise FedTuneError(f"no MMLU test questions found in {where}")
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    ordered: list[Question] = []
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        ordered.extend(rows[:limit] if limit else rows)
    return ordered, where


# ---- sources ----------------------------------------------------------------------------------


def _from_hub() -> list[Question]:
    if env_flag("HF_HUB_OFFLINE"):
        raise FedTuneError(
            f"MMLU comes from the hub ({HUB_DATASET}) but HF_HUB_OFFLINE is set: "
            "pass --mmlu PATH (a folder of <subject>_test.csv files, or parquet/JSON with "
            "question/choices/answer/subject; embedded/mmlu-sample for a smoke test)"
        )
    from datasets import load_dataset

    try:
        rows = load_dataset(HUB_DATASET, HUB_CONFIG, split=HUB_SPLIT)
    except Exception as err:  # network, auth, missing cache: one line, the fix is --mmlu
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedTuneError(f"cannot load {HUB_DATASET} from the hub ({first}); pass --mmlu PATH") from None
    return [_record(row, HUB_DATASET, i) for i, row in enumerate(rows)]


def _from_path(path: Path) -> list[Question]:
    if path.is_file():
        return _read_file(path)
    csvs = sorted(path.rglob("*_test.csv"))
    if csvs:
        return [q for file in csvs for q in _read_csv(file)]
    for pattern in ("all/test*", "test*", "**/test*"):
        files = sorted(f for f in path.glob(pattern) if f.is_file() and f.suffix in _TABLE_SUFFIXES)
        if files:
            return [q for file in files for q in _read_file(file)]
    # a folder of our own files, whatever their names
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in _TABLE_SUFFIXES)
    if files:
        return [q for file in files for q in _read_file(file)]
    raise FedTuneError(
        f"--mmlu {path}: no <subject>_test.csv, parquet, .jsonl or .json test files in this folder"
    )


def _read_file(path: Path) -> list[Question]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: Iterable[Mapping[str, Any]] = pq.read_table(path).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("data", data.get("test")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise FedTuneError(f"{path}: expected a JSON list of question records")
    else:
        raise FedTuneError(f"{path}: unsupported file type (use .csv, .parquet, .jsonl or .json)")
    default_subject = path.parent.name if path.parent.name in SUBJECT_CATEGORY else None
    return [_record(row, str(path), i, default_subject) for i, row in enumerate(rows)]


def _read_csv(path: Path) -> list[Question]:
    """One subject per file, headerless rows: question, A, B, C, D, answer letter (MMLU tarball)."""
    subject = path.stem.removesuffix("_test")
    _check_subject(subject, f"{path} (subject from the file name)")
    questions = []
    with open(path, newline="", encoding="utf-8") as handle:
        for i, row in enumerate(csv.reader(handle)):
            if len(row) != 6:
                raise FedTuneError(f"{path} row {i + 1}: expected 6 columns (question, A, B, C, D, answer)")
            questions.append(
                Question(subject, row[0], (row[1], row[2], row[3], row[4]), _answer(row[5], path, i))
            )
    return questions


def _record(row: Mapping[str, Any], where: str, index: int, default_subject: str | None = None) -> Question:
    if not isinstance(row, Mapping):
        raise FedTuneError(f"{where} row {index + 1}: expected a record with question/choices/answer/subject")
    question = row.get("question", row.get("input"))
    choices = row.get("choices")
    if choices is None and all(letter in row for letter in LETTERS):
        choices = [row[letter] for letter in LETTERS]
    answer = row.get("answer", row.get("target"))
    subject = row.get("subject") or default_subject
    if question is None or choices is None or answer is None or subject is None:
        raise FedTuneError(
            f"{where} row {index + 1}: needs question, choices, answer and subject (found {sorted(row)})"
        )
    choices = list(choices)
    if len(choices) != 4:
        raise FedTuneError(f"{where} row {index + 1}: expected 4 choices, found {len(choices)}")
    _check_subject(str(subject), f"{where} row {index + 1}")
    return Question(
        str(subject), str(question), tuple(str(c) for c in choices), _answer(answer, where, index)
    )


def _answer(value: Any, where: object, index: int) -> int:
    if isinstance(value, str):
        text = value.strip().upper()
        if text in LETTERS:
            return LETTERS.index(text)
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise FedTuneError(f"{where} row {index + 1}: answer {value!r} is not one of A-D or 0-3")


def _check_subject(subject: str, where: str) -> None:
    if subject not in SUBJECT_CATEGORY:
        raise FedTuneError(f"{where}: unknown MMLU subject {subject!r} (one of the 57, e.g. 'anatomy')")
