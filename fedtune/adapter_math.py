"""Whole-adapter arithmetic for the server: finiteness, norms, distances, the weighted average and the
bf16 rounding, over one flat buffer in slices on a few threads.

A round's last reply is checked and the replies averaged on the round's critical path (the nodes wait for
the next global meanwhile), and so is the next global's encoding. An 8B adapter is 19.3 M values in 384
tensors: tensor by tensor, numpy runs those loops one after the other on one core (0.12-0.14 s per check and
per average on an H200 host, bench/RESULTS.md session 12). The packed transport delivers each adapter as one
buffer (fedtune/packing.py) and the average is computed into one, so here each operation runs over the
whole buffer, cut into SLICE_VALUES slices shared out over up to MAX_THREADS threads (numpy lets go of the
GIL inside its loops). Element-wise results are the same bits as tensor by tensor; a sum of squares adds its
slices in another order (float64: a difference in the last bits, compared against a bound). Arrays that are
not one buffer in the same layout are taken tensor by tensor, as before.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from fedtune import packing

MAX_THREADS = 8
SLICE_VALUES = 1 << 20  # 4 MiB of float32 per task: big enough that numpy's loop, not Python, dominates

State = Mapping[str, np.ndarray]
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(threads(), thread_name_prefix="adapter-math")
        return _pool


def over_slices(size: int, work: Callable[[int, int], T]) -> list[T]:
    """work(start, stop) for consecutive slices covering range(size), side by side; results in order."""
    bounds = [(start, min(start + SLICE_VALUES, size)) for start in range(0, size, SLICE_VALUES)]
    if len(bounds) <= 1 or threads() == 1:
        return [work(start, stop) for start, stop in bounds]
    return list(_executor().map(lambda bound: work(*bound), bounds))


def flat(arrays: State) -> np.ndarray | None:
    """The one 1-D buffer these tensors are consecutive pieces of (packing.back_to_back), or None."""
    return packing.back_to_back(list(arrays.values())) if arrays else None


def same_layout(first: State, second: State) -> bool:
    return len(first) == len(second) and all(
        name == other and a.shape == b.shape
        for (name, a), (other, b) in zip(first.items(), second.items(), strict=True)
    )


def all_finite(arrays: State) -> bool:
    whole = flat(arrays)
    if whole is None:
        return all(bool(np.isfinite(values).all()) for values in arrays.values())
    return all(over_slices(whole.size, lambda a, b: bool(np.isfinite(whole[a:b]).all())))


def _sum_of_squares(values: np.ndarray) -> float:
    # float64 (3e38 squared overflows float32); element-wise square + pairwise sum, not BLAS dot: BLAS
    # threads on a busy small host made this 50x slower
    wide = values.astype(np.float64)
    return float(np.square(wide, out=wide).sum())


def l2_norm(arrays: State | Iterable[np.ndarray]) -> float:
    tensors = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    whole = packing.back_to_back(tensors) if tensors else None
    if whole is None:
        return math.sqrt(sum(_sum_of_squares(t) for t in tensors))
    return math.sqrt(sum(over_slices(whole.size, lambda a, b: _sum_of_squares(whole[a:b]))))


def _squared_distance(update: np.ndarray, reference: np.ndarray) -> float:
    delta = np.subtract(update, reference, dtype=np.float64)
    return float(np.square(delta, out=delta).sum())


def distance(update: State, reference: State) -> float:
    """||update - reference|| over all tensors (both float32, same names)."""
    mine, theirs = flat(update), flat(reference)
    if mine is None or theirs is None or not same_layout(update, reference):
        return math.sqrt(sum(_squared_distance(values, reference[name]) for name, values in update.items()))
    return math.sqrt(sum(over_slices(mine.size, lambda a, b: _squared_distance(mine[a:b], theirs[a:b]))))


def weighted_average(
    updates: Mapping[int, State], weights: Mapping[int, float]
) -> dict[str, np.ndarray] | None:
    """Σ (w_i / Σw) · update_i, into one new float32 buffer cut into the tensors (the only allocation of
    adapter size; one reply with all the weight is returned bit-exactly): `pack` then sends that buffer
    as it is, without copying the tensors together again."""
    if not updates:
        return None
    total = sum(weights[n] for n in updates)
    first = next(iter(updates.values()))
    layout = [(name, tuple(values.shape)) for name, values in first.items()]
    out = np.empty(sum(math.prod(shape) for _, shape in layout), dtype=np.float32)
    result = packing.split_buffer(layout, out)
    for position, (node_id, update) in enumerate(updates.items()):
        share = np.float32(weights[node_id] / total)
        whole = flat(update) if same_layout(update, first) else None
        if whole is not None:
            _accumulate(out, whole, share, start=position == 0)
            continue
        for name, values in update.items():  # tensor by tensor: the temporaries stay cache-sized
            if position == 0:
                np.multiply(values, share, out=result[name], dtype=np.float32)
            else:
                result[name] += values * share
    return result


def _accumulate(out: np.ndarray, source: np.ndarray, share: np.float32, start: bool) -> None:
    """out = source * share (start) or out += source * share, slice by slice: the same bits as whole."""

    def work(a: int, b: int) -> None:
        if start:
            np.multiply(source[a:b], share, out=out[a:b], dtype=np.float32)
        else:
            out[a:b] += source[a:b] * share

    over_slices(out.size, work)


def encode(state: State, transport_dtype: str) -> dict[str, np.ndarray]:
    """packing.encode, with a float32 adapter in one buffer rounded to bf16 at once, slice by slice."""
    whole = flat(state)
    if transport_dtype != "bfloat16" or whole is None or whole.dtype != np.float32:
        return packing.encode(state, transport_dtype)
    bits = np.empty(whole.size, dtype=packing.BF16_WIRE_DTYPE)

    def round_slice(a: int, b: int) -> None:
        bits[a:b] = packing.to_bf16_bits(whole[a:b])

    over_slices(whole.size, round_slice)
    return packing.split_buffer([(name, tuple(values.shape)) for name, values in state.items()], bits)


def owned_float32(arrays: State) -> dict[str, np.ndarray]:
    """float32 copies of `arrays` in one new buffer (so the whole-buffer paths above apply to them)."""
    layout = [(name, tuple(values.shape)) for name, values in arrays.items()]
    out = np.empty(sum(math.prod(shape) for _, shape in layout), dtype=np.float32)
    result = packing.split_buffer(layout, out)
    for name, values in arrays.items():
        result[name][...] = values
    return result
