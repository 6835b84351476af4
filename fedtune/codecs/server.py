"""The server's side of a codec: encode the float32 global for the download, and turn each reply back into
a float32 adapter (global + decoded delta, or the decoded values) that FedAvg averages as before.

Averaging (global + delta_i) weighted by examples is exactly global + the weighted mean delta: the server's
copy never passes through a lossy codec, so download rounding does not accumulate in the global."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedtune.codecs import CodecSpec, Shape, decode_state, encode_state, problem
from fedtune.codecs.node import TAG_RECORD, numpy_to_record, record_to_numpy, shapes_manifest

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, RecordDict


def sent_shapes(global_arrays: ArrayRecord, spec: CodecSpec) -> dict[str, Shape]:
    return {k: tuple(global_arrays[k].shape) for k in spec.sent_keys(global_arrays.keys())}


def encode_global(global_arrays: ArrayRecord, spec: CodecSpec) -> tuple[ArrayRecord, dict[str, object]]:
    """The download's arrays, and what the round config must carry for a node to decode them."""
    shapes = sent_shapes(global_arrays, spec)
    state = {k: global_arrays[k].numpy() for k in shapes}
    config: dict[str, object] = {**spec.to_config(), "codec-shapes": shapes_manifest(shapes)}
    return numpy_to_record(encode_state(state, spec.download, spec.block_size)), config


def decode_reply(
    content: RecordDict, global_arrays: ArrayRecord, spec: CodecSpec
) -> tuple[ArrayRecord | None, str | None]:
    """(the node's adapter in float32, None), or (None, why the reply is refused)."""
    tag = content.config_records.get(TAG_RECORD)
    if tag is None:
        return None, "codec-mismatch"
    try:
        if CodecSpec.from_config(tag) != spec:
            return None, "codec-mismatch"
    except (TypeError, ValueError):
        return None, "codec-mismatch"
    shapes = sent_shapes(global_arrays, spec)
    encoded = record_to_numpy(content["arrays"])
    reason = problem(encoded, shapes, spec.upload, spec.block_size)
    if reason is not None:
        return None, reason
    decoded = decode_state(encoded, shapes, spec.upload, spec.block_size)
    adapter: dict[str, np.ndarray] = {}
    for key, array in global_arrays.items():
        current = array.numpy().astype(np.float32, copy=False)
        if key not in decoded:  # frozen under FFA-LoRA: the global's value
            adapter[key] = current
        elif spec.upload_is_delta:
            with np.errstate(over="ignore"):  # an overflow is refused just below
                adapter[key] = current + decoded[key]
        else:
            adapter[key] = decoded[key]
        if not np.all(np.isfinite(adapter[key])):
            return None, "non-finite"
    return numpy_to_record(adapter), None

