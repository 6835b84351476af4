"""Reject a client update before it can touch the global adapter: the reply is refused, never the run.

Every check runs on what arrived, not on what it declares: the arrays are unpacked (fedtune/packing.py,
either transport form) and their real dtype, shape and values are checked against the global adapter the
round sent. A rejection is a short reason code (a metric label; results.json counts them per round and run):

    unexpected-records    the reply holds other records than {"arrays", "metrics"} (+ issue 18's "codec")
    missing-arrays        no "arrays" record
    missing-num-examples  no "num-examples" metric (or no "metrics" record at all)
    missing-metric        another required metric (train-loss) is absent
    unexpected-metric     a metric key outside the reply contract (fedtune.round_config.REPLY_METRICS)
    bad-metric            a metric that is not one finite scalar (a list, NaN, Inf, a bool)
    bad-num-examples      num-examples not > 0
    num-examples-over-cap num-examples above `strategy.max-num-examples`
    num-examples-outlier  num-examples above MEDIAN_FACTOR x the median of the round's replies (>= 3 of them)
    oversize              the arrays' bytes exceed the expected message by more than OVERSIZE_FACTOR
    bad-packing           a packed record whose manifest or buffers do not describe an adapter
    wrong-keys            tensor names differ from the global adapter's
    wrong-shape           a tensor's real shape differs (declared metadata is never trusted)
    wrong-dtype           a tensor's real dtype is not the round's transport dtype
    non-finite            NaN or Inf in a tensor
    update-norm           ||update - global|| > `strategy.max-update-ratio` x max(||global||, 1)
    codec-mismatch        (comm.codec runs) the reply's codec tag is absent or not the run's codec
    bad-scales            (comm.codec runs) block scales NaN, Inf, negative, or of the wrong length/dtype
    bad-codes             (comm.codec runs) a code outside the codec's range

After averaging, `aggregate_is_finite` must hold before the result becomes the global adapter (a weighted
sum of finite values can still overflow float32); otherwise the round keeps the previous global.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedtune import adapter_math, packing
from fedtune.codecs import CodecSpec
from fedtune.codecs.server import decode_reply_arrays
from fedtune.round_config import (
    REPLY_ARRAYS_KEY,
    REPLY_METRICS,
    REPLY_METRICS_KEY,
    REPLY_REQUIRED_METRICS,
)

if TYPE_CHECKING:
    from flwr.app import RecordDict

WEIGHT_KEY = "num-examples"
CODEC_TAG_RECORD = "codec"  # issue 18: the CodecSpec a node encoded with (optional ConfigRecord)
# The arrays may exceed the expected message by at most this much before they are refused unread.
OVERSIZE_FACTOR = 1.10
# A node claims how many examples it trained on and FedAvg weights by it: `strategy.max-num-examples`
# (default 1,000,000; a reference partition has 2,600) caps the claim.
# With >= 3 replies, a claim this many times the round's median is refused (with 2, the cap and the norm
# bound below are what limits one node: a median of two cannot tell which one lies).
MEDIAN_FACTOR = 10.0
MEDIAN_MIN_REPLIES = 3
# One round of local training moves the adapter by a fraction of its norm (lr <= 5e-5 in the reference);
# `strategy.max-update-ratio` (default 2) refuses an update further than that from the global, whatever
# weight it claims: a node within the weight cap still moves the global by a bounded step at most.


@dataclass(frozen=True)
class Expected:
    """What a reply to this round must carry: the global adapter's tensors in the transport dtype."""

    specs: dict[str, tuple[tuple[int, ...], np.dtype]]  # name -> (shape, wire dtype)
    global_state: Mapping[str, np.ndarray]  # float32, what the round sent (before wire rounding)
    max_bytes: dict[str, int]  # form ("packed" | "per-tensor") -> the most a reply of that form may carry
    max_num_examples: int
    max_delta_norm: float
    codec: CodecSpec | None = None  # issue 18: replies in this codec's layout (fedtune/codecs), or none

    @classmethod
    def for_round(
        cls,
        global_state: Mapping[str, np.ndarray],
        wire: Mapping[str, np.ndarray],
        packed_bytes: int,
        max_num_examples: int,
        max_update_ratio: float,
        codec: CodecSpec | None = None,
    ) -> Expected:
        """`wire`: the encoded arrays sent; `packed_bytes`: count_bytes() of their packed record."""
        specs = {name: (tuple(v.shape), v.dtype) for name, v in wire.items()}
        per_tensor = packing.leaderboard_bytes(packing.specs_of(wire))
        limits = {
            "packed": int(packed_bytes * OVERSIZE_FACTOR),
            "per-tensor": int(per_tensor * OVERSIZE_FACTOR),
        }
        norm = adapter_math.l2_norm(global_state)
        return cls(specs, global_state, limits, max_num_examples, max_update_ratio * max(norm, 1.0), codec)


