"""The round contract end to end in one process: FedTuneAvg's real train Messages -> the real ClientApp
`train()` (tiny model, real training) -> its replies -> aggregate_train, for two rounds, in both transports.
The network hops are the e2e tests' job; this pins what crosses them: the packed (or per-tensor) adapter
both ways, RoundConfig, the reply metrics and stamps, and round 2 sending the packed aggregate as is."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

import clientapp.client_app as client_app
from fedtune import packing
from fedtune.config import FedTuneConfig
from fedtune.model import initial_adapter_state, state_to_arrays
from fedtune.results import ResultsFile, RunResults
from fedtune.round_config import REPLY_METRICS
from serverapp.strategy import FedTuneAvg
from tests.conftest import per_message_bytes, sent_message_bytes, tiny_run_config
from tests.unit.test_strategy import _message_identity

__all__ = ["_message_identity"]

NODES = [11, 22]


class Grid:
    def get_node_ids(self):
        return list(NODES)


@pytest.mark.parametrize("transport", ["packed", "per-tensor"])
def test_two_rounds_through_the_real_clientapp(tmp_path, tiny_model_dir, monkeypatch, transport):
    config = tiny_run_config(tiny_model_dir, **{"num-server-rounds": 2, "train.max-steps": 1,
                                                "comm.transport": transport})
    cfg = FedTuneConfig.from_run_config(config)
    results = ResultsFile(tmp_path, RunResults(run_id=1, config=cfg.to_dict()))
    strategy = FedTuneAvg(cfg, results)
    monkeypatch.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, _min, size: (NODES, NODES))
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 2},
                   state=RecordDict(), run_config=config)
        for i, n in enumerate(NODES)
    }
    initial = initial_adapter_state(cfg.model, cfg.train.seed)
    arrays = state_to_arrays(initial, "float32")
    for server_round in (1, 2):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid()))
        assert packing.is_packed(sent[0].content["arrays"]) == (transport == "packed")
        if server_round == 2 and transport == "packed":
            assert sent[0].content["arrays"] is arrays  # the aggregate goes out as is
        replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in sent]
        for reply in replies:
            assert packing.is_packed(reply.content["arrays"]) == (transport == "packed")
            assert set(reply.content["metrics"]) <= set(REPLY_METRICS)
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and metrics is not None
    strategy.finish()

    run = results.results
    per_message, sent_bytes = per_message_bytes(config), sent_message_bytes(config)
    assert run.budget_bytes == per_message * 2 * 2 * 2 and run.sent_bytes == sent_bytes * 2 * 2 * 2
    for record in run.rounds:
        assert record.aggregated and not record.rejected and record.checkpoint_written_at
        for node in record.nodes.values():
            line = node.timeline
            assert line.clientapp_started <= line.adapter_in <= line.trained <= line.clientapp_replied
            assert node.status == "accepted" and node.train_steps == 1 and node.partition_id in (0, 1)
    final = packing.unpack(arrays).arrays
    assert set(final) == set(initial)
    assert any(not np.array_equal(final[k], initial[k].numpy()) for k in final)  # it trained
