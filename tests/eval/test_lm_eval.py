"""Cross-check with a real external harness: lm-eval 0.4 (HFLM, `peft=ADAPTER`, a local task YAML with
`dataset_path: json`, offline) gives the same accuracy, question by question, as `fedtune eval`.

Both unquantised float32 here: lm-eval 0.4.13 has no nf4 load option that transformers 5 accepts, and
bitsandbytes' CPU kernels make nf4 logits depend slightly on batch padding (see test_batching)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedtune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed"),
]

TASK = "fedtune_mmlu_fixture"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The following are multiple choice questions (with answers) about \
{{{{subject.replace('_', ' ')}}}}.\\n\\n{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\
C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_gives_the_same_accuracy(
    smollm2_dir: Path, adapter_dir: Path, mmlu_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=mmlu_jsonl))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(smollm2_dir),
            "peft": str(adapter_dir),
            "dtype": "float32",
            "device": "cpu",
            "trust_remote_code": False,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=8,
        log_samples=True,
    )
    theirs = results["results"][TASK]["acc,none"]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    their_hits = [int(s["acc"]) for s in samples]

    out = tmp_path / "ours"
    assert (
        main(
            [
                "eval",
                "--protocol",
                "lm-eval",
                "--adapter",
                str(adapter_dir),
                "--base-from-adapter",
                "--mmlu",
                str(mmlu_jsonl),
                "--quantization",
                "0",
                "--dtype",
                "float32",
                "--batch-size",
                "8",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    payload = json.loads((out / "mmlu_results.json").read_text())
    adapter = next(m for m in payload["methods"] if m["name"] != "base")
    ours = adapter["overall"]["accuracy"]
    # our predictions are in subject order; the JSONL fixture is in subject order too
    rows = [json.loads(line) for line in mmlu_jsonl.read_text().splitlines()]
    preds = [json.loads(line) for line in (out / "predictions-adapter.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in preds] == [r["answer"] for r in rows]
    our_hits = [int(p["prediction"] == p["answer"]) for p in preds]
    print(f"lm-eval acc {theirs:.4f}  fedtune eval acc {ours:.4f}  ({len(rows)} questions)")
    assert our_hits == their_hits
    assert ours == pytest.approx(theirs, abs=1e-12)
    # and lm-eval's log-likelihoods pick the same letters as our logits
    their_letters = [max(range(4), key=lambda i, s=s: s["filtered_resps"][i][0]) for s in samples]
    assert their_letters == [p["prediction"] for p in preds]
