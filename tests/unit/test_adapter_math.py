"""fedtune/adapter_math.py against the tensor-by-tensor arithmetic it replaces, over adapters cut into many
slices on several threads: the average and the bf16 rounding bit for bit, the distance and norm to float64
rounding, a NaN found wherever it sits; arrays not in one buffer (or in another order) take the per-tensor path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune import adapter_math, packing

SHAPES = [(16, 96), (96, 16), (16, 96), (24, 16), (7, 5), (16, 96), (96, 16)]


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_math, "SLICE_VALUES", 1000)  # ~10 slices per adapter, side by side
    monkeypatch.setattr(adapter_math, "threads", lambda: 4)


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    values = np.random.default_rng(seed).standard_normal(sum(math.prod(s) for s in SHAPES)).astype(np.float32)
    return packing.split_buffer([(f"t{i}", s) for i, s in enumerate(SHAPES)], values * np.float32(scale))


def separate(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: values.copy() for name, values in state.items()}  # no longer one buffer


def reference_average(updates: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict:
    total = sum(weights.values())
    out: dict[str, np.ndarray] = {}
    for position, (node, update) in enumerate(updates.items()):
        share = np.float32(weights[node] / total)
        for name, values in update.items():
            if position == 0:
                out[name] = np.multiply(values, share, dtype=np.float32)
            else:
                out[name] += values * share
    return out


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)


def test_the_average_is_bit_exact_and_one_buffer():
    updates, weights = {1: adapter(1), 2: adapter(2), 3: separate(adapter(3))}, {1: 2600.0, 2: 1300.0, 3: 7.0}
    average = adapter_math.weighted_average(updates, weights)
    assert average is not None and same_bits(average, reference_average(updates, weights))
    assert adapter_math.flat(average) is not None  # what pack sends without copying
    alone = adapter_math.weighted_average({1: updates[1]}, {1: 5.0})
    assert alone is not None and same_bits(alone, updates[1])  # all the weight: the reply itself
    assert adapter_math.weighted_average({}, {}) is None


def test_distance_and_norm_match_float64_per_tensor():
    update, reference = adapter(4), adapter(5)
    expected = math.sqrt(sum(float(np.square(update[k].astype(np.float64) - reference[k]).sum()) for k in update))
    assert adapter_math.distance(update, reference) == pytest.approx(expected, rel=1e-12)
    assert adapter_math.distance(separate(update), reference) == pytest.approx(expected, rel=1e-12)
    reordered = dict(reversed(list(update.items())))  # another layout: per tensor, by name
    assert adapter_math.distance(reordered, reference) == pytest.approx(expected, rel=1e-12)
    huge = adapter(6, scale=1e30)  # squares overflow float32, not float64
    assert math.isfinite(adapter_math.l2_norm(huge)) and adapter_math.l2_norm(huge) > 1e30
    assert adapter_math.l2_norm(list(separate(huge).values())) == pytest.approx(adapter_math.l2_norm(huge))


@pytest.mark.parametrize("where", [0, 1000, -1])
def test_a_nan_or_inf_anywhere_is_found(where):
    state = adapter(7)
    assert adapter_math.all_finite(state)
    whole = adapter_math.flat(state)
    assert whole is not None
    whole[where] = np.nan
    assert not adapter_math.all_finite(state) and not adapter_math.all_finite(separate(state))
    whole[where] = np.inf
    assert not adapter_math.all_finite(state)


def test_bf16_rounding_is_packings_bit_for_bit():
    state = adapter(8)
    whole = adapter_math.flat(state)
    assert whole is not None
    whole[5], whole[2000], whole[3000] = np.nan, np.inf, np.float32(1.0000001)
    expected = packing.encode(separate(state), "bfloat16")
    encoded = adapter_math.encode(state, "bfloat16")
    assert list(encoded) == list(expected)
    assert all(np.array_equal(encoded[k], expected[k]) and encoded[k].dtype == expected[k].dtype for k in expected)
    assert adapter_math.encode(state, "float32")["t0"] is state["t0"]  # float32: the same arrays


def test_owned_float32_copies_into_one_buffer():
    received = packing.decode(packing.unpack(packing.pack(adapter(9))).arrays)
    owned = adapter_math.owned_float32(received)
    whole = adapter_math.flat(owned)
    assert whole is not None and whole.dtype == np.float32
    assert same_bits(owned, received) and not np.shares_memory(whole, received["t0"])
