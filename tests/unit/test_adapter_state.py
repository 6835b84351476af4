"""fedtune.model's adapter in and out of a real (tiny, 4-bit) peft model: the cached key -> parameter map gives
what peft's own state-dict functions give, follows the live parameters, and refuses what peft would refuse."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from fedtune.config import FedTuneConfig
    from fedtune.model import load_trainable_model

    cfg = FedTuneConfig.from_run_config(tiny_run_config(tiny_model_dir))
    return load_trainable_model(cfg.model, "cpu")


def random_state(model, seed: int) -> OrderedDict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (key, torch.randn(tensor.shape, generator=gen)) for key, tensor in get_peft_model_state_dict(model).items()
    )


def test_the_map_names_every_adapter_tensor_in_peft_order(model):
    from peft import get_peft_model_state_dict

    from fedtune.model import adapter_parameters

    params = adapter_parameters(model)
    assert params is not None
    peft_state = get_peft_model_state_dict(model)
    assert list(params) == list(peft_state)
    for key, tensor in peft_state.items():
        assert params[key].data_ptr() == tensor.data_ptr()
    assert adapter_parameters(model) is params  # found once


def test_load_and_read_agree_with_peft(model):
    from peft import get_peft_model_state_dict

    from fedtune.model import adapter_state, load_adapter_state

    state = random_state(model, 1)
    load_adapter_state(model, state)
    for key, tensor in get_peft_model_state_dict(model).items():  # peft reads back what went in
        assert torch.equal(tensor.float(), state[key].to(tensor.dtype).float()), key
    snapshot = adapter_state(model)
    assert list(snapshot) == list(state)
    for key, tensor in snapshot.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[key]), key


def test_the_map_follows_replaced_parameter_data(model):
    """trl casts LoRA weights to bf16, and restore_adapter_dtype puts them back, by assigning `param.data`:
    the Parameter objects stay, so the map reads the current data."""
    from fedtune.model import adapter_parameters, adapter_state, load_adapter_state

    load_adapter_state(model, random_state(model, 2))
    params = adapter_parameters(model)
    assert params is not None
    key, param = next(iter(params.items()))
    saved = param.data
    param.data = torch.full_like(saved, 0.5).to(torch.bfloat16)
    try:
        assert torch.equal(adapter_state(model)[key], torch.full(saved.shape, 0.5))
    finally:
        param.data = saved


def test_a_wrong_shape_is_refused_not_broadcast(model):
    """copy_ would broadcast a (1, n) row into every row of an (r, n) LoRA A; peft's load refuses the
    mismatch, and so must we, before anything is written."""
    from fedtune.model import adapter_state, load_adapter_state

    state = random_state(model, 3)
    load_adapter_state(model, state)
    before = adapter_state(model)
    bad = OrderedDict(state)
    key = next(k for k, v in bad.items() if v.dim() == 2 and v.shape[0] > 1)
    bad[key] = bad[key][:1]
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, bad)
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    missing = OrderedDict(list(state.items())[1:])
    with pytest.raises(ValueError, match="adapter keys differ"):
        load_adapter_state(model, missing)


def test_a_meta_device_model_gets_no_map(tiny_model_dir):
    """On the meta device every tensor's storage pointer is 0: no map (peft's functions are used)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedtune.model import adapter_parameters

    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert adapter_parameters(peft_model) is None
