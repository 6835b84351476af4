"""A ClientApp that misbehaves on purpose: what it sends is picked by (server round, partition-id).

It never trains (no model is loaded), so a round costs a process start and a few numpy operations.
`SCHEDULE[round][partition]` is the kind of reply; the tests read the same table.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import packing

# kind -> the reason FedTuneAvg must record (None: accepted; "failed": an error reply)
EXPECTED = {
    "nan": "non-finite",
    "inf": "non-finite",
    "wrong-keys": "wrong-keys",
    "wrong-shape": "wrong-shape",
    "wrong-dtype": "wrong-dtype",
    "oversize": "oversize",
    "zero-examples": "bad-num-examples",
    "negative-examples": "bad-num-examples",
    "missing-arrays": "missing-arrays",
    "crash": "failed",
    "honest": None,
}
SCHEDULE = {
    1: ("nan", "inf"),
    2: ("wrong-keys", "wrong-shape"),
    3: ("wrong-dtype", "oversize"),
    4: ("zero-examples", "negative-examples"),
    5: ("honest", "crash"),
}
HONEST_DELTA = np.float32(0.001)

app = ClientApp()


def bad_arrays(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    first = next(iter(arrays))
    if kind == "nan":
        return {k: (np.full_like(v, np.nan) if k == first else v) for k, v in arrays.items()}
    if kind == "inf":
        return {k: (np.full_like(v, np.inf) if k == first else v) for k, v in arrays.items()}
    if kind == "wrong-keys":
        renamed = {f"{k}.evil" if k == first else k: v for k, v in arrays.items()}
        return renamed
    if kind == "wrong-shape":  # same number of bytes, transposed
        return {k: (np.ascontiguousarray(v.T) if k == first else v) for k, v in arrays.items()}
    if kind == "wrong-dtype":  # half the bytes: not caught as oversize
        return {k: v.astype(np.float16) for k, v in arrays.items()}
    if kind == "oversize":
        return {k: (np.concatenate([v] * 8) if k == first else v) for k, v in arrays.items()}
    if kind == "honest":
        return {k: v + HONEST_DELTA for k, v in arrays.items()}
    return arrays


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    kinds = SCHEDULE.get(server_round, ("honest", "honest"))
    kind = kinds[partition % len(kinds)]
    print(f"badapp: round {server_round} partition {partition} sends {kind}", flush=True)
    if kind == "crash":
        raise RuntimeError("badapp: crashing on purpose")
    # the global comes packed (comm.transport default); the bad replies go back in the old per-tensor
    # form, which the server must still validate and reject (or accept) by the same rules
    arrays = {k: np.array(v) for k, v in packing.unpack(msg.content["arrays"]).arrays.items()}
    num_examples = {"zero-examples": 0, "negative-examples": -5}.get(kind, 1)
    content = RecordDict(
        {"metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "partition-id": partition})}
    )
    if kind != "missing-arrays":
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad_arrays(kind, arrays).items()})
    return Message(content, reply_to=msg)
