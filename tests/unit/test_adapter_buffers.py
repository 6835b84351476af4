"""The adapter's device-side hop (fedtune.model.adapter_buffer / load_adapter_buffers, used by
clientapp/round.py's adapter_out / adapter_in) against the tensor-by-tensor path it replaces, on a real tiny
4-bit peft model: the same record bytes out, the same weights in, the same refusals."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from fedtune.config import FedTuneConfig
    from fedtune.model import load_trainable_model

    cfg = FedTuneConfig.from_run_config(tiny_run_config(tiny_model_dir))
    return load_trainable_model(cfg.model, "cpu")


def round_config(transport: str, transport_dtype: str, codec: dict | None = None):
    from fedtune.round_config import RoundConfig

    return RoundConfig(
        server_round=1, learning_rate=1e-4, transport_dtype=transport_dtype, transport=transport,
        codec=codec or {}, sent_at=0.0,
    )


def set_random_adapter(model, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """Random adapter values (not bf16-exact in float32, so the cast's rounding is exercised), in `dtype`."""
    from fedtune.model import adapter_parameters

    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model).values():
        param.data = torch.randn(param.shape, generator=gen).to(dtype)


def tensor_by_tensor(model, config) -> dict[str, bytes]:
    from fedtune import packing
    from fedtune.codecs import CodecSpec, ffa
    from fedtune.model import adapter_state

    state = adapter_state(model)
    if CodecSpec.from_config(config.codec).ffa_lora:
        state = ffa.b_only(state)
    record = packing.to_record(packing.encode(state, config.transport_dtype), config.transport)
    return {key: record[key].data for key in record}


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
@pytest.mark.parametrize("transport_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transport", ["packed", "per-tensor"])
def test_adapter_out_gives_the_tensor_by_tensor_bytes(model, transport, transport_dtype, weights):
    from clientapp.round import adapter_out

    set_random_adapter(model, 3, weights)
    config = round_config(transport, transport_dtype)
    record = adapter_out(model, config)
    assert {key: record[key].data for key in record} == tensor_by_tensor(model, config)


def test_adapter_out_under_ffa_lora_leaves_a_out(model):
    from clientapp.round import adapter_out
    from fedtune import packing
    from fedtune.codecs import is_lora_a

    set_random_adapter(model, 4)
    config = round_config("packed", "float32", {"codec-ffa-lora": True})
    record = adapter_out(model, config)
    names = list(packing.unpack(record).arrays)
    assert names and not any(is_lora_a(name) for name in names)
    assert {key: record[key].data for key in record} == tensor_by_tensor(model, config)


def test_the_buffer_is_a_snapshot_not_the_live_weights(model):
    from fedtune.model import adapter_buffer, adapter_parameters

    set_random_adapter(model, 5)
    layout, buffer = adapter_buffer(model, "float32")
    before = buffer.copy()
    for param in adapter_parameters(model).values():
        param.data.add_(1.0)  # the next training step
    assert np.array_equal(buffer, before)
    assert [name for name, _ in layout] == list(adapter_parameters(model))


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
@pytest.mark.parametrize("transport_dtype", ["float32", "bfloat16"])
def test_adapter_in_writes_what_decoding_tensor_by_tensor_writes(model, transport_dtype, weights):
    from clientapp.round import adapter_out
    from fedtune import packing
    from fedtune.model import adapter_parameters, load_adapter_buffers, load_adapter_state

    set_random_adapter(model, 6)
    record = adapter_out(model, round_config("packed", transport_dtype))
    set_random_adapter(model, 7, weights)
    assert load_adapter_buffers(model, packing.unpack(record))
    by_buffer = OrderedDict((k, p.detach().clone()) for k, p in adapter_parameters(model).items())

    set_random_adapter(model, 7, weights)
    values = packing.decode(packing.unpack(record).arrays)
    load_adapter_state(model, OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in values.items()))
    for key, param in adapter_parameters(model).items():
        assert param.dtype == weights
        assert torch.equal(param, by_buffer[key]), key


def test_per_tensor_and_other_dtypes_take_the_tensor_by_tensor_path(model):
    from clientapp.round import adapter_out
    from fedtune import packing
    from fedtune.model import load_adapter_buffers

    set_random_adapter(model, 8)
    per_tensor = adapter_out(model, round_config("per-tensor", "float32"))
    assert not load_adapter_buffers(model, packing.unpack(per_tensor))
    half = packing.unpack(adapter_out(model, round_config("packed", "float32"))).arrays
    float16 = packing.pack({k: v.astype(np.float16) for k, v in half.items()})
    assert not load_adapter_buffers(model, packing.unpack(float16))


def test_a_wrong_shape_or_key_is_refused_before_anything_is_written(model):
    from clientapp.round import adapter_out
    from fedtune import packing
    from fedtune.model import adapter_parameters, load_adapter_buffers

    set_random_adapter(model, 9)
    arrays = dict(packing.unpack(adapter_out(model, round_config("packed", "float32"))).arrays)
    before = {k: p.detach().clone() for k, p in adapter_parameters(model).items()}
    first = next(iter(arrays))
    wrong_shape = dict(arrays, **{first: np.zeros((1, arrays[first].size), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_buffers(model, packing.unpack(packing.pack(wrong_shape)))
    missing = {k: v for k, v in arrays.items() if k != first}
    with pytest.raises(ValueError, match="missing"):
        load_adapter_buffers(model, packing.unpack(packing.pack(missing)))
    for key, param in adapter_parameters(model).items():
        assert torch.equal(param, before[key]), key
