"""Reject a client update before it can touch the global adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedtune.model import BF16_WIRE_DTYPE

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, RecordDict

WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(BF16_WIRE_DTYPE)}


def rejection_reason(
    content: RecordDict,
    reference: ArrayRecord,
    transport_dtype: str,
    weighted_by_key: str,
    max_bytes: int,
) -> str | None:
    """None if the update is acceptable, else a short reason (a metric label)."""
    if "arrays" not in content.array_records:
        return "missing-arrays"
    metrics = content.metric_records.get("metrics")
    if metrics is None or weighted_by_key not in metrics:
        return "missing-num-examples"
    num_examples = metrics[weighted_by_key]
    if not isinstance(num_examples, (int, float)) or not np.isfinite(num_examples) or num_examples <= 0:
        return "bad-num-examples"
    arrays = content.array_records["arrays"]
    if set(arrays.keys()) != set(reference.keys()):
        return "wrong-keys"
    if arrays.count_bytes() > max_bytes:
        return "oversize"
    expected_dtype = WIRE_DTYPES[transport_dtype]
    for key, array in arrays.items():
        if tuple(array.shape) != tuple(reference[key].shape):
            return "wrong-shape"
        if np.dtype(array.dtype) != expected_dtype:
            return "wrong-dtype"
    for array in arrays.values():
        values = array.numpy()
        if values.dtype == BF16_WIRE_DTYPE:
            # bf16 exponent bits all set = Inf or NaN
            if np.any((values & 0x7F80) == 0x7F80):
                return "non-finite"
        elif not np.all(np.isfinite(values)):
            return "non-finite"
    return None
