"""The fedtune ClientApp: receive the global adapter, train it locally, reply with the update.

Flower starts a fresh ClientApp process for every message, so each round loads the (4-bit) base
model anew, unless the SuperNode runs a warm trainer (`fedtune-supernode --warm-trainer`) that keeps it
loaded; see docs/performance.md.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clientapp import warm_client
from clientapp.round import run_round
from fedtune.config import FedTuneConfig
from fedtune.logs import configure_logging

log = logging.getLogger("fedtune.clientapp")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FedTuneConfig.from_run_config(context.run_config)
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])
    configure_logging(run_id=msg.metadata.run_id, round=server_round, node_id=context.node_id)
    learning_rate = float(round_config["learning-rate"])
    transport_dtype = str(round_config.get("transport-dtype", cfg.model.transport_dtype))

    node_config = dict(context.node_config)
    global_arrays: ArrayRecord = msg.content["arrays"]

    result = None
    service = warm_client.socket_path(node_config)
    if service:  # a node-local warm trainer keeps the model loaded across rounds (docs/performance.md)
        result = warm_client.train_remote(
            service, dict(context.run_config), node_config,
            {
                "server-round": server_round,
                "learning-rate": learning_rate,
                "transport-dtype": transport_dtype,
            },
            global_arrays,
        )
    if result is None:
        result = run_round(cfg, node_config, server_round, learning_rate, transport_dtype, global_arrays)
    arrays, metrics, _ = result
    log.info(
        "round %d: loss %.4f over %d steps, %.1f tokens/s",
        server_round, metrics["train-loss"], metrics["train-steps"], metrics["tokens-per-second"],
    )
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)
