"""`fedtune eval --protocol flowertune` against the official FlowerTune General-NLP evaluator.

`golden/flowertune-eval-smollm2/` holds what the leaderboard's own code (flwrlabs/flower
`benchmarks/flowertune-llm/evaluation/general-nlp/`, unmodified) produced on the embedded SmolLM2 and the
30-question sample (its README says how). The port must reproduce every generated `output`, every
generations file and every accuracy file byte for byte. The model run happens once per module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.eval.categories import CATEGORIES
from fedtune.eval.data import LAYOUT_LUKAEMON, Question, load_mmlu_with_layout
from fedtune.eval.flowertune import (
    CATEGORY_SLUG,
    Generated,
    build_prompt,
    category_questions,
    format_answer,
    format_example,
    generations_json,
    is_correct,
    wrap,
)
from fedtune.eval.sample import EMBEDDED_MMLU

GOLDEN = Path(__file__).parent / "golden" / "flowertune-eval-smollm2"
SLUGS = [CATEGORY_SLUG[c] for c in CATEGORIES]


def golden_rows(slug: str) -> list[dict]:
    return json.loads((GOLDEN / f"generation_mmlu_{slug}_base.jsonl").read_text(encoding="utf-8"))


# ---- the recipe, piece by piece (no model) ------------------------------------------------------


def test_prompts_and_order_match_the_evaluator():
    questions, _, layout = load_mmlu_with_layout(EMBEDDED_MMLU)
    assert layout == LAYOUT_LUKAEMON
    for category, slug in zip(CATEGORIES, SLUGS, strict=True):
        ours = category_questions(questions, category)
        rows = golden_rows(slug)
        assert [build_prompt(q) for q in ours] == [r["prompt"] for r in rows]
        assert ["ABCD"[q.answer] for q in ours] == [r["gold"] for r in rows]
        assert [q.subject for q in ours] == [r["subset"] for r in rows]


def test_question_mark_rule_and_wrapper():
    assert format_example("Pick one", ["w", "x", "y", "z"]).startswith(
        "Question: Pick one?\n\nOptions:\nA. w\n"
    )
    assert format_example("Why?", "abcd").startswith("Question: Why?\n")
    assert format_example("Complete it.", "abcd").startswith("Question: Complete it.\n")
    assert format_example("A list:", "abcd").startswith("Question: A list:?\n")
    q = Question("anatomy", "Which bone?", ("a", "b", "c", "d"), 0)
    assert wrap(build_prompt(q)) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: Which bone?\n\n"
        "Options:\nA. a\nB. b\nC. c\nD. d\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"
    )


@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("B", "B", True),
        (" b) because", "B", True),
        ("**C**", "C", True),
        ("The answer is C", "C", False),  # first character: "t"
        ("", "A", False),
        ("D", "A", False),
        ("yes", "A", False),
        ("\n## C\nmore", "C", True),  # what follows the first "\n##", up to the next line break
        ("A\n## B", "A", False),  # … even when the text before it was right
        ("é a", "A", True),  # a non-ASCII letter becomes a space like any non-alphanumeric
        ("(a)", "B", False),
    ],
)
def test_answer_cleaning(output: str, gold: str, correct: bool):
    assert is_correct(output, gold) is correct


def test_format_answer_returns_whole_output_when_not_a_choice():
    assert format_answer("the", "a") == ("the", "a")
    assert format_answer("e", "a") == ("e", "a")  # "e" is a valid (never right) MMLU prediction
    assert format_answer("no", "a") == ("no", "a")  # mcq keeps one character: "n", not a choice


def test_generations_file_is_what_pandas_writes():
    pd = pytest.importorskip("pandas")
    q = Question("anatomy", 'Path a/b, ünïcode "quoted"?', ("1/2", "x", "y", "z"), 1)
    generated = [Generated(q, build_prompt(q), "B", "The"), Generated(q, build_prompt(q) + "x", "B", "")]
    frame = pd.DataFrame([g.record() for g in generated])
    assert generations_json(generated) == frame.to_json(orient="records")


# ---- conformance: the real model, once ----------------------------------------------------------


@pytest.fixture(scope="module")
def official_run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fedtune eval` with the evaluator's recipe (--quantization 4 --batch-size 16) on the base model."""
    out = tmp_path_factory.mktemp("flowertune-eval")
    argv = ["eval", "--base-model", str(smollm2_dir), "--mmlu", EMBEDDED_MMLU, "--out", str(out)]
    assert main([*argv, "--quantization", "4", "--batch-size", "16", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("slug", SLUGS)
def test_every_generated_output_matches(official_run: Path, slug: str):
    theirs = golden_rows(slug)
    ours = json.loads((official_run / f"generation_mmlu_{slug}_base.jsonl").read_text(encoding="utf-8"))
    assert [r["output"] for r in ours] == [r["output"] for r in theirs]
    assert ours == theirs
    # the file itself, byte for byte
    golden = (GOLDEN / f"generation_mmlu_{slug}_base.jsonl").read_bytes()
    assert (official_run / f"generation_mmlu_{slug}_base.jsonl").read_bytes() == golden


@pytest.mark.parametrize("slug", SLUGS)
def test_every_accuracy_file_matches(official_run: Path, slug: str):
    name = f"acc_mmlu_{slug}_base.txt"
    assert (official_run / name).read_bytes() == (GOLDEN / name).read_bytes()


def test_results_and_table(official_run: Path):
    payload = json.loads((official_run / "mmlu_results.json").read_text())
    assert payload["protocol"] == "flowertune" and payload["leaderboard"] is True
    assert payload["mmlu_layout"] == LAYOUT_LUKAEMON
    assert payload["quantization"] == 4 and payload["dtype"] == "float32"
    (base,) = payload["methods"]
    # the table's category accuracies are the accuracy files' numbers
    for category, slug in zip(CATEGORIES, SLUGS, strict=True):
        text = (official_run / f"acc_mmlu_{slug}_base.txt").read_text()
        assert text == f"Accuracy: {base['categories'][category]['accuracy']}. "
    table = (official_run / "mmlu_table.md").read_text()
    assert table.startswith("**MMLU · FlowerTune protocol (the leaderboard's evaluator)**\n")
    assert "| base | 0.00 | 0.00 | 0.00 | 0.00 |" in table
    assert "**Communication budget: n/a**" in table


def test_quantization_other_than_4_or_8_is_refused(capsys: pytest.CaptureFixture[str]):
    argv = [
        "eval",
        "--base-model",
        "embedded/smollm2-135m-instruct",
        "--mmlu",
        EMBEDDED_MMLU,
        "--quantization",
        "0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "loads the base model in 4 or 8 bits only" in capsys.readouterr().err
