"""Codecs (issue 18): round trips (bit-exact where lossless, bounded where lossy), the leaderboard's bytes of
what is sent, rejection of corrupted encodings, error feedback, and the reply path the server aggregates."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.codecs import (
    CODECS,
    QUANTISED,
    CodecSpec,
    bf16_bits,
    blockwise,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
    layout,
    problem,
)
from fedtune.codecs.budget import (
    TABLE_SPECS,
    budget_table,
    internlm3_8b_lora_shapes,
    leaderboard_bytes,
    message_bytes,
    run_budget,
)
from fedtune.codecs.node import TAG_RECORD, encode_update, numpy_to_record, receive_global, reply_update
from fedtune.codecs.server import decode_reply, encode_global
from fedtune.packing import npy_bytes

SHAPES = [(16, 64), (64, 16), (3, 5), (1,), (7, 130), (256, 16)]
BLOCKS = [2, 64, 128]


def rng_values(shape, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_none_is_bit_exact(shape):
    x = rng_values(shape)
    encoded = encode_tensor("none", "k", x, 64)
    assert np.array_equal(decode_tensor("none", "k", encoded, shape, 64).view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_torch_and_is_exact_on_bf16_values(shape):
    import torch

    x = rng_values(shape, scale=3.0)
    bits = bf16_bits(x)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, expected)  # the same wire bytes as model.transport-dtype = "bfloat16"
    decoded = decode_tensor("bf16", "k", encode_tensor("bf16", "k", x, 64), shape, 64)
    assert np.array_equal(decoded, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    again = decode_tensor("bf16", "k", encode_tensor("bf16", "k", decoded, 64), shape, 64)
    assert np.array_equal(again.view(np.uint32), decoded.view(np.uint32))  # lossless on bf16 values


@pytest.mark.parametrize("codec", QUANTISED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantised_error_is_bounded_per_block(codec, shape, block):
    x = rng_values(shape, seed=block)
    x.ravel()[0] = 0.5  # an outlier: only its own block's precision suffers
    encoded = encode_tensor(codec, "k", x, block)
    decoded = decode_tensor(codec, "k", encoded, shape, block)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    flat = x.ravel()
    absmax = np.repeat(blockwise.absmax_scales(flat, block), block)[: flat.size]
    bound = blockwise.max_relative_error(codec) * absmax * (1 + 1e-6) + 1e-12
    assert np.all(np.abs(decoded.ravel() - flat) <= bound)
    # every block's extreme value is exact (scale = absmax, ±1 is a code)
    blocks = np.pad(flat, (0, -flat.size % block)).reshape(-1, block)
    dec_blocks = np.pad(decoded.ravel(), (0, -flat.size % block)).reshape(-1, block)
    rows = np.arange(len(blocks))
    extreme = np.abs(blocks).argmax(axis=1)
    np.testing.assert_allclose(dec_blocks[rows, extreme], blocks[rows, extreme], rtol=1e-6)


@pytest.mark.parametrize("codec", QUANTISED)
def test_zero_blocks_and_re_encoding_are_exact(codec):
    x = np.zeros((8, 33), np.float32)
    x[5] = rng_values(33)
    decoded = decode_tensor(codec, "k", encode_tensor(codec, "k", x, 16), x.shape, 16)
    assert np.all(decoded[:4] == 0)
    # decoded values are on the grid: encoding them again changes nothing
    again = decode_tensor(codec, "k", encode_tensor(codec, "k", decoded, 16), x.shape, 16)
    np.testing.assert_allclose(again, decoded, rtol=1e-6, atol=0)


def test_nf4_codebook_is_bitsandbytes_nf4():
    from bitsandbytes.functional import get_4bit_type

    ours = blockwise.nf4_codebook()
    assert ours.shape == (16,) and np.all(np.diff(ours) > 0) and 0.0 in ours
    theirs = get_4bit_type("nf4", device="cpu").numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_nibbles_round_trip():
    codes = np.random.default_rng(1).integers(0, 16, 101).astype(np.uint8)
    packed = blockwise.pack_nibbles(codes)
    assert packed.size == 51
    assert np.array_equal(blockwise.unpack_nibbles(packed, 101), codes)


@pytest.mark.parametrize("codec", CODECS)
def test_layout_is_what_encode_produces_and_bytes_are_count_bytes(codec):
    state = {f"layer.{i}.lora_A.weight": rng_values(s, i) for i, s in enumerate(SHAPES)}
    encoded = encode_state(state, codec, 64)
    expected = [e for k, v in state.items() for e in layout(codec, k, v.shape, 64)]
    assert [(k, tuple(a.shape), a.dtype) for k, a in encoded.items()] == [(k, s, d) for k, s, d in expected]
    record = numpy_to_record(encoded)
    shapes = {k: v.shape for k, v in state.items()}
    assert record.count_bytes() == leaderboard_bytes(encoded) == message_bytes(shapes, codec, 64)


@pytest.mark.parametrize("shape,dtype", [((16, 4096), np.float32), ((3,), np.int8), ((2, 2, 2), np.uint16), ((0,), np.float32)])
def test_npy_bytes_is_np_save_length(shape, dtype):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype), allow_pickle=False)
    assert npy_bytes(shape, dtype) == len(buffer.getvalue())


def test_reference_shapes_are_peft_s_and_the_budget_is_the_reference_run():
    from bench.synthetic import INTERNLM3_8B
    from fedtune.config import ModelSettings
    from fedtune.model import initial_adapter_state, state_to_arrays

    state = initial_adapter_state(
        ModelSettings(name="unused", trust_remote_code=False), 0, INTERNLM3_8B.llama_config()
    )
    shapes = internlm3_8b_lora_shapes()
    assert list(shapes) == list(state) and all(tuple(state[k].shape) == s for k, s in shapes.items())
    per_message = state_to_arrays(state, "float32").count_bytes()
    assert message_bytes(shapes, "none", 64) == per_message
    assert message_bytes(shapes, "bf16", 64) == state_to_arrays(state, "bfloat16").count_bytes()
    assert round(run_budget(shapes, CodecSpec()).total_mb, 2) == 2942.79
    assert round(run_budget(shapes, CodecSpec("bf16", "bf16")).total_mb, 2) == 1472.79
    b_values = sum(np.prod(s) for k, s in shapes.items() if "lora_B" in k)
    assert b_values / 19_267_584 == pytest.approx(0.347, abs=1e-3)  # FFA-LoRA sends B only


def test_budget_table_rows_follow_the_formula():
    shapes = {"a.lora_A.weight": (4, 10), "a.lora_B.weight": (6, 4)}
    table = budget_table(shapes, rounds=3, nodes_per_round=2).splitlines()
    assert len(table) == 2 + len(TABLE_SPECS)
    for line, (name, spec) in zip(table[2:], TABLE_SPECS.items(), strict=True):
        sent = {k: np.zeros(s, np.float32) for k, s in shapes.items() if not (spec.ffa_lora and "lora_A" in k)}
        down = ArrayRecord({k: Array(v) for k, v in encode_state(sent, spec.download, 64).items()}).count_bytes()
        up = ArrayRecord({k: Array(v) for k, v in encode_state(sent, spec.upload, 64).items()}).count_bytes()
        assert line.startswith(f"| {name} |")
        assert f"| {3 * 2 * (down + up) / 1024**2:.2f} |" in line


def test_the_quarter_and_tenth_targets_exist_in_the_table():
    shapes = internlm3_8b_lora_shapes()
    mb = {name: run_budget(shapes, spec).total_mb for name, spec in TABLE_SPECS.items()}
    assert mb["int8"] > 2942.79 / 4  # scales and headers: int8 alone is just above a quarter
    assert mb["int8 down, nf4 up"] <= 735 and mb["ffa-lora + bf16"] <= 735
    assert mb["ffa-lora + int8"] <= 294


# ---- rejection -----------------------------------------------------------------------------------


def encoded_int8():
    state = {"x.lora_A.weight": rng_values((4, 70)), "x.lora_B.weight": rng_values((70, 4), 1)}
    return encode_state(state, "int8", 64), {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (lambda e: e["x.lora_A.weight:s"].__setitem__(0, np.nan), "bad-scales"),
        (lambda e: e["x.lora_A.weight:s"].__setitem__(1, np.inf), "bad-scales"),
        (lambda e: e["x.lora_B.weight:s"].__setitem__(2, -0.1), "bad-scales"),
        (lambda e: e.__setitem__("x.lora_B.weight:s", e["x.lora_B.weight:s"][:-1]), "bad-scales"),
        (lambda e: e.__setitem__("x.lora_B.weight:s", e["x.lora_B.weight:s"].astype(np.float64)), "bad-scales"),
        (lambda e: e.pop("x.lora_A.weight:s"), "wrong-keys"),
        (lambda e: e.__setitem__("x.lora_A.weight:q", e["x.lora_A.weight:q"].astype(np.int16)), "wrong-dtype"),
        (lambda e: e.__setitem__("x.lora_A.weight:q", e["x.lora_A.weight:q"].T.copy()), "wrong-shape"),
        (lambda e: e["x.lora_A.weight:q"].__setitem__((0, 0), -128), "bad-codes"),
    ],
)
def test_corrupted_encodings_are_refused(corrupt, reason):
    encoded, shapes = encoded_int8()
    assert problem(encoded, shapes, "int8", 64) is None
    corrupt(encoded)
    assert problem(encoded, shapes, "int8", 64) == reason


def test_zero_scale_is_valid_and_int4_code_15_is_not():
    shapes = {"k": (4, 4)}
    assert problem(encode_state({"k": np.zeros((4, 4), np.float32)}, "nf4", 8), shapes, "nf4", 8) is None
    encoded = encode_state({"k": rng_values((4, 4))}, "int4", 8)
    encoded["k:q"][0] = 0xF0
    assert problem(encoded, shapes, "int4", 8) == "bad-codes"
    assert problem(encode_state({"k": np.full((4, 4), np.nan, np.float32)}, "none", 8), shapes, "none", 8) == "non-finite"
    assert problem(encode_state({"k": np.full((4, 4), np.inf, np.float32)}, "bf16", 8), shapes, "bf16", 8) == "non-finite"


def test_unknown_codec_and_bad_block_size_are_errors():
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        CodecSpec("zip").check()
    with pytest.raises(ValueError, match="block size"):
        CodecSpec("int8", "int8", block_size=3).check()
    spec = CodecSpec("nf4", "int8", 128, True)
    assert CodecSpec.from_config(spec.to_config()) == spec
    assert not CodecSpec().active and CodecSpec(ffa_lora=True).active


# ---- error feedback and the message path -----------------------------------------------------------


@pytest.mark.parametrize("codec", QUANTISED)
def test_error_feedback_delivers_the_whole_movement(codec):
    """Over many rounds the server's sum of decoded uploads trails the sum of true deltas by at most the
    last residual (one quantisation step), instead of drifting by the rounding bias every round."""
    spec = CodecSpec(codec, "none", 64)
    received = {"k": np.zeros((16, 64), np.float32)}
    residual, sent_total, true_total = None, np.zeros((16, 64)), np.zeros((16, 64))
    delta = rng_values((16, 64), 3, scale=1e-4) + np.float32(2e-5)  # a small bias that plain rounding drops
    for _ in range(50):
        encoded, residual = encode_update({"k": received["k"] + delta}, received, spec, residual)
        sent_total += decode_state(encoded, {"k": (16, 64)}, codec, 64)["k"]
        true_total += delta
    step = blockwise.max_relative_error(codec) * 2 * np.abs(delta + residual["k"]).max()
    assert np.abs(true_total - sent_total - residual["k"]).max() < 1e-6
    assert np.abs(true_total - sent_total).max() <= step
    without = decode_state(encode_state({"k": delta}, codec, 64), {"k": (16, 64)}, codec, 64)["k"] * 50
    assert np.abs(true_total - sent_total).mean() < np.abs(true_total - without).mean()


def adapter_record(seed=0):
    return ArrayRecord(
        {
            "m.q.lora_A.weight": Array(rng_values((4, 40), seed, 0.3)),
            "m.q.lora_B.weight": Array(rng_values((24, 4), seed + 1)),
        }
    )


@pytest.mark.parametrize("spec", [CodecSpec("int8", "int8"), CodecSpec("nf4", "bf16", 16), CodecSpec("bf16", "nf4", 8, True), CodecSpec(ffa_lora=True)])
def test_download_train_upload_aggregate_path(spec):
    global_arrays = adapter_record()
    outgoing, config = encode_global(global_arrays, spec)
    assert set(outgoing.keys()) == {k for k, s, d in (e for key in spec.sent_keys(global_arrays.keys()) for e in layout(spec.download, key, tuple(global_arrays[key].shape), spec.block_size))}
    got_spec, received = receive_global(outgoing, ConfigRecord(config))
    assert got_spec == spec and set(received.keys()) == set(spec.sent_keys(global_arrays.keys()))
    # the node "trains": moves every value it holds by +0.01
    trained = ArrayRecord({k: Array(a.numpy() + np.float32(0.01)) for k, a in received.items()})
    state = RecordDict()
    arrays, tag = reply_update(trained, received, spec, state)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3}), TAG_RECORD: tag})
    adapter, reason = decode_reply(content, global_arrays, spec)
    assert reason is None and set(adapter.keys()) == set(global_arrays.keys())
    for key in global_arrays:
        base = global_arrays[key].numpy()
        if spec.ffa_lora and "lora_A" in key:
            assert np.array_equal(adapter[key].numpy(), base)  # frozen: never sent, never changed
        elif spec.upload_is_delta:  # global + (trained - received): the download's rounding is not kept
            step = blockwise.max_relative_error(spec.upload) * 2 * 0.0101 if spec.upload in QUANTISED else 1e-4
            np.testing.assert_allclose(adapter[key].numpy(), base + 0.01, atol=step)
    if spec.upload_is_delta:
        assert "codec-residual" in state.array_records


def test_reply_with_another_codec_or_no_tag_is_refused():
    spec = CodecSpec("int8", "int8")
    global_arrays = adapter_record()
    outgoing, config = encode_global(global_arrays, spec)
    _, received = receive_global(outgoing, ConfigRecord(config))
    other = CodecSpec("nf4", "int8")
    arrays, tag = reply_update(received, received, other, RecordDict())
    content = RecordDict({"arrays": arrays, TAG_RECORD: tag})
    assert decode_reply(content, global_arrays, spec) == (None, "codec-mismatch")
    arrays, tag = reply_update(received, received, spec, RecordDict())
    assert decode_reply(RecordDict({"arrays": arrays}), global_arrays, spec) == (None, "codec-mismatch")
    content = RecordDict({"arrays": arrays, TAG_RECORD: ConfigRecord({**spec.to_config(), "codec-upload": "gzip"})})
    assert decode_reply(content, global_arrays, spec) == (None, "codec-mismatch")


def test_scale_so_large_the_sum_overflows_is_refused():
    spec = CodecSpec("int8", "int8", 8)
    global_arrays = adapter_record()
    shapes = {k: tuple(a.shape) for k, a in global_arrays.items()}
    encoded = encode_state({k: np.ones(s, np.float32) for k, s in shapes.items()}, "int8", 8)
    for k in list(encoded):
        if k.endswith(":s"):
            encoded[k][:] = np.float32(3e38)
    content = RecordDict({"arrays": numpy_to_record(encoded), TAG_RECORD: ConfigRecord(spec.to_config())})
    for key in list(shapes):  # a global near the float32 limit: global + delta overflows
        global_arrays[key] = Array(np.full(shapes[key], 3e38, np.float32))
    assert decode_reply(content, global_arrays, spec) == (None, "non-finite")


# ---- the ServerApp's strategy and the ClientApp's codec steps, on known arrays ---------------------------


class _Grid:
    def get_node_ids(self):
        return [11, 22]


@pytest.fixture
def _identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def codec_strategy(tmp_path, **comm):
    from fedtune.config import FedTuneConfig
    from fedtune.results import ResultsFile, RunResults
    from serverapp.strategy import FedTuneAvg

    cfg = FedTuneConfig.from_run_config({"strategy.fraction-train": 1.0, "train.save-every-round": 0, **comm})
    return FedTuneAvg(cfg, ResultsFile(tmp_path, RunResults(run_id=1, config=cfg.to_dict()))), cfg


def node_reply(message, state, move, num_examples, corrupt=None, spec_override=None):
    """What the ClientApp does around training: decode, "train" (+ move), encode the delta with EF."""
    from flwr.app import Message

    from fedtune.round_config import RoundConfig

    round_config = RoundConfig.from_config_record(message.content["config"])
    spec, received = receive_global(message.content["arrays"], round_config.codec, round_config.transport)
    trained = numpy_to_record({k: v + np.float32(move) for k, v in packing_arrays(received).items()})
    arrays, tag = reply_update(trained, received, spec_override or spec, state, round_config.transport)
    if corrupt is not None:
        arrays = corrupt(arrays, round_config.transport)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0})})
    if tag is not None:
        content[TAG_RECORD] = tag
    return Message(content, reply_to=message)


def packing_arrays(record):
    from fedtune import packing

    return packing.unpack(record).arrays


@pytest.mark.parametrize("transport", ["packed", "per-tensor"])
@pytest.mark.parametrize("comm", [
    {"comm.codec": "int8"},
    {"comm.codec": "nf4", "comm.download-codec": "int8", "comm.block-size": 16},
    {"comm.codec": "bf16", "comm.ffa-lora": True},
])
def test_strategy_round_with_a_codec(tmp_path, _identity, transport, comm):
    strategy, cfg = codec_strategy(tmp_path, **{"comm.transport": transport, **comm})
    spec = cfg.comm.spec()
    global_arrays = adapter_record()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: ([11, 22], [11, 22]))
        sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid()))
    # the download is the codec's encoding of the global, accounted as the leaderboard counts it
    shapes = {k: tuple(a.shape) for k, a in global_arrays.items()}
    budget = run_budget(shapes, spec, rounds=1, nodes_per_round=2)
    assert leaderboard_bytes(packing_arrays(sent[0].content["arrays"])) == budget.down_bytes
    replies = [node_reply(sent[0], RecordDict(), 0.01, 10), node_reply(sent[1], RecordDict(), 0.03, 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.results.results.rounds[-1]
    assert not record.rejected and record.aggregated
    assert record.bytes_down == 2 * budget.down_bytes and record.bytes_up == 2 * budget.up_bytes
    result = packing_arrays(arrays)
    for key, array in global_arrays.items():
        base = array.numpy()
        if spec.ffa_lora and "lora_A" in key:
            assert np.array_equal(result[key], base)
        else:  # global + the examples-weighted mean delta (0.025), to the upload codec's precision
            tolerance = blockwise.max_relative_error(spec.upload) * 2 * 0.031 if spec.upload in QUANTISED else 1e-3
            np.testing.assert_allclose(result[key], base + 0.025, atol=tolerance)


def _corrupt_scales(value):
    def corrupt(arrays, transport):
        encoded = dict(packing_arrays(arrays))
        scales = next(k for k in encoded if k.endswith(":s"))
        encoded[scales] = encoded[scales].copy()
        encoded[scales][0] = value
        return numpy_to_record(encoded, transport)
    return corrupt


def _short_scales(arrays, transport):
    encoded = dict(packing_arrays(arrays))
    scales = next(k for k in encoded if k.endswith(":s"))
    encoded[scales] = encoded[scales][:-1].copy()
    return numpy_to_record(encoded, transport)


@pytest.mark.parametrize("corrupt,override,reason", [
    (_corrupt_scales(np.nan), None, "bad-scales"),
    (_corrupt_scales(np.inf), None, "bad-scales"),
    (_corrupt_scales(-1.0), None, "bad-scales"),
    (_short_scales, None, "bad-scales"),
    (None, CodecSpec("nf4", "int8"), "codec-mismatch"),
])
def test_bad_codec_replies_are_rejected_never_aggregated(tmp_path, _identity, corrupt, override, reason):
    strategy, _ = codec_strategy(tmp_path, **{"comm.codec": "int8"})
    global_arrays = adapter_record()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: ([11, 22], [11, 22]))
        sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid()))
    good = node_reply(sent[0], RecordDict(), 0.01, 10)
    bad = node_reply(sent[1], RecordDict(), 5.0, 1000, corrupt=corrupt, spec_override=override)
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    record = strategy.results.results.rounds[-1]
    assert record.rejected == {"22": reason}
    # only the good node's update: global + its 0.01
    np.testing.assert_allclose(packing_arrays(arrays)["m.q.lora_B.weight"], global_arrays["m.q.lora_B.weight"].numpy() + 0.01, atol=1e-3)


def test_reference_configuration_is_untouched_by_codecs(tmp_path, _identity):
    """comm.codec = none (the default): the round config carries no codec key and the download is fp32."""
    strategy, cfg = codec_strategy(tmp_path)
    assert not cfg.comm.spec().active
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: ([11, 22], [11, 22]))
        sent = list(strategy.configure_train(1, adapter_record(), ConfigRecord(), _Grid()))
    assert not [k for k in sent[0].content["config"] if k.startswith("codec-")]
    assert {a.dtype for a in packing_arrays(sent[0].content["arrays"]).values()} == {np.dtype(np.float32)}


def test_config_refuses_unknown_codecs_in_one_line():
    from fedtune.config import FedTuneConfig
    from fedtune.errors import FedTuneError

    for bad, words in [({"comm.codec": "zip"}, "comm.codec='zip'"), ({"comm.download-codec": "fp8"}, "comm.download-codec"),
                       ({"comm.block-size": 63}, "comm.block-size"), ({"comm.codec": "int8", "model.transport-dtype": "bfloat16"}, "transport-dtype")]:
        with pytest.raises(FedTuneError, match=words) as err:
            FedTuneConfig.from_run_config(bad)
        assert "\n" not in str(err.value)


def test_docs_budget_table_is_the_generated_one():
    from tests.conftest import REPO

    assert budget_table() in (REPO / "docs" / "communication.md").read_text()


def test_comm_profile_is_known_config_under_a_quarter_of_the_reference():
    import tomllib
    from flwr.common.config import flatten_dict

    from fedtune.config import FedTuneConfig
    from tests.conftest import REPO

    profile = flatten_dict(tomllib.loads((REPO / "profiles" / "comm-lean.toml").read_text()))
    spec = FedTuneConfig.from_run_config(profile).comm.spec()
    assert run_budget(internlm3_8b_lora_shapes(), spec).total_mb <= 2942.79 / 4


@pytest.mark.parametrize("comm", [{"comm.codec": "nf4", "comm.download-codec": "int8"}, {"comm.codec": "int8", "comm.ffa-lora": True}])
def test_clientapp_round_on_the_tiny_model(tiny_model_dir, _identity, tmp_path, comm):
    """The real ClientApp train() (4-bit tiny model, trl): decodes the codec's global, trains, replies with an
    encoded delta the strategy accepts; under FFA-LoRA, A is the seeded one, frozen, and never sent."""
    from flwr.app import Context

    import clientapp.client_app as client_app
    from fedtune.model import initial_adapter_state, state_to_arrays
    from tests.conftest import tiny_run_config

    run_config = tiny_run_config(tiny_model_dir, **{"train.max-steps": 2, "strategy.fraction-train": 1.0,
                                                    "strategy.max-update-ratio": 1e6, **comm})
    strategy, cfg = codec_strategy(tmp_path, **{k: v for k, v in run_config.items() if k != "strategy.fraction-train"})
    spec = cfg.comm.spec()
    initial = state_to_arrays(initial_adapter_state(cfg.model, cfg.train.seed), "float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: ([11, 22], [11, 22]))
        sent = list(strategy.configure_train(1, initial, ConfigRecord(), _Grid()))
    context = Context(run_id=1, node_id=11, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    reply = client_app.train(sent[0], context)
    assert TAG_RECORD in reply.content.config_records
    sent_keys = {k.rsplit(":", 1)[0] for k in packing_arrays(reply.content["arrays"])}
    assert sent_keys == set(spec.sent_keys(initial.keys()))
    assert ("codec-residual" in context.state.array_records) == spec.upload_is_delta
    arrays, _ = strategy.aggregate_train(1, [reply])
    record = strategy.results.results.rounds[-1]
    assert not record.rejected and record.aggregated
    result, before = packing_arrays(arrays), {k: a.numpy() for k, a in initial.items()}
    for key in before:
        if spec.ffa_lora and "lora_A" in key:
            assert np.array_equal(result[key], before[key])
    assert any(not np.array_equal(result[k], before[k]) for k in before if "lora_B" in k)  # it learnt
