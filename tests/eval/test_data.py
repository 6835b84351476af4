"""Loading MMLU-format test files: the tarball CSV layout, JSON lines, parquet; clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.errors import FedTuneError
from fedtune.eval.data import Question, load_mmlu
from fedtune.eval.sample import EMBEDDED_MMLU, SAMPLE

from .conftest import read_fixture


def _as_rows(questions: list[Question]) -> list[dict]:
    return [
        {"subject": q.subject, "question": q.question, "choices": list(q.choices), "answer": q.answer}
        for q in questions
    ]


def test_csv_tarball_layout(mmlu_dir: Path):
    questions, where = load_mmlu(str(mmlu_dir))
    assert where == str(mmlu_dir.resolve())
    assert _as_rows(questions) == read_fixture(mmlu_dir)
    assert len(questions) == sum(len(rows) for rows in SAMPLE.values())
    # a few questions in every category, several subjects each
    by_category: dict[str, set[str]] = {}
    for q in questions:
        by_category.setdefault(q.category, set()).add(q.subject)
    assert {c: len(s) >= 3 for c, s in by_category.items()} == {
        "STEM": True,
        "Social Sciences": True,
        "Humanities": True,
        "Other": True,
    }
    # the data/test folder itself, and one file, work too
    assert _as_rows(load_mmlu(str(mmlu_dir / "data" / "test"))[0]) == read_fixture(mmlu_dir)
    one, _ = load_mmlu(str(mmlu_dir / "data" / "test" / "astronomy_test.csv"))
    assert {q.subject for q in one} == {"astronomy"} and len(one) == 2


def test_limit_keeps_first_per_subject(mmlu_dir: Path):
    questions, _ = load_mmlu(str(mmlu_dir), limit=1)
    assert _as_rows(questions) == read_fixture(mmlu_dir, limit=1)
    assert len(questions) == len(SAMPLE)


def test_jsonl_parquet_and_json_same_questions(mmlu_dir: Path, mmlu_jsonl: Path, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = read_fixture(mmlu_dir)
    assert _as_rows(load_mmlu(str(mmlu_jsonl))[0]) == expected
    # cais/mmlu repository layout: all/test-00000-of-00001.parquet (+ other splits that must be ignored)
    (tmp_path / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "all" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(expected[:2]), tmp_path / "all" / "dev-00000-of-00001.parquet")
    assert _as_rows(load_mmlu(str(tmp_path))[0]) == expected
    # JSON list with letter answers
    lettered = [{**row, "answer": "ABCD"[row["answer"]]} for row in expected]
    (tmp_path / "q.json").write_text(json.dumps(lettered))
    assert _as_rows(load_mmlu(str(tmp_path / "q.json"))[0]) == expected


def test_embedded_sample_alias():
    questions, where = load_mmlu(EMBEDDED_MMLU)
    assert len(questions) == sum(len(rows) for rows in SAMPLE.values())
    assert "not MMLU" in where


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "cooking"},
            "unknown MMLU subject 'cooking'",
        ),
        (
            {"question": "q", "choices": ["a", "b", "c"], "answer": 1, "subject": "anatomy"},
            "expected 4 choices",
        ),
        (
            {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7, "subject": "anatomy"},
            "answer 7 is not one of A-D or 0-3",
        ),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "subject": "anatomy"}, "needs question, choices"),
    ],
)
def test_bad_rows(tmp_path: Path, row: dict, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(FedTuneError, match=message):
        load_mmlu(str(path))


def test_missing_path_and_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(FedTuneError, match="no such file or folder"):
        load_mmlu(str(tmp_path / "nope"))
    with pytest.raises(FedTuneError, match=r"no <subject>_test\.csv"):
        load_mmlu(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FedTuneError, match="HF_HUB_OFFLINE is set: pass --mmlu PATH"):
        load_mmlu(None)
