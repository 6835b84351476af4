"""FedTuneAvg on known arrays: weighting, byte accounting, rejections, checkpoints."""

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.accounting import CommLedger
from fedtune.config import FedTuneConfig
from fedtune.results import ResultsFile, RunResults
from serverapp.strategy import FedTuneAvg

KEYS = ("layer.lora_A.weight", "layer.lora_B.weight")


@pytest.fixture(autouse=True)
def _message_identity():
    # Messages need a run/task identity; in a real run flwr sets it in the ServerApp process.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class TwoNodeGrid:
    """Just enough of a Grid for configure_train's sampling (the real one is exercised end to end)."""

    def get_node_ids(self):
        return [11, 22]


def record(a: float, b: float) -> ArrayRecord:
    return ArrayRecord(
        {KEYS[0]: Array(np.full((2, 3), a, np.float32)), KEYS[1]: Array(np.full((3, 2), b, np.float32))}
    )


def make_strategy(tmp_path, **overrides):
    # these arrays are far from their all-zero global: lift the update-norm bound (tested on its own)
    run_config = {
        "strategy.fraction-train": 1.0, "train.save-every-round": 1, "strategy.max-update-ratio": 1e6,
        **overrides,
    }
    cfg = FedTuneConfig.from_run_config(run_config)
    return FedTuneAvg(cfg, ResultsFile(tmp_path, RunResults(run_id=1, config=cfg.to_dict()))), cfg


def reply_to(sent: Message, arrays: ArrayRecord | None, num_examples, loss=1.0) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=sent)


def configure(strategy, server_round=1):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: ([11, 22], [11, 22])
        )
        return list(strategy.configure_train(server_round, record(0.0, 0.0), ConfigRecord(), TwoNodeGrid()))


