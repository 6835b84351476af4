"""Shared fixtures. Every process the tests start inherits an environment that never calls outside:
flwr telemetry and update checks off, Hugging Face hubs offline."""

from __future__ import annotations

import os

from fedtune.runtime_env import FLWR_QUIET_ENV  # imports no flwr: safe before the variables are set

os.environ.update(
    {
        **FLWR_QUIET_ENV,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
)

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def build_tiny_model(target: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (~3 M params).

    Large init so its loss falls visibly within a few dozen steps."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed

    from fedtune.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_data_file() -> Path:
    from fedtune.embedded import demo_dataset_file

    return demo_dataset_file()


def tiny_run_config(model_dir: Path, **overrides: object) -> dict[str, object]:
    """Run-config overrides for fast end-to-end runs on the tiny model and the demo data."""
    config: dict[str, object] = {
        "num-server-rounds": 3,
        "strategy.fraction-train": 1.0,
        "model.name": str(model_dir),
        "model.trust-remote-code": False,
        "train.seq-length": 64,
        "train.max-steps": 8,
        "train.learning-rate-max": 3e-3,
        "train.learning-rate-min": 1e-3,
        "train.save-every-round": 2,
        "train.optim": "paged_adamw_8bit",
        "static.dataset.name": "embedded/demo-alpaca",
        "static.num-partitions": 2,
    }
    config.update(overrides)
    return config


def per_message_bytes(run_config: dict[str, object]) -> int:
    """Leaderboard bytes of one adapter message (`count_bytes` of the initial fp32 adapter) for a run config."""
    from fedtune.config import FedTuneConfig
    from fedtune.model import initial_adapter_state, state_to_arrays

    cfg = FedTuneConfig.from_run_config(run_config)
    return state_to_arrays(initial_adapter_state(cfg.model, cfg.train.seed), "float32").count_bytes()


def sent_message_bytes(run_config: dict[str, object]) -> int:
    """Bytes one adapter message actually carries (`count_bytes` of the record on the wire): the packed
    form (a few buffers + manifest) unless the run config asks for comm.transport = "per-tensor"."""
    from fedtune import packing
    from fedtune.config import FedTuneConfig
    from fedtune.model import initial_adapter_state

    cfg = FedTuneConfig.from_run_config(run_config)
    wire = packing.encode(initial_adapter_state(cfg.model, cfg.train.seed), cfg.model.transport_dtype)
    return packing.to_record(wire, cfg.comm.transport).count_bytes()

