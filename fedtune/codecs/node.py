"""The node's side of a codec: decode the global it received, encode its update as a delta from that global
with error feedback, carry the feedback residual in the node's `context.state` between its rounds.

Error feedback (EF): what quantisation dropped from this round's delta is added to the node's next delta,
so over rounds the server receives the node's full movement, not a biased rounding of it. The residual lives
in the SuperNode's memory (`context.state`, per run and node): a restarted SuperNode starts again from zero,
which only costs the dropped remainder of one round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedtune.codecs import CodecSpec, Shape, decode_state, encode_state, problem

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

RESIDUAL_RECORD = "codec-residual"  # context.state: the node's error-feedback residual (float32 arrays)
TAG_RECORD = "codec"  # reply content: the CodecSpec the node encoded with (ConfigRecord)
SHAPES_KEY = "codec-shapes"  # round config: JSON {key: shape} of the tensors sent (4-bit codes are flat)


def shapes_manifest(shapes: Mapping[str, Shape]) -> str:
    return json.dumps({k: list(s) for k, s in shapes.items()}, separators=(",", ":"))


def read_shapes(config: Mapping[str, object]) -> dict[str, Shape]:
    return {k: tuple(int(n) for n in s) for k, s in json.loads(str(config[SHAPES_KEY])).items()}


def encode_update(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    spec: CodecSpec,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The upload's arrays and the residual to keep for the node's next round (None: nothing to keep)."""
    if not spec.upload_is_delta:
        return encode_state(trained, "none", spec.block_size), None
    residual = residual or {}
    target = {}
    for key, values in trained.items():
        delta = np.asarray(values, np.float32) - np.asarray(received[key], np.float32)
        carried = residual.get(key)
        if carried is not None and carried.shape == delta.shape:
            delta = delta + carried
        target[key] = delta
    encoded = encode_state(target, spec.upload, spec.block_size)
    shapes = {k: v.shape for k, v in target.items()}
    sent = decode_state(encoded, shapes, spec.upload, spec.block_size)
    return encoded, {k: target[k] - sent[k] for k in target}


# ---- Flower records ------------------------------------------------------------------------------


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a packed or per-tensor record (fedtune/packing.py), from their real data."""
    from fedtune import packing

    return packing.unpack(record).arrays


def numpy_to_record(arrays: Mapping[str, np.ndarray], transport: str = "per-tensor") -> ArrayRecord:
    from fedtune import packing

    return packing.to_record(arrays, transport)


def receive_global(
    arrays: ArrayRecord, codec_config: Mapping[str, object], transport: str = "per-tensor"
) -> tuple[CodecSpec, ArrayRecord]:
    """The round's codec (from the round config's `codec-*` keys) and the global adapter it carries, decoded
    to float32 (B only under FFA-LoRA) in the round's transport form; unchanged without a codec."""
    spec = CodecSpec.from_config(codec_config)
    if not spec.active:
        return spec, arrays
    return spec, numpy_to_record(decode_global(record_to_numpy(arrays), codec_config, spec), transport)


def decode_global(
    encoded: Mapping[str, np.ndarray], round_config: Mapping[str, object], spec: CodecSpec
) -> dict[str, np.ndarray]:
    """The same on plain arrays (what a packed or per-tensor record unpacks to)."""
    shapes = read_shapes(round_config)
    reason = problem(encoded, shapes, spec.download, spec.block_size)
    if reason is not None:
        raise ValueError(f"the global adapter is not a valid {spec.download} encoding: {reason}")
    return decode_state(encoded, shapes, spec.download, spec.block_size)


def reply_update(
    trained: ArrayRecord,
    received: ArrayRecord,
    spec: CodecSpec,
    state: RecordDict,
    transport: str = "per-tensor",
) -> tuple[ArrayRecord, ConfigRecord | None]:
    """The reply's arrays (in the round's transport form) and codec tag; updates the error-feedback residual
    in `state` (the node's context.state). Without a codec: `trained` unchanged, no tag."""
    from flwr.app import ConfigRecord

    if not spec.active:
        return trained, None
    previous = state.array_records.get(RESIDUAL_RECORD)
    residual = record_to_numpy(previous) if previous is not None else None
    encoded, kept = encode_update(record_to_numpy(trained), record_to_numpy(received), spec, residual)
    if kept is not None:
        state[RESIDUAL_RECORD] = numpy_to_record(kept)
    return numpy_to_record(encoded, transport), ConfigRecord(spec.to_config())
