"""A train Message and its Context as a SuperNode hands them to the ClientApp, for calling the ClientApp's
`train` directly in one process (the round benchmark, tests) without a SuperLink. A bench/test helper: it
is not shipped in the package or the FAB."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, Message


def train_message(
    arrays: ArrayRecord,
    round_config: dict[str, Any],
    node_config: dict[str, Any],
    run_config: dict[str, Any],
) -> tuple[Message, Context]:
    """`round_config`: what the server sends each round (server-round, learning-rate, transport-dtype)."""
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    metadata = Metadata(
        run_id=1,
        message_id="local",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(round_config)})
    context = Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config=run_config)
    # the form the SuperNode itself uses (a Message with given metadata): not among Flower's public overloads
    build_message = cast(Any, Message)
    return build_message(content, metadata=metadata), context
