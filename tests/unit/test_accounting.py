"""The communication budget is the FlowerTune leaderboard's figure, computed the leaderboard's way."""

import io

import numpy as np
import pytest

from fedtune.accounting import MB, REFERENCE_BUDGET_MB, to_mb
from fedtune.config import ModelSettings
from fedtune.model import initial_adapter_state, state_to_arrays


def internlm3_8b_shaped_config():
    """InternLM3-8B-Instruct's architecture as a Llama config (the benchmark's shape): no hub needed."""
    from bench.synthetic import INTERNLM3_8B

    return INTERNLM3_8B.llama_config()


def test_count_bytes_is_npy_bytes_plus_key_bytes():
    from transformers import LlamaConfig

    state = initial_adapter_state(
        ModelSettings(name="unused", trust_remote_code=False),
        seed=0,
        model_config=LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    )
    record = state_to_arrays(state, "float32")
    expected = 0
    for key, tensor in state.items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        expected += len(buffer.getvalue()) + len(key)
    assert record.count_bytes() == expected


def test_reference_configuration_budget_is_the_reference_runs_2942_79_mb():
    """InternLM3-8B, LoRA r16 on q/k/v/o, fp32 arrays: 2 nodes × 2 directions × 10 rounds."""
    settings = ModelSettings(name="unused", trust_remote_code=False)
    state = initial_adapter_state(settings, seed=0, model_config=internlm3_8b_shaped_config())
    assert sum(t.numel() for t in state.values()) == 19_267_584
    per_message = state_to_arrays(state, "float32").count_bytes()
    budget_mb = to_mb(per_message * 2 * 2 * 10)
    assert round(budget_mb, 2) == REFERENCE_BUDGET_MB == 2942.79
    # bf16 transport: array data halves exactly, npy headers and key names do not
    bf16_message = state_to_arrays(state, "bfloat16").count_bytes()
    assert per_message - bf16_message == 19_267_584 * 2
    assert to_mb(bf16_message * 40) == pytest.approx(budget_mb - to_mb(19_267_584 * 2 * 40))
    assert round(to_mb(bf16_message * 40), 2) == 1472.79  # about half of the reference budget
    assert MB == 1024**2
