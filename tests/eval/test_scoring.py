"""`fedtune eval --protocol lm-eval` on the embedded SmolLM2 (4-bit fp4, as in training) + a perturbed adapter: its accuracies equal a
count made here, one question at a time, from the model's own next-token logits.

Batch size 1 here: bitsandbytes' CPU 4-bit kernels give slightly different logits (about 0.1) for a row
depending on the padding around it, so only unbatched scoring can equal the unbatched count exactly;
test_batching checks that left padding itself changes nothing (unquantised) and little (nf4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.eval.categories import SUBJECT_CATEGORY

from .conftest import LETTERS, read_fixture

LIMIT = 1  # first question of every subject: 14 questions, all four categories


@pytest.fixture(scope="session")
def eval_run(run_dir: Path, mmlu_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval-out")
    code = main(
        [
            "eval",
            "--protocol",
            "lm-eval",
            "--adapter",
            str(run_dir / "adapter"),
            "--base-from-adapter",
            "--mmlu",
            str(mmlu_dir),
            "--limit",
            str(LIMIT),
            "--batch-size",
            "1",
            "--dtype",
            "float32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    payload = json.loads((out / "mmlu_results.json").read_text())
    payload["predictions"] = {
        slug: [json.loads(line) for line in (out / f"predictions-{slug}.jsonl").read_text().splitlines()]
        for slug in ("base", "adapter")
    }
    payload["table_md"] = (out / "mmlu_table.md").read_text()
    return payload


def _prompt(row: dict) -> str:
    """lm-eval's MMLU prompt, written out here again."""
    subject = row["subject"].replace("_", " ")
    a, b, c, d = row["choices"]
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{row['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    )


def _independent_predictions(
    smollm2_dir: Path, adapter: Path, rows: list[dict]
) -> dict[str, list[list[float]]]:
    """Unbatched, unpadded forward passes of the same 4-bit (fp4) model; logits of ' A'..' D' at the last token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    letter_ids = [tokenizer.encode(f" {letter}", add_special_tokens=False)[0] for letter in LETTERS]
    out: dict[str, list[list[float]]] = {"base": [], "adapter": []}
    with torch.inference_mode():
        for row in rows:
            ids = tokenizer(_prompt(row), return_tensors="pt")
            with model.disable_adapter():
                out["base"].append(model(**ids).logits[0, -1, letter_ids].tolist())
            out["adapter"].append(model(**ids).logits[0, -1, letter_ids].tolist())
    return out


def test_accuracy_equals_independent_count(eval_run: dict, smollm2_dir: Path, run_dir: Path, mmlu_dir: Path):
    rows = read_fixture(mmlu_dir, limit=LIMIT)
    assert eval_run["num_questions"] == len(rows) == 14
    logits = _independent_predictions(smollm2_dir, run_dir / "adapter", rows)
    methods = {m["name"]: m for m in eval_run["methods"]}
    assert list(methods) == ["base", "fedtune (adapter)"]
    for slug, name in (("base", "base"), ("adapter", "fedtune (adapter)")):
        predicted = [max(range(4), key=lambda i, v=v: v[i]) for v in logits[slug]]
        # the tool's batched, left-padded logits are the unpadded ones
        theirs = eval_run["predictions"][slug]
        assert [p["prompt"] for p in theirs] == [_prompt(r) for r in rows]
        for mine, their in zip(logits[slug], theirs, strict=True):
            assert their["logits"] == pytest.approx(mine, abs=1e-3)
        assert [p["prediction"] for p in theirs] == predicted
        # counts per category and the leaderboard average
        counts: dict[str, list[int]] = {}
        for row, p in zip(rows, predicted, strict=True):
            tally = counts.setdefault(SUBJECT_CATEGORY[row["subject"]], [0, 0])
            tally[0] += int(p == row["answer"])
            tally[1] += 1
        for category, (correct, total) in counts.items():
            assert methods[name]["categories"][category] == {
                "correct": correct,
                "total": total,
                "accuracy": correct / total,
            }
        expected_avg = sum(c / t for cat, (c, t) in counts.items() if cat != "Other") / 3
        assert methods[name]["average"] == pytest.approx(expected_avg)
    # the perturbed adapter does change the model, and some answers
    gaps = [
        abs(a - b)
        for ra, rb in zip(logits["base"], logits["adapter"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    assert max(gaps) > 0.1
    base_preds = [p["prediction"] for p in eval_run["predictions"]["base"]]
    assert base_preds != [p["prediction"] for p in eval_run["predictions"]["adapter"]]
