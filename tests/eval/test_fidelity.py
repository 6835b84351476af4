"""docs/fidelity.md against the real configuration, and the reference defaults doing what the table says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fidelity.md"
MATCHES = ("same", "seed", "addition", "deviation")


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def configured() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return flatten(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def table_rows() -> dict[str, tuple[object, str, str]]:
    """key -> (default parsed as TOML, template source, match) from the 'Run config defaults' table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Run config defaults", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        key = cells[0].strip("`")
        value = tomllib.loads(f"v = {cells[1].strip('`')}")["v"]
        assert key not in rows, f"docs/fidelity.md: {key} has two rows"
        rows[key] = (value, cells[3], cells[4])
    return rows


def test_every_configured_default_has_a_row_with_its_value():
    rows, config = table_rows(), configured()
    missing = sorted(set(config) - set(rows))
    assert not missing, f"add a row to docs/fidelity.md for {missing}"
    stale = sorted(set(rows) - set(config))
    assert not stale, f"docs/fidelity.md lists keys pyproject.toml does not have: {stale}"
    wrong = {
        k: (rows[k][0], config[k])
        for k in config
        if rows[k][0] != config[k] or type(rows[k][0]) is not type(config[k])
    }
    assert not wrong, f"docs/fidelity.md defaults differ from pyproject.toml (doc, config): {wrong}"


def test_every_row_says_how_it_matches_and_where_from():
    for key, (_, source, match) in table_rows().items():
        assert match.split(":")[0].split(" ")[0] in MATCHES, f"{key}: match {match!r}"
        if match.startswith(("deviation", "addition")):
            assert ":" in match or "(" in match, f"{key}: a {match.split()[0]} needs its reason"
        if match.startswith(("same", "seed")) and source == "—":
            pytest.fail(f"{key}: a template value needs its source (file and line)")
        assert source == "—" or re.search(r"\.(toml|py) L\d+", source), f"{key}: source {source!r}"


def test_the_config_parses_to_the_template_load_settings():
    from fedtune.config import FedTuneConfig

    cfg = FedTuneConfig.from_run_config(configured())
    assert (cfg.model.quant_type, cfg.model.compute_dtype, cfg.model.lora.dropout) == (
        "fp4",
        "float32",
        0.075,
    )
    assert cfg.train.prompt_format == "flowertune"
    assert cfg.model.revision == ""
    # the template's cosine_annealing(current_round, total_round, max, min)
    import math

    for rnd in (1, 5, 10):
        expected = 1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * rnd / 10))
        assert cfg.learning_rate(rnd) == pytest.approx(expected, rel=1e-12)


def test_fast_profile_chooses_nf4_bf16():
    with open(ROOT / "profiles" / "fast.toml", "rb") as handle:
        fast = tomllib.load(handle)
    assert (fast["model"]["quant-type"], fast["model"]["compute-dtype"]) == ("nf4", "bfloat16")
    # bf16 on the wire only because LoRA trains in bf16 here (lossless: tests/perf/test_padding_free.py)
    assert fast["model"]["transport-dtype"] == fast["model"]["compute-dtype"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.quant-type", "int4", "one of ('fp4', 'nf4')"),
        ("model.compute-dtype", "fp8", "one of ('float32', 'bfloat16', 'float16')"),
        ("train.prompt-format", "alpaca", "one of ('flowertune', 'chat')"),
        ("model.revision", 3, "expected a string"),
    ],
)
def test_new_keys_refuse_bad_values(key: str, value: object, message: str):
    from fedtune.config import parse_run_config
    from fedtune.errors import FedTuneError

    with pytest.raises(FedTuneError, match=re.escape(message)):
        parse_run_config({key: value})


# ---- training: the template's prompt, mask and load settings, for real --------------------------


def test_flowertune_format_masks_like_the_template(smollm2_dir: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from clientapp.flowertune_format import alpaca_text, response_tag_ids, tokenize

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def chat(user: str, assistant: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": assistant}],
        }

    rows = [
        chat("Say hi.", "Hi."),
        # the tag inside the response: the template masks up to its last occurrence
        chat("Quote it.", "It says\n### Response: ok"),
        # an EOS token in the response is never trained (pad = EOS in the template's collator)
        chat("End.", f"Done{tokenizer.eos_token}"),
        # truncated before the tag: no trained token, left out
        chat("word " * 600, "never seen"),
    ]
    out, dropped = tokenize(Dataset.from_list(rows), tokenizer, seq_length=128)
    assert dropped == 1 and len(out) == 3
    # plain prompt/completion strings are read the same way
    plain, _ = tokenize(Dataset.from_list([{"prompt": "Say hi.", "completion": "Hi."}]), tokenizer, 128)
    assert plain[0]["input_ids"] == out[0]["input_ids"]
    trained = [
        tokenizer.decode([t for t, m in zip(r["input_ids"], r["completion_mask"], strict=True) if m])
        for r in out
    ]
    assert trained == [" Hi.", " ok", " Done"]
    # the text is the template's, tokenised whole, no EOS appended
    first = out[0]["input_ids"]
    assert first == tokenizer(alpaca_text("Say hi.", "Hi."))["input_ids"]
    assert tokenizer.eos_token_id not in first
    assert alpaca_text("Q", "A") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n### Instruction:\nQ\n### Response: A"
    )
    tag = tokenizer.convert_ids_to_tokens(response_tag_ids(tokenizer))
    assert tag == ["ĠResponse", ":"]  # "\n### Response:" without its first two tokens


def test_reference_round_is_fp4_float32_with_float32_lora(tiny_model_dir: Path, demo_data_file: Path):
    """The reference defaults on a real (tiny) model: bitsandbytes fp4 layers computing in float32, one
    trl round without autocast, and LoRA weights still float32 afterwards (trl 1.16 casts them to bf16)."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from clientapp.trainer import model_compute_dtype, sft_config, train_one_round
    from fedtune.config import FedTuneConfig
    from fedtune.dataset import load_node_dataset
    from fedtune.model import load_tokenizer, load_trainable_model
    from tests.conftest import tiny_run_config

    cfg = FedTuneConfig.from_run_config(tiny_run_config(tiny_model_dir, **{"train.max-steps": 2}))
    assert (cfg.model.quant_type, cfg.model.compute_dtype) == ("fp4", "float32")
    model = load_trainable_model(cfg.model, "cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and {m.weight.quant_type for m in layers} == {"fp4"}
    assert {m.compute_dtype for m in layers} == {torch.float32}
    assert model_compute_dtype(model) == "float32"
    assert sft_config(cfg.train, 1e-4, "cuda", True, "/tmp/x", compute_dtype="float32").bf16 is False
    tokenizer = load_tokenizer(cfg.model)
    trainset, _ = load_node_dataset(cfg.dataset.name, {"data-path": str(demo_data_file)}, 1)
    outcome = train_one_round(model, tokenizer, trainset.select(range(16)), cfg.train, 3e-3, "cpu", True)
    assert outcome.steps == 2 and outcome.train_loss > 0
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {torch.float32}