def unpacked(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The aggregate's tensors (FedTuneAvg returns the packed float32 record)."""
    from fedtune import packing

    return packing.unpack(arrays).arrays


def npy_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def test_fedavg_weights_by_examples_and_counts_bytes(tmp_path):
    strategy, cfg = make_strategy(tmp_path)
    sent = configure(strategy)
    assert [m.metadata.dst_node_id for m in sent] == [11, 22]
    assert sent[0].content["config"]["learning-rate"] == pytest.approx(cfg.learning_rate(1))
    replies = [reply_to(sent[0], record(1.0, 2.0), 10, 2.0), reply_to(sent[1], record(4.0, 8.0), 30, 1.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    strategy.finish()  # the checkpoint writer thread

    a, b = unpacked(arrays)[KEYS[0]], unpacked(arrays)[KEYS[1]]
    np.testing.assert_allclose(a, (10 * 1.0 + 30 * 4.0) / 40)
    np.testing.assert_allclose(b, (10 * 2.0 + 30 * 8.0) / 40)
    assert metrics["train-loss"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)

    # leaderboard formula, computed independently: .npy bytes + key bytes, per message
    per_message = sum(
        npy_bytes(np.zeros(s, np.float32)) + len(k) for k, s in zip(KEYS, [(2, 3), (3, 2)], strict=False)
    )
    traffic = strategy.ledger.round(1)
    assert traffic.node(11).down_bytes == traffic.node(22).down_bytes == per_message
    assert traffic.node(11).up_bytes == traffic.node(22).up_bytes == per_message
    assert strategy.ledger.total_bytes == 4 * per_message
    # the packed download actually sent is smaller (one buffer + manifest); these replies were per-tensor
    assert 0 < traffic.node(11).down_sent_bytes == sent[0].content["arrays"].count_bytes()
    assert traffic.node(11).up_sent_bytes == per_message

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["budget_bytes"] == 4 * per_message
    assert results["budget_mb"] == 4 * per_message / 1024**2
    assert results["rounds"][0]["replied"] == [11, 22]
    assert results["sent_bytes"] == 2 * sent[0].content["arrays"].count_bytes() + 2 * per_message
    assert results["rounds"][0]["checkpoint_written_at"] is not None
    assert (tmp_path / "checkpoints" / "round-0001" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("bad_arrays", "num_examples", "reason"),
    [
        (record(float("nan"), 1.0), 10, "non-finite"),
        (record(float("inf"), 1.0), 10, "non-finite"),
        (ArrayRecord({KEYS[0]: Array(np.zeros((2, 3), np.float32))}), 10, "wrong-keys"),
        (
            ArrayRecord(
                {KEYS[0]: Array(np.zeros((3, 3), np.float32)), KEYS[1]: Array(np.zeros((3, 2), np.float32))}
            ),
            10,
            "wrong-shape",
        ),
        (
            ArrayRecord(
                {KEYS[0]: Array(np.zeros((2, 3), np.float64)), KEYS[1]: Array(np.zeros((3, 2), np.float64))}
            ),
            10,
            "oversize",
        ),
        (
            ArrayRecord(
                {KEYS[0]: Array(np.zeros((2, 3), np.float16)), KEYS[1]: Array(np.zeros((3, 2), np.float16))}
            ),
            10,
            "wrong-dtype",
        ),
        (record(1.0, 1.0), 0, "bad-num-examples"),
        (record(1.0, 1.0), -3, "bad-num-examples"),
        (None, 10, "missing-arrays"),
    ],
)
def test_bad_updates_are_rejected_before_aggregation(tmp_path, bad_arrays, num_examples, reason):
    strategy, _ = make_strategy(tmp_path)
    sent = configure(strategy)
    good = reply_to(sent[0], record(2.0, 2.0), 10)
    bad = reply_to(sent[1], bad_arrays, num_examples)
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    np.testing.assert_allclose(unpacked(arrays)[KEYS[0]], 2.0)  # only the good update counts
    assert strategy.results.results.rounds[0].rejected == {"22": reason}
    assert strategy.results.results.rounds[0].rejections == {reason: 1}


def test_all_rejected_or_failed_keeps_the_global_adapter(tmp_path):
    strategy, _ = make_strategy(tmp_path)
    sent = configure(strategy)
    failed = Message(Error(code=0, reason="node lost"), reply_to=sent[0])
    bad = reply_to(sent[1], record(float("nan"), 0.0), 10)
    arrays, metrics = strategy.aggregate_train(1, [failed, bad])
    strategy.finish()
    assert arrays is None and metrics is None
    round_record = strategy.results.results.rounds[0]
    assert round_record.failed == [11] and round_record.aggregated is False
    # the kept global adapter is what `latest` holds
    from fedtune.checkpoint import load_adapter

    kept = load_adapter(tmp_path / "latest")
    assert float(kept[KEYS[0]].abs().sum()) == 0.0


def test_bf16_transport_halves_the_array_bytes_and_aggregates_in_fp32(tmp_path):
    strategy, _ = make_strategy(
        tmp_path, **{"model.transport-dtype": "bfloat16", "comm.transport": "per-tensor"}
    )
    sent = configure(strategy)
    wire = sent[0].content["arrays"]
    assert all(np.dtype(a.dtype) == np.uint16 for a in wire.values())
    fp32_bytes = record(0.0, 0.0).count_bytes()
    header_and_keys = sum(
        npy_bytes(np.zeros(s, np.float32)) - 4 * 6 + len(k)
        for k, s in zip(KEYS, [(2, 3), (3, 2)], strict=False)
    )
    assert wire.count_bytes() - header_and_keys == (fp32_bytes - header_and_keys) // 2

    from fedtune.model import arrays_to_state, state_to_arrays

    def bf16(a, b):
        return state_to_arrays(arrays_to_state(record(a, b)), "bfloat16")

    arrays, _ = strategy.aggregate_train(
        1, [reply_to(sent[0], bf16(1.0, 2.0), 1), reply_to(sent[1], bf16(3.0, 4.0), 1)]
    )
    assert unpacked(arrays)[KEYS[0]].dtype == np.float32
    np.testing.assert_allclose(unpacked(arrays)[KEYS[0]], 2.0)
    np.testing.assert_allclose(unpacked(arrays)[KEYS[1]], 3.0)


def test_ledger_carries_bytes_over_a_resume():
    ledger = CommLedger(carried_bytes=100)
    ledger.record_down(4, 1, 10)
    ledger.record_up(4, 1, 5)
    assert ledger.total_bytes == 115 and ledger.cumulative_bytes(3) == 100


def test_replies_checked_on_arrival_are_not_checked_again(tmp_path, monkeypatch):
    import serverapp.strategy as strategy_module

    strategy, _ = make_strategy(tmp_path)
    sent = configure(strategy)
    for message in sent:  # the ids Flower's push gives them, which the replies then answer to
        message.metadata.__dict__["_message_id"] = message.object_id
    good = reply_to(sent[0], record(2.0, 2.0), 10)
    bad = reply_to(sent[1], record(float("nan"), 1.0), 10)
    for reply in (good, bad):  # what TimedGrid does in each reply's puller thread
        strategy.check_on_arrival(reply)
    calls = []
    real_check = strategy_module.check_reply
    monkeypatch.setattr(strategy_module, "check_reply", lambda *a: calls.append(a) or real_check(*a))

    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert calls == []  # both results came from the arrival checks
    np.testing.assert_allclose(unpacked(arrays)[KEYS[0]], 2.0)
    assert strategy.results.results.rounds[0].rejected == {"22": "non-finite"}

    # a check made for another reply object to the same message is not taken for this one
    sent = configure(strategy, server_round=2)
    sent[0].metadata.__dict__["_message_id"] = sent[0].object_id
    strategy.check_on_arrival(reply_to(sent[0], record(float("nan"), 1.0), 10))
    before = len(calls)
    arrays, _ = strategy.aggregate_train(2, [reply_to(sent[0], record(3.0, 3.0), 10)])
    assert len(calls) == before + 1
    np.testing.assert_allclose(unpacked(arrays)[KEYS[0]], 3.0)
