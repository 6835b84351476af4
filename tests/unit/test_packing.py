"""Packed transport (fedtune/packing.py): bit-exact both ways, a few arrays instead of one per tensor, the
leaderboard's bytes from shapes alone, and a manifest that cannot be bent into reading something else."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedtune import packing
from fedtune.accounting import REFERENCE_BUDGET_MB, to_mb
from fedtune.packing import MANIFEST_KEY, PREFIX, PackingError

ODD_SHAPES = [(7,), (3, 5, 1), (0, 4), (), (1, 1), (13, 17)]


def random_state(seed: int, dtype, shapes=ODD_SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.lora_{'AB'[i % 2]}.weight": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}


def assert_bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def through_the_wire(record: ArrayRecord) -> ArrayRecord:
    """What the receiver gets: every Array rebuilt from its serialised fields, as Flower does."""
    return ArrayRecord({k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(a.data)) for k, a in record.items()})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_round_trip_is_bit_exact(dtype):
    state = random_state(1, np.float32)
    if dtype is np.uint16:  # bf16 bit patterns, as the bfloat16 transport sends them
        state = packing.encode(state, "bfloat16")
    else:
        state = {k: v.astype(dtype) for k, v in state.items()}
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3e38], np.float32)
    state["special"] = packing.to_bf16_bits(special) if dtype is np.uint16 else special.astype(dtype)
    record = packing.pack(state)
    unpacked = packing.unpack(through_the_wire(record))
    assert unpacked.form == "packed"
    assert_bit_equal(unpacked.arrays, state)


def test_mixed_dtypes_get_one_buffer_each_and_metadata_travels():
    state = {**random_state(2, np.float32), "codes": np.arange(9, dtype=np.int8), "half": np.ones(3, np.float16)}
    record = packing.pack(state, meta={"codec": "int8", "block": 64})
    assert sorted(record) == sorted([MANIFEST_KEY, PREFIX + "float32", PREFIX + "int8", PREFIX + "float16"])
    unpacked = packing.unpack(through_the_wire(record))
    assert unpacked.meta == {"codec": "int8", "block": 64}
    assert_bit_equal(unpacked.arrays, state)


def test_empty_adapter():
    unpacked = packing.unpack(through_the_wire(packing.pack({})))
    assert unpacked.arrays == {} and unpacked.form == "packed"


def test_a_384_tensor_adapter_is_two_arrays():
    shapes = [(16, 4096) if i % 2 == 0 else (1024, 16) for i in range(384)]
    state = random_state(3, np.float32, shapes)
    record = packing.pack(state)
    assert len(record) == 2  # manifest + one float32 buffer: ~16 chunks of 5 MiB for the 8B model
    assert_bit_equal(packing.unpack(record).arrays, state)
    # the packed record costs less than the per-tensor one (no per-tensor npy headers)
    assert record.count_bytes() < packing.per_tensor(state).count_bytes()


def test_bf16_encoding_matches_torch_bit_for_bit():
    rng = np.random.default_rng(4)
    values = np.concatenate([
        rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 10_000),
        np.array([np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4028235e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32),
    ]).astype(np.float32)
    ours = packing.to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours.tobytes() == theirs.tobytes()
    # NaN stays NaN (torch's payload differs between its code paths; a NaN is rejected anyway)
    assert np.isnan(packing.from_bf16_bits(packing.to_bf16_bits(np.array([np.nan, -np.nan], np.float32)))).all()
    widened = packing.from_bf16_bits(ours)
    expected = torch.from_numpy(theirs.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert widened.tobytes() == expected.tobytes()


def test_encode_accepts_torch_bf16_tensors():
    tensor = torch.randn(5, 3).to(torch.bfloat16)
    wire = packing.encode({"w": tensor}, "bfloat16")["w"]
    assert wire.tobytes() == tensor.view(torch.int16).numpy().tobytes()  # exact: bf16 -> fp32 -> bf16


# ---- the leaderboard's bytes without building the record ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16, np.int8, np.float64])
def test_leaderboard_bytes_equals_count_bytes_of_the_per_tensor_record(dtype):
    shapes = [*ODD_SHAPES, (4096, 16), (16, 4096), (2, 3, 4, 5), (1,) * 12, (10**6,)]
    state = random_state(5, np.float32, shapes)
    state = {k: v.astype(dtype) for k, v in state.items()}
    specs = packing.specs_of(state)
    assert packing.leaderboard_bytes(specs) == packing.per_tensor(state).count_bytes()


def test_reference_run_budget_is_2942_79_mb_from_shapes_alone():
    from bench.synthetic import INTERNLM3_8B
    from fedtune.config import ModelSettings
    from fedtune.model import initial_adapter_state, state_to_arrays

    state = initial_adapter_state(
        ModelSettings(name="unused", trust_remote_code=False), seed=0, model_config=INTERNLM3_8B.llama_config()
    )
    specs = [(k, tuple(v.shape), np.dtype(np.float32)) for k, v in state.items()]
    per_message = packing.leaderboard_bytes(specs)
    assert per_message == state_to_arrays(state, "float32").count_bytes()  # the record, built once to check
    assert round(to_mb(per_message * 2 * 2 * 10), 2) == REFERENCE_BUDGET_MB == 2942.79
    # what the packed transport actually sends per message: 2 arrays, a little less than the leaderboard's
    packed = packing.pack(packing.encode(state, "float32"))
    assert len(packed) == 2 and packed.count_bytes() < per_message


# ---- tampering -----------------------------------------------------------------------------------------


def tampered(change) -> ArrayRecord:
    state = random_state(6, np.float32)
    record = packing.pack(state)
    manifest = json.loads(record[MANIFEST_KEY].numpy().tobytes())
    change(manifest, record)
    record[MANIFEST_KEY] = Array(np.frombuffer(json.dumps(manifest).encode(), np.uint8))
    return record


def shift_offset(m, r):
    m["tensors"][1]["offset"] += 1


def overlap(m, r):
    m["tensors"][1]["offset"] = 0


def duplicate(m, r):
    m["tensors"][1]["name"] = m["tensors"][0]["name"]


def grow_shape(m, r):
    m["tensors"][-1]["shape"] = [14, 17]


def shrink_shape(m, r):  # leaves spare elements in the buffer
    m["tensors"][-1]["shape"] = [12, 17]


def wrong_buffer_dtype(m, r):
    buffer = r[PREFIX + "float32"].numpy()
    r[PREFIX + "float32"] = Array(buffer.view(np.int32))


def lying_array_metadata(m, r):  # declares float32 data of its size, carries float64
    buffer = r[PREFIX + "float32"].numpy()
    real = Array(buffer[: buffer.size // 2].astype(np.float64))
    r[PREFIX + "float32"] = Array(dtype="<f4", shape=buffer.shape, stype=real.stype, data=real.data)


def extra_array(m, r):
    r["layer.evil"] = Array(np.zeros(3, np.float32))


def extra_buffer(m, r):
    r[PREFIX + "int8"] = Array(np.zeros(3, np.int8))


def missing_buffer(m, r):
    del r[PREFIX + "float32"]


def two_dimensional_buffer(m, r):
    buffer = r[PREFIX + "float32"].numpy()
    r[PREFIX + "float32"] = Array(buffer.reshape(1, -1))


def bad_version(m, r):
    m["version"] = 99


def unknown_field(m, r):
    m["tensors"][0]["stride"] = 2


def negative_offset(m, r):
    m["tensors"][0]["offset"] = -1


def float_shape(m, r):
    m["tensors"][0]["shape"] = [7.0]


def reserved_name(m, r):
    m["tensors"][0]["name"] = PREFIX + "manifest"


def object_dtype(m, r):
    m["tensors"][0]["dtype"] = "object"


def absurd_zero_shape(m, r):
    m["tensors"].append({"name": "z", "dtype": "float32", "shape": [0, 10**30], "offset": m["tensors"][-1]["offset"] + 221})


@pytest.mark.parametrize(
    "change",
    [shift_offset, overlap, duplicate, grow_shape, shrink_shape, wrong_buffer_dtype, lying_array_metadata,
     extra_array, extra_buffer, missing_buffer, two_dimensional_buffer, bad_version, unknown_field,
     negative_offset, float_shape, reserved_name, object_dtype, absurd_zero_shape],
)
def test_a_tampered_manifest_is_rejected_with_a_reason(change):
    record = tampered(change)
    with pytest.raises(PackingError) as caught:
        packing.unpack(through_the_wire(record))
    assert "\n" not in str(caught.value) and str(caught.value)


@pytest.mark.parametrize(
    "payload", [b"not json", b"[1, 2]", json.dumps({"format": "other", "version": 1}).encode(), b"\xff\xfe"]
)
def test_a_manifest_that_is_not_one_is_rejected(payload):
    record = packing.pack(random_state(7, np.float32))
    record[MANIFEST_KEY] = Array(np.frombuffer(payload, np.uint8))
    with pytest.raises(PackingError):
        packing.unpack(record)


def test_manifest_of_the_wrong_dtype_or_size_is_rejected(monkeypatch):
    record = packing.pack(random_state(8, np.float32))
    raw = record[MANIFEST_KEY].numpy()
    record[MANIFEST_KEY] = Array(raw.astype(np.int16))
    with pytest.raises(PackingError, match="uint8"):
        packing.unpack(record)
    monkeypatch.setattr(packing, "MAX_MANIFEST_BYTES", 10)
    with pytest.raises(PackingError, match="cap"):
        packing.unpack(packing.pack(random_state(8, np.float32)))


def test_old_per_tensor_records_still_unpack_and_half_packed_ones_do_not():
    state = random_state(9, np.float32, [s for s in ODD_SHAPES if s != ()])  # Flower stores 0-d as (1,)
    unpacked = packing.unpack(through_the_wire(packing.per_tensor(state)))
    assert unpacked.form == "per-tensor"
    assert_bit_equal(unpacked.arrays, state)
    record = packing.pack(state)
    del record[MANIFEST_KEY]
    with pytest.raises(PackingError, match="without a manifest"):
        packing.unpack(record)


def test_a_tensor_name_with_the_reserved_prefix_cannot_be_packed():
    with pytest.raises(PackingError, match="reserved"):
        packing.pack({PREFIX + "x": np.zeros(2, np.float32)})


def test_model_helpers_read_both_forms():
    from fedtune.model import arrays_to_state

    state = random_state(10, np.float32)
    for record in (packing.pack(state), packing.per_tensor(state)):
        tensors = arrays_to_state(record)
        assert all(tensors[k].numpy().tobytes() == state[k].tobytes() for k in state)


def test_a_truncated_or_padded_payload_is_rejected_and_views_are_read_only():
    record = packing.pack(random_state(11, np.float32))
    key = PREFIX + "float32"
    data = bytes(record[key].data)
    for bad in (data[:-4], data + b"\0\0\0\0"):
        record[key] = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=bad)
        with pytest.raises(PackingError, match="payload holds"):
            packing.unpack(record)
    arrays = packing.unpack(packing.pack(random_state(11, np.float32))).arrays
    with pytest.raises(ValueError):  # zero-copy views of the received bytes: nobody writes into them
        next(iter(arrays.values()))[...] = 0


@pytest.mark.parametrize(
    "values",
    [
        np.arange(10, dtype=np.float32),
        np.zeros((3, 0), np.float32),
        np.array(3.5),
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.arange(12, dtype=np.uint16).reshape(3, 4)[:, ::2],  # not contiguous
        np.frombuffer(b'{"a": 1}', dtype=np.uint8),
    ],
    ids=["f32", "empty", "0-d", "big-endian", "strided", "uint8"],
)
def test_npy_array_is_flowers_array_byte_for_byte(values):
    ours, flowers = packing.npy_array(values), Array(np.require(values, requirements="C"))
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
        flowers.data, flowers.dtype, flowers.shape, flowers.stype
    )
    assert np.array_equal(ours.numpy(), values)


def test_pack_buffer_is_pack_of_its_tensors():
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.full((4,), 7.0, np.float32)}
    buffer = np.concatenate([v.reshape(-1) for v in state.values()])
    layout = [(name, values.shape) for name, values in state.items()]
    record = packing.pack_buffer(layout, buffer, {"codec": "x"})
    expected = packing.pack(state, {"codec": "x"})
    assert {k: record[k].data for k in record} == {k: expected[k].data for k in expected}
    split = packing.split_buffer(layout, buffer)
    assert all(np.shares_memory(split[name], buffer) for name in split)
    assert all(np.array_equal(split[name], state[name]) for name in state)
    with pytest.raises(packing.PackingError, match="layout covers 10 elements, the buffer holds 11"):
        packing.pack_buffer(layout, np.zeros(11, np.float32))


def test_back_to_back_finds_one_buffer_only_when_the_tensors_are_its_consecutive_pieces():
    buffer = np.arange(20, dtype=np.float32)
    views = packing.split_buffer([("a", (2, 3)), ("empty", (0,)), ("b", (4,)), ("c", (10,))], buffer)
    whole = packing.back_to_back(list(views.values()))
    assert whole is not None and np.shares_memory(whole, buffer) and np.array_equal(whole, buffer)
    middle = packing.back_to_back([views["b"], views["c"]])
    assert middle is not None and np.array_equal(middle, buffer[6:])
    assert packing.back_to_back([views["c"], views["b"]]) is None  # out of order
    assert packing.back_to_back([views["a"], views["c"]]) is None  # a gap
    assert packing.back_to_back([views["a"], views["b"].copy()]) is None  # another buffer
    assert packing.back_to_back([buffer.reshape(4, 5)[:, :2]]) is None  # not contiguous
    assert packing.back_to_back([views["a"], buffer[6:10].view(np.int32)]) is None  # another dtype
    assert packing.back_to_back([torch.zeros(3)]) is None


@pytest.mark.parametrize("dtype", [np.float32, packing.BF16_WIRE_DTYPE])
def test_a_received_record_packs_and_decodes_the_same_as_separate_tensors(dtype):
    state = random_state(11, np.float32)
    wire = packing.encode(state, "bfloat16") if dtype is packing.BF16_WIRE_DTYPE else state
    received = packing.unpack(through_the_wire(packing.pack(wire))).arrays
    assert packing.back_to_back(list(received.values())) is not None
    separate = {name: values.copy() for name, values in received.items()}
    assert_bit_equal(packing.decode(received), packing.decode(separate))
    again, expected = packing.pack(received), packing.pack(separate)
    assert {k: again[k].data for k in again} == {k: expected[k].data for k in expected}
