import numpy as np
import torch

from fedtune.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from fedtune.config import ModelSettings
from fedtune.model import adapter_state, initial_adapter_state


def test_saved_checkpoint_loads_with_peft_and_matches(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = ModelSettings(name=str(tiny_model_dir), trust_remote_code=False, quantization=0)
    state = initial_adapter_state(settings, seed=3)
    # make B non-zero so the adapter changes the model's output
    state = type(state)((k, v + 0.01 * (i + 1)) for i, (k, v) in enumerate(state.items()))
    target = save_adapter(state, settings, tmp_path / "adapter", {"round": 2})
    assert (target / ADAPTER_CONFIG).is_file() and (target / ADAPTER_WEIGHTS).is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, target)
    loaded = adapter_state(tuned)
    assert loaded.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(loaded[key].numpy(), state[key].numpy())

    ids = torch.tensor([[1, 2, 3, 4]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(tuned(ids).logits, plain(ids).logits)


def test_rewriting_a_checkpoint_is_atomic(tiny_model_dir, tmp_path):
    settings = ModelSettings(name=str(tiny_model_dir), trust_remote_code=False, quantization=0)
    state = initial_adapter_state(settings, seed=3)
    target = save_adapter(state, settings, tmp_path / "latest")
    save_adapter(state, settings, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no staging folders left behind


def test_initial_adapter_is_peft_init_and_reproducible(tiny_model_dir):
    settings = ModelSettings(name=str(tiny_model_dir), trust_remote_code=False, quantization=0)
    first, second = initial_adapter_state(settings, 7), initial_adapter_state(settings, 7)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(float(v.abs().sum()) == 0 for k, v in first.items() if "lora_B" in k)
    assert all(float(v.abs().sum()) > 0 for k, v in first.items() if "lora_A" in k)
