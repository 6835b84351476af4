"""bf16 adapter transport: round trip within bf16 precision, and the budget halves exactly as computed."""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedtune.accounting import MB
from fedtune.model import BF16_WIRE_DTYPE, arrays_to_state, state_to_arrays

# InternLM3-8B: LoRA r16 on q, k, v, o of 48 layers (hidden 4096, 2 KV heads × 128)
SHAPES = {
    "q": ((16, 4096), (4096, 16)),
    "k": ((16, 4096), (256, 16)),
    "v": ((16, 4096), (256, 16)),
    "o": ((16, 4096), (4096, 16)),
}


def internlm3_adapter(layers: int = 48) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer in range(layers):
        for proj, (a, b) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj"
            state[f"{prefix}.lora_A.weight"] = torch.randn(a, generator=gen) * 0.02
            state[f"{prefix}.lora_B.weight"] = torch.randn(b, generator=gen) * 0.02
    return state


def npy_header_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue()) - array.nbytes


def test_bf16_round_trip_within_bf16_precision():
    state = internlm3_adapter(layers=2)
    state["tiny"] = torch.tensor([1e-30, -3.5e-5, 1.0, 65504.0, -(2.0**-126)])
    back = arrays_to_state(state_to_arrays(state, "bfloat16"))
    assert list(back) == list(state)
    for key, original in state.items():
        assert back[key].dtype == torch.float32
        # round-to-nearest to 8 significant bits: relative error at most 2^-9
        np.testing.assert_allclose(back[key].numpy(), original.numpy(), rtol=2.0**-8, atol=0)
        # and it is exactly what torch's bf16 rounding gives
        assert torch.equal(back[key], original.to(torch.bfloat16).float())


def test_bf16_wire_arrays_are_uint16_bit_patterns():
    record = state_to_arrays(OrderedDict(x=torch.tensor([1.0, -2.0])), "bfloat16")
    assert record["x"].numpy().dtype == BF16_WIRE_DTYPE
    assert record["x"].numpy().tolist() == [0x3F80, 0xC000]  # bf16 bit patterns of 1.0 and -2.0


def test_fp32_transport_is_exact():
    state = internlm3_adapter(layers=1)
    back = arrays_to_state(state_to_arrays(state, "float32"))
    for key in state:
        assert torch.equal(back[key], state[key])


def test_bf16_budget_halves_exactly_as_computed():
    """count_bytes = Σ (npy header + data) + Σ key bytes. bf16 halves the data; headers ('<f4' and '<u2'
    descriptors have the same length, same shapes) and keys stay. So, exactly:
        bytes_bf16 = bytes_fp32 − 2·numel   and   2·bytes_bf16 = bytes_fp32 + Σ (header + key)."""
    state = internlm3_adapter()
    fp32, bf16 = state_to_arrays(state, "float32"), state_to_arrays(state, "bfloat16")
    numel = sum(t.numel() for t in state.values())
    assert numel == 19_267_584
    fixed = sum(npy_header_bytes(t.numpy()) + len(k) for k, t in state.items())
    assert sum(npy_header_bytes(a.numpy()) for a in bf16.values()) + sum(map(len, bf16)) == fixed
    assert fp32.count_bytes() == 4 * numel + fixed
    assert bf16.count_bytes() == 2 * numel + fixed
    assert bf16.count_bytes() == fp32.count_bytes() - 2 * numel
    assert 2 * bf16.count_bytes() == fp32.count_bytes() + fixed

    # The reference run: 10 rounds × 2 nodes × (down + up) messages
    messages = 10 * 2 * 2
    assert round(messages * fp32.count_bytes() / MB, 2) == pytest.approx(2942.79, abs=0.01)
    bf16_mb = messages * bf16.count_bytes() / MB
    assert bf16_mb == pytest.approx((2942.79 + messages * fixed / MB) / 2, abs=0.01)
    assert 1471 < bf16_mb < 1473
