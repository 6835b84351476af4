"""The server's side of a codec: encode the float32 global for the download, and turn each reply back into
a float32 adapter (global + decoded delta, or the decoded values) that FedAvg averages as before.

Averaging (global + delta_i) weighted by examples is exactly global + the weighted mean delta: the server's
copy never passes through a lossy codec, so download rounding does not accumulate in the global."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import numpy as np

from fedtune.codecs import CodecSpec, decode_state, encode_state, layout, problem
from fedtune.codecs.node import (
    SHAPES_KEY,
    TAG_RECORD,
    numpy_to_record,
    record_to_numpy,
    shapes_manifest,
)

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, RecordDict


def encode_global(global_arrays: ArrayRecord, spec: CodecSpec) -> tuple[ArrayRecord, dict[str, object]]:
    """The download's arrays (per-tensor record) and the round config's `codec-*` keys (to decode them)."""
    encoded, config = encode_global_state({k: a.numpy() for k, a in global_arrays.items()}, spec)
    return numpy_to_record(encoded), config


def encode_global_state(
    global_state: Mapping[str, np.ndarray], spec: CodecSpec
) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The same on plain float32 arrays (the strategy packs the result for the round's transport)."""
    shapes = {k: tuple(global_state[k].shape) for k in spec.sent_keys(global_state)}
    state = {k: global_state[k] for k in shapes}
    config: dict[str, object] = {**spec.to_config(), SHAPES_KEY: shapes_manifest(shapes)}
    return encode_state(state, spec.download, spec.block_size), config


def upload_template(global_state: Mapping[str, np.ndarray], spec: CodecSpec) -> dict[str, np.ndarray]:
    """Zero arrays in the layout a reply must have (for the size bounds the validation sets)."""
    return {
        name: np.zeros(shape, dtype)
        for key in spec.sent_keys(global_state)
        for name, shape, dtype in layout(spec.upload, key, tuple(global_state[key].shape), spec.block_size)
    }


def decode_reply(
    content: RecordDict, global_arrays: ArrayRecord, spec: CodecSpec
) -> tuple[ArrayRecord | None, str | None]:
    """(the node's adapter in float32, None), or (None, why the reply is refused)."""
    tag = content.config_records.get(TAG_RECORD)
    global_state = {k: a.numpy() for k, a in global_arrays.items()}
    arrays = cast("ArrayRecord", content["arrays"])
    adapter, reason = decode_reply_arrays(record_to_numpy(arrays), tag, global_state, spec)
    return (numpy_to_record(adapter) if adapter is not None else None), reason


def decode_reply_arrays(
    encoded: Mapping[str, np.ndarray],
    tag: Mapping[str, object] | None,
    global_state: Mapping[str, np.ndarray],
    spec: CodecSpec,
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The same on plain arrays (what a packed or per-tensor record unpacks to): `tag` is the reply's codec
    ConfigRecord, `global_state` the round's float32 global adapter (every key)."""
    if tag is None:
        return None, "codec-mismatch"
    try:
        if CodecSpec.from_config(tag) != spec:
            return None, "codec-mismatch"
    except (TypeError, ValueError):
        return None, "codec-mismatch"
    shapes = {k: tuple(global_state[k].shape) for k in spec.sent_keys(global_state)}
    reason = problem(encoded, shapes, spec.upload, spec.block_size)
    if reason is not None:
        return None, reason
    decoded = decode_state(encoded, shapes, spec.upload, spec.block_size)
    adapter: dict[str, np.ndarray] = {}
    for key, values in global_state.items():
        current = np.asarray(values, np.float32)
        if key not in decoded:  # frozen under FFA-LoRA: the global's value
            adapter[key] = current
        elif spec.upload_is_delta:
            with np.errstate(over="ignore"):  # an overflow is refused just below
                adapter[key] = current + decoded[key]
        else:
            adapter[key] = decoded[key]
        if not np.all(np.isfinite(adapter[key])):
            return None, "non-finite"
    return adapter, None
