"""The fedtune ClientApp: receive the global adapter, train it locally, reply with the update.

Flower starts a fresh ClientApp process for every message, so each round loads the (4-bit) base
model anew, unless the SuperNode runs a warm trainer (`fedtune-supernode --warm-trainer`) that keeps it
loaded; see docs/performance.md.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clientapp.round import NodeCache, run_round
from clientapp.warm import client as warm_client
from clientapp.warm.protocol import socket_path
from fedtune.codecs import node as codecs
from fedtune.config import FedTuneConfig
from fedtune.logs import configure_logging
from fedtune.round_config import RoundConfig

log = logging.getLogger("fedtune.clientapp")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started_at = time.time()
    cfg = FedTuneConfig.from_run_config(context.run_config)
    round_config = RoundConfig.from_config_record(cast(ConfigRecord, msg.content["config"]))
    configure_logging(run_id=msg.metadata.run_id, round=round_config.server_round, node_id=context.node_id)
    node_config = dict(context.node_config)
    global_arrays = cast(ArrayRecord, msg.content["arrays"])
    # issue 18 (comm.codec): the trainer gets the global in float32; the reply is encoded below
    codec, global_arrays = codecs.receive_global(global_arrays, round_config.codec, round_config.transport)

    remote = None
    service = socket_path(node_config)
    if service:  # a node-local warm trainer keeps the model loaded across rounds (docs/performance.md)
        remote = warm_client.train_remote(
            service, dict(context.run_config), node_config, round_config.to_dict(), global_arrays
        )
    if remote is not None:
        arrays, metrics = remote[0], remote[1]["metrics"]
    else:
        arrays, metrics, _ = run_round(cfg, node_config, round_config, global_arrays, NodeCache())
    log.info(
        "round %d: loss %.4f over %d steps, %.1f tokens/s",
        round_config.server_round, metrics["train-loss"], metrics["train-steps"],
        metrics["tokens-per-second"],
    )
    # a delta from the global + the error feedback kept in context.state, in the codec (none: unchanged)
    arrays, codec_tag = codecs.reply_update(
        arrays, global_arrays, codec, context.state, round_config.transport
    )
    metrics = {**metrics, "at-clientapp-started": started_at, "at-replied": time.time()}
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if codec_tag is not None:
        reply[codecs.TAG_RECORD] = codec_tag
    return Message(reply, reply_to=msg)
