"""MMLU test questions from local files (first) or a hub dataset.

Layouts (`load_mmlu` says which one a run read):
- **lukaemon/mmlu** (what the FlowerTune evaluator reads): one headerless CSV per subject,
  `<subject>_test.csv`, columns `input, A, B, C, D, target` (the original MMLU tarball's `data/test/`),
  found anywhere under the given folder, or one such file. A first row `input,A,B,C,D,target` is skipped.
- **cais/mmlu**: parquet, JSON lines or JSON (a list of records) with `question`, `choices` (4 strings),
  `answer` (0-3 or A-D) and `subject`; a folder is searched for `all/test*`, then `test*`, then `**/test*`
  files of those types (the cais/mmlu repository layout). Records with lukaemon's column names (`input`,
  `A`..`D`, `target`) are accepted too.
- the hub, only without a local path: `lukaemon/mmlu` (one config per subject) for the FlowerTune protocol,
  `cais/mmlu` (config `all`) for the lm-eval protocol.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fedtune.errors import FedTuneError
from fedtune.eval.categories import SUBJECT_CATEGORY
from fedtune.runtime_env import env_flag

HUB_DATASET = "cais/mmlu"
HUB_CONFIG = "all"
HUB_SPLIT = "test"
LUKAEMON_DATASET = "lukaemon/mmlu"
LUKAEMON_COLUMNS = ("input", "A", "B", "C", "D", "target")
LAYOUT_LUKAEMON = "lukaemon/mmlu layout (headerless per-subject CSV: input,A,B,C,D,target)"
LAYOUT_CAIS = "cais/mmlu layout (question, choices, answer, subject)"
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

    `source` None means the hub dataset (cais/mmlu); anything else must be an existing file or folder.
    `limit` keeps the first N questions of every subject (quick runs).
    """
    questions, where, _layout = load_mmlu_with_layout(source, limit)
    return questions, where


def load_mmlu_with_layout(
    source: str | None, limit: int | None = None, hub_dataset: str = HUB_DATASET
) -> tuple[list[Question], str, str]:
    """As `load_mmlu`, plus which layout the rows came in (`LAYOUT_LUKAEMON` or `LAYOUT_CAIS`).
    Without a local source, `hub_dataset` (cais/mmlu or lukaemon/mmlu) is read from the hub."""
    from fedtune.eval.sample import EMBEDDED_MMLU, sample_dir

    if source is None or source in (HUB_DATASET, LUKAEMON_DATASET):
        name = source or hub_dataset
        if name == LUKAEMON_DATASET:
            questions, layout = _from_lukaemon_hub(), LAYOUT_LUKAEMON
            where = f"{LUKAEMON_DATASET} (hub, split {HUB_SPLIT})"
        else:
            questions, layout = _from_hub(), LAYOUT_CAIS
            where = f"{HUB_DATASET} ({HUB_CONFIG}, {HUB_SPLIT})"
    elif source == EMBEDDED_MMLU:
        questions, layout = _from_path(sample_dir())
        where = f"{EMBEDDED_MMLU} (our own sample questions, not MMLU)"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FedTuneError(f"--mmlu {source}: no such file or folder")
        (questions, layout), where = _from_path(path), str(path.resolve())
    if not questions:
        raise FedTuneError(f"no MMLU test questions found in {where}")
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    ordered: list[Question] = []
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        ordered.extend(rows[:limit] if limit else rows)
    return ordered, where, layout


# ---- sources ----------------------------------------------------------------------------------


def _refuse_offline_hub(name: str) -> None:
    if env_flag("HF_HUB_OFFLINE"):
        raise FedTuneError(
            f"MMLU comes from the hub ({name}) but HF_HUB_OFFLINE is set: "
            "pass --mmlu PATH (a folder of <subject>_test.csv files, or parquet/JSON with "
            "question/choices/answer/subject; embedded/mmlu-sample for a smoke test)"
        )


def _from_lukaemon_hub() -> list[Question]:
    """lukaemon/mmlu: one hub config per subject, split test, columns input,A,B,C,D,target."""
    _refuse_offline_hub(LUKAEMON_DATASET)
    from datasets import load_dataset

    questions = []
    for subject in sorted(SUBJECT_CATEGORY):
        try:
            rows = load_dataset(LUKAEMON_DATASET, subject, split=HUB_SPLIT)
        except Exception as err:  # network, auth, a script-only dataset: one line, the fix is --mmlu
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FedTuneError(
                f"cannot load {LUKAEMON_DATASET} {subject} from the hub ({first}); pass --mmlu PATH "
                "(a folder of <subject>_test.csv files)"
            ) from None
        questions += [_record({**row, "subject": subject}, LUKAEMON_DATASET, i) for i, row in enumerate(rows)]
    return questions


def _from_hub() -> list[Question]:
    _refuse_offline_hub(HUB_DATASET)
    from datasets import load_dataset

    try:
        rows = load_dataset(HUB_DATASET, HUB_CONFIG, split=HUB_SPLIT)
    except Exception as err:  # network, auth, missing cache: one line, the fix is --mmlu
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedTuneError(f"cannot load {HUB_DATASET} from the hub ({first}); pass --mmlu PATH") from None
    return [_record(row, HUB_DATASET, i) for i, row in enumerate(rows)]


def _from_path(path: Path) -> tuple[list[Question], str]:
    if path.is_file():
        return _read_file(path), _layout_of(path)
    csvs = sorted(path.rglob("*_test.csv"))
    if csvs:
        return [q for file in csvs for q in _read_csv(file)], LAYOUT_LUKAEMON
    for pattern in ("all/test*", "test*", "**/test*"):
        files = sorted(f for f in path.glob(pattern) if f.is_file() and f.suffix in _TABLE_SUFFIXES)
        if files:
            return [q for file in files for q in _read_file(file)], LAYOUT_CAIS
    # a folder of our own files, whatever their names
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in _TABLE_SUFFIXES)
    if files:
        return [q for file in files for q in _read_file(file)], LAYOUT_CAIS
    raise FedTuneError(
        f"--mmlu {path}: no <subject>_test.csv, parquet, .jsonl or .json test files in this folder"
    )


def _layout_of(path: Path) -> str:
    return LAYOUT_LUKAEMON if path.suffix.lower() == ".csv" else LAYOUT_CAIS


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
        found = data.get("data", data.get("test")) if isinstance(data, dict) else data
        rows = cast("Iterable[Mapping[str, Any]]", found)  # checked to be a list just below
        if not isinstance(rows, list):
            raise FedTuneError(f"{path}: expected a JSON list of question records")
    else:
        raise FedTuneError(f"{path}: unsupported file type (use .csv, .parquet, .jsonl or .json)")
    default_subject = path.parent.name if path.parent.name in SUBJECT_CATEGORY else None
    return [_record(row, str(path), i, default_subject) for i, row in enumerate(rows)]


def _read_csv(path: Path) -> list[Question]:
    """One subject per file, headerless rows input, A, B, C, D, target (lukaemon/mmlu, the MMLU tarball).
    Cells are kept as written (no type inference)."""
    subject = path.stem.removesuffix("_test")
    _check_subject(subject, f"{path} (subject from the file name)")
    questions = []
    with open(path, newline="", encoding="utf-8") as handle:
        for i, row in enumerate(csv.reader(handle)):
            if i == 0 and tuple(row) == LUKAEMON_COLUMNS:
                continue  # a header row some exports add
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
        str(subject), str(question), cast("tuple[str, str, str, str]", tuple(str(c) for c in choices)),
        _answer(answer, where, index),
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