@dataclass
class Checked:
    """A reply after its own checks: `reason` None means acceptable so far (the round's checks follow)."""

    reason: str | None
    arrays: dict[str, np.ndarray] | None = None  # float32, unpacked from the real data
    metrics: dict[str, float] = field(default_factory=dict)
    form: str | None = None  # "packed" | "per-tensor"
    leaderboard_bytes: int = 0  # Σ count_bytes of the per-tensor form of what arrived (0 if unreadable)

    @property
    def num_examples(self) -> float:
        return float(self.metrics[WEIGHT_KEY])


def check_reply(content: RecordDict, expected: Expected) -> Checked:
    """The reply's own checks, cheapest first: structure, metrics, size, then the unpacked data."""
    records = set(content.keys())
    allowed = {REPLY_ARRAYS_KEY, REPLY_METRICS_KEY, CODEC_TAG_RECORD}
    if records - allowed or set(content.config_records) - {CODEC_TAG_RECORD}:
        return Checked("unexpected-records")
    if REPLY_ARRAYS_KEY not in content.array_records:
        return Checked("missing-arrays")
    metrics_record = content.metric_records.get(REPLY_METRICS_KEY)
    if metrics_record is None or WEIGHT_KEY not in metrics_record:
        return Checked("missing-num-examples")
    reason, metrics = _check_metrics(dict(metrics_record), expected.max_num_examples)
    record = content.array_records[REPLY_ARRAYS_KEY]
    sent = record.count_bytes()
    form = "packed" if packing.is_packed(record) else "per-tensor"
    if reason is None and sent > expected.max_bytes[form]:
        reason = "oversize"
    if reason is not None:  # refused unread: the bytes still arrived
        return Checked(reason, metrics=metrics, leaderboard_bytes=sent)
    try:
        unpacked = packing.unpack(record)
    except packing.PackingError:
        return Checked("bad-packing", metrics=metrics, leaderboard_bytes=sent)
    arrays = unpacked.arrays
    leaderboard = packing.leaderboard_bytes(packing.specs_of(arrays))
    checked = Checked(None, metrics=metrics, form=unpacked.form, leaderboard_bytes=leaderboard)
    if expected.codec is not None:  # issue 18: the codec checks the tag, codes and scales, then decodes
        tag = content.config_records.get(CODEC_TAG_RECORD)
        decoded, checked.reason = decode_reply_arrays(arrays, tag, expected.global_state, expected.codec)
        moved = adapter_math.distance(decoded, expected.global_state) if decoded is not None else 0.0
        if moved > expected.max_delta_norm:
            checked.reason = "update-norm"
        checked.arrays = decoded if checked.reason is None else None
        return checked
    checked.reason = _check_arrays(arrays, expected)
    if checked.reason is None:
        decoded = packing.decode(arrays)
        if not adapter_math.all_finite(decoded):
            checked.reason = "non-finite"
        elif adapter_math.distance(decoded, expected.global_state) > expected.max_delta_norm:
            checked.reason = "update-norm"
        else:
            checked.arrays = decoded
    return checked


def _check_metrics(metrics: dict[str, object], max_num_examples: int) -> tuple[str | None, dict[str, float]]:
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if key not in REPLY_METRICS:
            return "unexpected-metric", clean
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "bad-metric", clean
        clean[key] = float(value)
    for key in REPLY_REQUIRED_METRICS:
        if key not in clean:
            return "missing-metric", clean
    if clean[WEIGHT_KEY] <= 0:
        return "bad-num-examples", clean
    if clean[WEIGHT_KEY] > max_num_examples:
        return "num-examples-over-cap", clean
    return None, clean


def _check_arrays(arrays: Mapping[str, np.ndarray], expected: Expected) -> str | None:
    if set(arrays) != set(expected.specs):
        return "wrong-keys"
    for name, values in arrays.items():
        shape, dtype = expected.specs[name]
        if tuple(values.shape) != shape:
            return "wrong-shape"
        if values.dtype != dtype:
            return "wrong-dtype"
    return None


def weight_outliers(weights: Mapping[int, float]) -> dict[int, str]:
    """Nodes whose num-examples is far above the round's median (only with enough replies to tell)."""
    if len(weights) < MEDIAN_MIN_REPLIES:
        return {}
    median = float(np.median(list(weights.values())))
    return {node: "num-examples-outlier" for node, w in weights.items() if w > MEDIAN_FACTOR * median}


def aggregate_is_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return adapter_math.all_finite(arrays)
