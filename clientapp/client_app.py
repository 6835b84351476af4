"""The fedtune ClientApp: receive the global adapter, train it locally, reply with the update.

Flower starts a fresh ClientApp process for every message, so each round loads the (4-bit) base
model anew; see README "Round overhead" for how a node keeps that cheap.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clientapp.trainer import train_one_round
from fedtune.config import FedTuneConfig
from fedtune.dataset import load_node_dataset
from fedtune.logs import configure_logging
from fedtune.model import (
    adapter_state,
    arrays_to_state,
    load_adapter_state,
    load_tokenizer,
    load_trainable_model,
    pick_device,
    state_to_arrays,
)

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

    trainset, skipped = load_node_dataset(
        cfg.dataset.name, dict(context.node_config), cfg.dataset.num_partitions
    )
    device = pick_device()
    tokenizer = load_tokenizer(cfg.model)
    model = load_trainable_model(cfg.model, device)
    global_arrays: ArrayRecord = msg.content["arrays"]
    load_adapter_state(model, arrays_to_state(global_arrays))

    outcome = train_one_round(
        model, tokenizer, trainset, cfg.train, learning_rate, device, cfg.model.gradient_checkpointing
    )
    log.info(
        "round %d: loss %.4f over %d steps, %.1f tokens/s",
        server_round, outcome.train_loss, outcome.steps, outcome.tokens_per_second,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(trainset),
            "train-loss": outcome.train_loss,
            "train-steps": outcome.steps,
            "train-seconds": outcome.seconds,
            "train-tokens": outcome.tokens,
            "tokens-per-second": outcome.tokens_per_second,
            "peak-memory-bytes": outcome.peak_memory_bytes,
            "skipped-rows": skipped,
            "partition-id": int(context.node_config.get("partition-id", -1)),
        }
    )
    reply = RecordDict(
        {"arrays": state_to_arrays(adapter_state(model), transport_dtype), "metrics": metrics}
    )
    return Message(reply, reply_to=msg)
