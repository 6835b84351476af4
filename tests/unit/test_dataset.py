import json

import pytest
from datasets import Dataset

from fedtune.dataset import alpaca_to_conversation, load_node_dataset, to_conversations
from fedtune.errors import FedTuneError


def test_alpaca_rows_become_chat_prompt_and_completion():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert alpaca_to_conversation(row) == {
        "prompt": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    no_input = alpaca_to_conversation({"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert no_input["prompt"][0]["content"] == "Say hi."


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "", "output": "x"},
        {"instruction": "x", "output": "  "},
        {"instruction": "x"},
        {"instruction": 3, "output": "x"},
        {"instruction": "x", "input": ["list"], "output": "y"},
    ],
)
def test_malformed_rows_are_refused(row):
    assert alpaca_to_conversation(row) is None


def test_malformed_rows_are_skipped_and_counted():
    raw = Dataset.from_list(
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "", "input": "", "output": "b"}]
    )
    rows, skipped = to_conversations(raw)
    assert len(rows) == 1 and skipped == 1
    with pytest.raises(FedTuneError, match="no usable training rows"):
        to_conversations(Dataset.from_list([{"instruction": "", "input": "", "output": ""}]))


def test_partitions_are_disjoint_and_cover_the_data(demo_data_file):
    total = len(demo_data_file.read_text().splitlines())
    parts = [
        load_node_dataset(str(demo_data_file), {"partition-id": i, "num-partitions": 3}, 20)[0]
        for i in range(3)
    ]
    assert sum(len(p) for p in parts) == total
    prompts = [{json.dumps(r) for r in p} for p in parts]
    # IID partitions are index-disjoint; identical generated rows may repeat across them, so compare sizes
    assert all(abs(len(p) - total / 3) <= 1 for p in parts)
    assert prompts[0] != prompts[1]


def test_a_node_can_train_on_its_own_file(tmp_path):
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n")
    rows, skipped = load_node_dataset("ignored/dataset", {"data-path": str(own)}, 20)
    assert len(rows) == 1 and skipped == 0


def test_missing_data_and_partition_errors_are_one_line(tmp_path):
    with pytest.raises(FedTuneError, match="data path not found"):
        load_node_dataset("x", {"data-path": str(tmp_path / "nope.jsonl")}, 20)
    with pytest.raises(FedTuneError, match=r"partition-id 5 is outside 0\.\.1"):
        load_node_dataset("embedded/demo-alpaca", {"partition-id": 5, "num-partitions": 2}, 20)
    with pytest.raises(FedTuneError, match="lacks partition-id"):
        load_node_dataset("embedded/demo-alpaca", {}, 20)


def test_trl_masks_the_prompt_out_of_the_loss(tiny_model_dir, tmp_path):
    """Only completion tokens carry loss: the masked tokens decode to the prompt's chat turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from clientapp.trainer import sft_config
    from fedtune.config import TrainSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows, _ = to_conversations(
        Dataset.from_list([{"instruction": "Capital of Peru?", "input": "", "output": "Lima is."}])
    )
    args = sft_config(TrainSettings(max_steps=1, optim="adamw_torch"), 1e-3, "cpu", False, str(tmp_path))
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
    masked = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
    assert trained.startswith("Lima is.") and "Capital of Peru?" not in trained
    assert "Capital of Peru?" in masked
