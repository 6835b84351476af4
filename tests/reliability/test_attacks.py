"""Issue 13 items 3-5: a participant crafts its reply to crash, steer or stop the aggregate. Each attack goes
through the real strategy (FedTuneAvg.configure_train -> Flower Messages and ArrayRecords ->
aggregate_train) and must end with the reply rejected for a counted reason, the run going on, and the global
adapter either unchanged or averaged only from honest replies. docs/reliability.md lists them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import packing
from fedtune.config import FedTuneConfig
from fedtune.results import ResultsFile, RunResults
from serverapp.strategy import FedTuneAvg
from tests.unit.test_strategy import _message_identity

__all__ = ["_message_identity"]  # the autouse fixture (message identity), re-exported

NODES = [11, 22, 33]
SHAPES = {"layer.0.lora_A.weight": (4, 8), "layer.0.lora_B.weight": (8, 4), "layer.1.lora_A.weight": (4, 8)}


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in SHAPES.items()}


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def strategy_and_round(tmp_path, nodes=NODES, **overrides):
    run_config = {"strategy.fraction-train": 1.0, "train.save-every-round": 1,
                  "strategy.min-train-nodes": 1, "strategy.min-available-nodes": 1, **overrides}
    cfg = FedTuneConfig.from_run_config(run_config)
    strategy = FedTuneAvg(cfg, ResultsFile(tmp_path, RunResults(run_id=1, config=cfg.to_dict())))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: (nodes, nodes))
        sent = list(strategy.configure_train(1, packing.per_tensor(global_state()), ConfigRecord(), Grid(nodes)))
    return strategy, sent


def honest(delta: float = 0.01) -> dict[str, np.ndarray]:
    return {k: v + np.float32(delta) for k, v in global_state().items()}


def metrics(num_examples=100, **extra) -> MetricRecord:
    return MetricRecord({"num-examples": num_examples, "train-loss": 1.5, **extra})


def reply(sent: Message, arrays: ArrayRecord | None, metric_record: MetricRecord | None = None, **more) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    content["metrics"] = metric_record if metric_record is not None else metrics()
    for name, record in more.items():
        content[name] = record
    return Message(content, reply_to=sent)


def run_round(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.finish()
    return arrays, strategy.results.results.rounds[-1]


def assert_global_is(arrays: ArrayRecord | None, expected: dict[str, np.ndarray]) -> None:
    assert arrays is not None
    got = packing.unpack(arrays).arrays
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, rtol=0, atol=1e-6)


# ---- item 3: shape/dtype from the data, not the metadata ------------------------------------------------


def lying_array(values: np.ndarray, declared_shape) -> Array:
    real = Array(values)
    return Array(dtype=real.dtype, shape=tuple(declared_shape), stype=real.stype, data=real.data)


def test_declared_shape_with_a_smaller_payload_is_rejected_and_the_run_goes_on(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    state = honest()
    first = next(iter(SHAPES))
    bad = {k: Array(v) for k, v in state.items()}
    bad[first] = lying_array(state[first][:1], SHAPES[first])  # declares (4, 8), carries (1, 8)
    replies = [reply(sent[0], ArrayRecord(bad)), reply(sent[1], packing.pack(honest(0.02)))]
    arrays, record = run_round(strategy, replies)
    assert record.rejected == {"11": "wrong-shape"} and record.rejections == {"wrong-shape": 1}
    assert_global_is(arrays, honest(0.02))


def test_declared_shape_lie_as_the_only_reply_keeps_the_global(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11])
    state = honest()
    first = next(iter(SHAPES))
    bad = {k: Array(v) for k, v in state.items()}
    bad[first] = lying_array(state[first][:1], SHAPES[first])
    arrays, record = run_round(strategy, [reply(sent[0], ArrayRecord(bad))])
    assert arrays is None and record.rejected == {"11": "wrong-shape"} and not record.aggregated


def test_a_packed_reply_with_a_lying_manifest_is_rejected(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    record = packing.pack(honest())
    manifest = json.loads(record[packing.MANIFEST_KEY].numpy().tobytes())
    manifest["tensors"][0]["shape"] = [2, 8]  # claims fewer elements: the rest would shift
    record[packing.MANIFEST_KEY] = Array(np.frombuffer(json.dumps(manifest).encode(), np.uint8))
    arrays, result = run_round(strategy, [reply(sent[0], record), reply(sent[1], packing.pack(honest()))])
    assert result.rejected == {"11": "bad-packing"}
    assert_global_is(arrays, honest())


def test_a_wrong_dtype_inside_a_packed_reply_is_rejected(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    half = {k: v.astype(np.float16) for k, v in honest().items()}
    _, result = run_round(strategy, [reply(sent[0], packing.pack(half)), reply(sent[1], packing.pack(honest()))])
    assert result.rejected == {"11": "wrong-dtype"}


def test_an_old_per_tensor_reply_is_still_accepted_in_a_packed_run(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    assert packing.is_packed(sent[0].content["arrays"])
    arrays, result = run_round(
        strategy, [reply(sent[0], packing.per_tensor(honest(0.01))), reply(sent[1], packing.pack(honest(0.03)))]
    )
    assert not result.rejected and result.aggregated
    assert_global_is(arrays, honest(0.02))


# ---- item 4: poisoning within the checks -----------------------------------------------------------------


def test_a_huge_example_count_cannot_take_over_the_aggregate(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    evil = {k: np.full_like(v, 0.5) for k, v in global_state().items()}
    replies = [reply(sent[0], packing.pack(evil), metrics(1e300)), reply(sent[1], packing.pack(honest()))]
    arrays, record = run_round(strategy, replies)
    assert record.rejected == {"11": "num-examples-over-cap"}
    assert_global_is(arrays, honest())


def test_two_nodes_at_1e308_cannot_overflow_the_aggregate_to_zero(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    replies = [reply(m, packing.pack(honest()), metrics(1e308)) for m in sent]
    arrays, record = run_round(strategy, replies)
    assert arrays is None and not record.aggregated
    assert record.rejections == {"num-examples-over-cap": 2}
    assert strategy.results.results.rejections == {"num-examples-over-cap": 2}  # the run's tally


def test_an_example_count_far_above_the_median_is_rejected(tmp_path):
    strategy, sent = strategy_and_round(tmp_path)  # 3 nodes: a median that means something
    counts = {11: 100, 22: 120, 33: 50_000}
    replies = [reply(m, packing.pack(honest()), metrics(counts[m.metadata.dst_node_id])) for m in sent]
    _, record = run_round(strategy, replies)
    assert record.rejected == {"33": "num-examples-outlier"}


def test_values_of_3e38_pass_finiteness_but_not_the_update_norm_bound(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    evil = {k: np.full_like(v, 3e38) for k, v in global_state().items()}
    arrays, record = run_round(strategy, [reply(sent[0], packing.pack(evil)), reply(sent[1], packing.pack(honest()))])
    assert record.rejected == {"11": "update-norm"}
    assert_global_is(arrays, honest())


def test_a_moderately_large_update_is_bounded_too(tmp_path):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in global_state().values()))
    push = 3.0 * max(norm, 1.0) / np.sqrt(sum(np.prod(s) for s in SHAPES.values()))  # ||delta|| = 3 x bound/2
    evil = {k: v + np.float32(push) for k, v in global_state().items()}
    _, record = run_round(strategy, [reply(sent[0], packing.pack(evil)), reply(sent[1], packing.pack(honest()))])
    assert record.rejected == {"11": "update-norm"}


def test_a_non_finite_average_never_becomes_the_global(tmp_path, monkeypatch):
    from fedtune import adapter_math

    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    real_average = adapter_math.weighted_average

    def overflowing(updates, weights):  # what float32 accumulation could produce on another path
        result = real_average(updates, weights)
        first = next(iter(result))
        result[first] = np.full_like(result[first], np.inf)
        return result

    monkeypatch.setattr(adapter_math, "weighted_average", overflowing)
    arrays, record = run_round(strategy, [reply(m, packing.pack(honest())) for m in sent])
    assert arrays is None and not record.aggregated
    assert record.aggregate_rejection == "aggregate-non-finite"
    from fedtune.checkpoint import load_adapter

    kept = load_adapter(tmp_path / "latest")  # the previous global, unchanged
    for key, values in global_state().items():
        assert kept[key].numpy().tobytes() == values.tobytes()


# ---- item 5: one node cannot abort the run -------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: reply(m, packing.pack(honest()), metrics(**{"evil-key": 1.0})), "unexpected-metric"),
        (lambda m: reply(m, packing.pack(honest()), MetricRecord({"num-examples": 10, "train-loss": [1.0, 2.0]})),
         "bad-metric"),
        (lambda m: reply(m, packing.pack(honest()), MetricRecord({"num-examples": 10, "train-loss": float("nan")})),
         "bad-metric"),
        (lambda m: reply(m, packing.pack(honest()), MetricRecord({"num-examples": 10})), "missing-metric"),
        (lambda m: reply(m, packing.pack(honest()), MetricRecord({"train-loss": 1.0})), "missing-num-examples"),
        (lambda m: reply(m, packing.pack(honest()), extra=MetricRecord({"x": 1.0})), "unexpected-records"),
        (lambda m: reply(m, packing.pack(honest()), more=ArrayRecord({"x": Array(np.zeros(1))})),
         "unexpected-records"),
        (lambda m: reply(m, packing.pack(honest()), cfg=ConfigRecord({"x": 1})), "unexpected-records"),
        (lambda m: reply(m, None), "missing-arrays"),
    ],
)
def test_malformed_replies_are_rejected_not_fatal(tmp_path, make, reason):
    strategy, sent = strategy_and_round(tmp_path, nodes=[11, 22])
    arrays, record = run_round(strategy, [make(sent[0]), reply(sent[1], packing.pack(honest()))])
    assert record.rejected == {"11": reason}
    assert record.aggregated and record.train_loss == pytest.approx(1.5)
    assert_global_is(arrays, honest())
