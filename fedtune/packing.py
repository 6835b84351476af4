"""The adapter on the wire: encoded tensors packed into a few large Flower Arrays, and back, bit-exactly.

Flower moves every Array (and every 5 MiB chunk of one) as its own object, by its own HTTPS request, on
every hop (ServerApp ↔ SuperLink ↔ SuperNode ↔ ClientApp): a 384-tensor adapter costs hundreds of round
trips, a packed one ~16 chunks. So `pack` concatenates the tensors of each dtype into one contiguous 1-D
buffer and describes them in a manifest; `unpack` cuts the buffers back into tensors (views, no copy).

    encode(state, transport_dtype) -> {name: ndarray}   tensors to wire dtype (float32, or bf16 bits)
    pack({name: ndarray}, meta) -> ArrayRecord          "packed" transport: a few buffers + manifest
    pack_buffer(layout, buffer, meta) -> ArrayRecord    the same, from one buffer the caller already filled
    split_buffer(layout, buffer) -> {name: ndarray}     that buffer cut into its tensors (views)
    per_tensor({name: ndarray}) -> ArrayRecord          "per-tensor" transport: one Array per tensor
    unpack(record) -> Unpacked                          either form back to {name: ndarray}, validated
                                                        (packed: also the buffers and their manifest)
    decode({name: ndarray}) -> {name: float32 ndarray}  wire dtype back to float32
    leaderboard_bytes(specs) -> int                     Σ count_bytes() of the per-tensor record,
                                                        computed from names, shapes and dtypes alone

Codecs (issue 18) plug in between `encode` and `pack`: `pack` takes arrays of any numeric dtype, and `meta`
(e.g. {"codec": "..."}) travels in the manifest and comes back from `unpack`.

Packed record layout: `fedtune.packed.manifest` (uint8 JSON), and `fedtune.packed.<dtype>` per dtype
(1-D). The manifest lists every tensor `{name, dtype, shape, offset}` (offset in elements into its dtype's
buffer) in buffer order. `unpack` accepts a manifest only if it accounts for every element of every buffer
exactly once, in order (no gap, overlap or spare bytes), every buffer's real dtype and length (from the
array's own data, not its declared metadata) match, and nothing else is in the record.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from flwr.app import Array, ArrayRecord

FORMAT = "fedtune-packed"
VERSION = 1
PREFIX = "fedtune.packed."
MANIFEST_KEY = PREFIX + "manifest"
MAX_MANIFEST_BYTES = 16 << 20  # 100k tensors' worth; a bigger one is an attack, not an adapter
# bf16 has no numpy dtype: on the wire a bf16 tensor is its raw 16-bit pattern in a uint16 array
# (half the bytes of fp32, exact), tagged by the dtype itself.
BF16_WIRE_DTYPE = np.dtype(np.uint16)
WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16_WIRE_DTYPE}
# dtypes a buffer may carry: floats, and integers for bf16 bits and codecs (issue 18)
_ALLOWED_KINDS = "fiu"


class PackingError(ValueError):
    """A record that is not a well-formed adapter; the message says what is wrong (one line)."""


@dataclass
class Unpacked:
    arrays: dict[str, np.ndarray]  # views into `buffers` when packed
    form: str  # "packed" | "per-tensor"
    meta: dict[str, Any] = field(default_factory=dict)
    # packed only: each dtype's whole buffer and the checked manifest entries (name, dtype, shape, offset),
    # so a reader can move a buffer in one piece (e.g. to the GPU) and cut it there
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)


# ---- tensors <-> wire dtype --------------------------------------------------------------------------


def encode(state: Mapping[str, torch.Tensor | np.ndarray], transport_dtype: str) -> dict[str, np.ndarray]:
    """Adapter tensors as numpy arrays in the transport dtype (float32, or bf16 bit patterns as uint16).

    fp32 -> bf16 rounds to nearest even, as torch's `.to(torch.bfloat16)` does (tested bit for bit)."""
    if transport_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown transport dtype {transport_dtype!r}")
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        values = _as_numpy(tensor)
        out[name] = to_bf16_bits(values) if transport_dtype == "bfloat16" else values
    return out


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Wire arrays to float32: uint16 is bf16 bits (exact widening), other floats are cast."""
    whole = back_to_back(list(arrays.values())) if len(arrays) > 1 else None
    if whole is not None and whole.dtype != np.float32:  # one buffer (a packed record): widened at once
        return _split_like(arrays, _to_float32(whole))
    return {name: _to_float32(values) for name, values in arrays.items()}


def _to_float32(values: np.ndarray) -> np.ndarray:
    if values.dtype == BF16_WIRE_DTYPE:
        return from_bf16_bits(values)
    if values.dtype == np.float32:
        return values
    return values.astype(np.float32)


def _as_numpy(tensor: Any) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        values = tensor
    else:  # a torch tensor: trl may hand bf16, numpy has none, so widen first (exact)
        tensor = tensor.detach().cpu()
        if not tensor.dtype.is_floating_point or tensor.dtype.itemsize != 4:
            tensor = tensor.float()
        values = tensor.numpy()
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    return np.ascontiguousarray(values)


def back_to_back(members: Sequence[Any]) -> np.ndarray | None:
    """The 1-D array over exactly the memory of these arrays when they are consecutive C-ordered pieces
    of one buffer, in this order, of one native dtype (e.g. the tensors `unpack` cut from a packed buffer,
    or an aggregate computed into one); else None. Lets a whole adapter be converted or packed at once,
    without first copying it together."""
    if not members or any(not isinstance(v, np.ndarray) for v in members):
        return None
    dtype = members[0].dtype
    if not dtype.isnative or any(v.dtype != dtype or not v.flags.c_contiguous for v in members):
        return None
    start = position = members[0].__array_interface__["data"][0]
    for values in members:
        if values.size and values.__array_interface__["data"][0] != position:
            return None
        position += values.nbytes
    root = _root(members[0])
    if not root.flags.c_contiguous or any(_root(v) is not root for v in members if v.size):
        return None
    offset = start - root.__array_interface__["data"][0]
    if offset < 0 or offset + (position - start) > root.nbytes:
        return None
    return root.reshape(-1).view(np.uint8)[offset : offset + position - start].view(dtype)


def _root(values: np.ndarray) -> np.ndarray:
    while isinstance(values.base, np.ndarray):
        values = values.base
    return values


def _split_like(arrays: Mapping[str, Any], whole: np.ndarray) -> dict[str, np.ndarray]:
    """`whole` (one element per element of `arrays`, in order) cut into arrays of their shapes (views)."""
    return split_buffer([(name, tuple(values.shape)) for name, values in arrays.items()], whole)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's payload into Inf: torch's canonical NaN instead
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- records --------------------------------------------------------------------------------------


def per_tensor(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """One Flower Array per tensor: the leaderboard's (and Flower's usual) form."""
    from flwr.app import ArrayRecord

    record = ArrayRecord()
    for name, values in arrays.items():
        record[name] = npy_array(values)
    return record


def pack(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> ArrayRecord:
    """Few large Arrays: one contiguous 1-D buffer per dtype, plus the manifest (see the module doc)."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, values in arrays.items():
        if name.startswith(PREFIX):
            raise PackingError(f"tensor name {name!r} uses the reserved prefix {PREFIX!r}")
        dtype = _check_dtype(values.dtype, name)
        groups.setdefault(dtype.name, []).append((name, values))
    tensors: list[dict[str, Any]] = []
    buffers: dict[str, np.ndarray] = {}
    for dtype_name, members in groups.items():
        offset = 0
        for name, values in members:
            tensors.append(
                {"name": name, "dtype": dtype_name, "shape": list(values.shape), "offset": offset}
            )
            offset += values.size
        buffer = back_to_back([values for _, values in members])
        if buffer is None:  # one copy of each tensor straight into its place
            buffer = np.empty(offset, dtype=members[0][1].dtype.newbyteorder("="))
            position = 0
            for _, values in members:
                buffer[position : position + values.size] = values.reshape(-1)
                position += values.size
        buffers[dtype_name] = buffer
    return _packed_record(tensors, buffers, meta)


def pack_buffer(
    layout: Iterable[tuple[str, tuple[int, ...]]], buffer: np.ndarray, meta: Mapping[str, Any] | None = None
) -> ArrayRecord:
    """The packed record of tensors already laid out back to back in one 1-D buffer (`layout`: their names
    and shapes in buffer order), without copying them again; the same record `pack` builds from the
    tensors themselves."""
    dtype = _check_dtype(buffer.dtype, "buffer")
    if buffer.ndim != 1:
        raise PackingError(f"buffer has shape {buffer.shape}, expected 1-D")
    tensors: list[dict[str, Any]] = []
    offset = 0
    for name, shape in layout:
        if name.startswith(PREFIX):
            raise PackingError(f"tensor name {name!r} uses the reserved prefix {PREFIX!r}")
        tensors.append({"name": name, "dtype": dtype.name, "shape": list(shape), "offset": offset})
        offset += math.prod(shape)
    if offset != buffer.size:
        raise PackingError(f"layout covers {offset} elements, the buffer holds {buffer.size}")
    return _packed_record(tensors, {dtype.name: buffer} if tensors else {}, meta)


def split_buffer(layout: Iterable[tuple[str, tuple[int, ...]]], buffer: np.ndarray) -> dict[str, np.ndarray]:
    """The tensors of a `pack_buffer` layout as views into the buffer (no copy)."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        count = math.prod(shape)
        arrays[name] = buffer[offset : offset + count].reshape(shape)
        offset += count
    return arrays


def _packed_record(
    tensors: list[dict[str, Any]], buffers: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None
) -> ArrayRecord:
    from flwr.app import ArrayRecord

    manifest = {"format": FORMAT, "version": VERSION, "meta": dict(meta or {}), "tensors": tensors}
    record = ArrayRecord()
    record[MANIFEST_KEY] = npy_array(np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8))
    for dtype_name, buffer in buffers.items():
        record[PREFIX + dtype_name] = npy_array(buffer)
    return record


def npy_array(values: np.ndarray) -> Array:
    """Flower's `Array(values)`: the same `.npy` bytes, built with one copy of the data where Flower's
    `np.save` into a BytesIO and its `getvalue()` make two (tens of ms for a 77 MB adapter buffer)."""
    from flwr.app import Array

    values = np.require(values, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    data = b"".join((npy_header(values.shape, values.dtype), values.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data)


def to_record(arrays: Mapping[str, np.ndarray], transport: str, meta: Mapping[str, Any] | None = None):
    """The record for a run's `comm.transport`: "packed" or "per-tensor"."""
    if transport == "packed":
        return pack(arrays, meta)
    if transport == "per-tensor":
        return per_tensor(arrays)
    raise ValueError(f"unknown transport {transport!r}")


def is_packed(record: ArrayRecord) -> bool:
    return MANIFEST_KEY in record


def unpack(record: ArrayRecord) -> Unpacked:
    """The tensors of a packed or per-tensor record, from the arrays' real data; raises PackingError."""
    if not is_packed(record):
        if any(key.startswith(PREFIX) for key in record):
            raise PackingError(f"packed buffers without a manifest ({MANIFEST_KEY} missing)")
        return Unpacked({key: _load(record, key) for key in record}, "per-tensor")
    manifest = _read_manifest(_load(record, MANIFEST_KEY))
    entries = manifest["tensors"]
    declared = {entry["dtype"] for entry in entries}
    present = {key[len(PREFIX) :] for key in record if key != MANIFEST_KEY}
    stray = sorted(key for key in record if key != MANIFEST_KEY and not key.startswith(PREFIX))
    if stray:
        raise PackingError(f"packed record has an extra array {stray[0]!r}")
    if present != declared:
        missing, extra = sorted(declared - present), sorted(present - declared)
        raise PackingError(f"packed buffers do not match the manifest (missing {missing}, extra {extra})")
    buffers: dict[str, np.ndarray] = {}
    for dtype_name in present:
        buffer = _load(record, PREFIX + dtype_name)
        if buffer.ndim != 1:
            raise PackingError(f"packed buffer {dtype_name} has shape {buffer.shape}, expected 1-D")
        if buffer.dtype.name != dtype_name:
            raise PackingError(f"packed buffer {dtype_name!r} carries {buffer.dtype} data")
        buffers[dtype_name] = buffer
    arrays: dict[str, np.ndarray] = {}
    cursor = dict.fromkeys(buffers, 0)
    for entry in entries:
        name, dtype_name, shape = entry["name"], entry["dtype"], tuple(entry["shape"])
        if name in arrays:
            raise PackingError(f"manifest lists tensor {name!r} twice")
        count = math.prod(shape)
        if entry["offset"] != cursor[dtype_name]:
            raise PackingError(
                f"manifest: tensor {name!r} at offset {entry['offset']}, expected {cursor[dtype_name]} "
                "(gap or overlap)"
            )
        end = cursor[dtype_name] + count
        if end > buffers[dtype_name].size:
            raise PackingError(f"manifest: tensor {name!r} runs past the end of the {dtype_name} buffer")
        try:
            arrays[name] = buffers[dtype_name][cursor[dtype_name] : end].reshape(shape)
        except ValueError as err:  # e.g. a zero-size shape with an absurd dimension
            raise PackingError(f"manifest: tensor {name!r} shape {list(shape)}: {err}") from None
        cursor[dtype_name] = end
    for dtype_name, used in cursor.items():
        if used != buffers[dtype_name].size:
            raise PackingError(
                f"packed {dtype_name} buffer holds {buffers[dtype_name].size} elements, the manifest {used}"
            )
    return Unpacked(arrays, "packed", manifest["meta"], buffers, entries)


def _load(record: ArrayRecord, key: str) -> np.ndarray:
    """The array's real data, dtype and shape from its own .npy bytes (never its declared metadata):
    a read-only view of the received bytes where possible (no copy of a 77 MB buffer), else np.load."""
    array = record[key]
    try:
        values = _npy_view(array.data) if array.stype == "numpy.ndarray" else None
        if values is None:
            values = array.numpy()
    except PackingError:
        raise
    except Exception as err:  # a malformed .npy payload: the sender's fault, one line
        raise PackingError(f"array {key!r} does not load: {type(err).__name__}: {err}") from None
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    return values


def _npy_view(data: bytes) -> np.ndarray | None:
    """np.frombuffer over an .npy payload after checking its header (C order, exact length, no objects);
    None for what this fast path does not handle (np.load decides then)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return None
    if fortran or dtype.hasobject:
        return None
    offset = stream.tell()
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise PackingError(f"array payload holds {len(data) - offset} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def _check_dtype(dtype: np.dtype, name: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _ALLOWED_KINDS or dtype.itemsize == 0:
        raise PackingError(f"tensor {name!r} has dtype {dtype}, not a numeric array")
    return dtype


def _read_manifest(raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise PackingError(f"manifest is {raw.dtype}{list(raw.shape)}, expected 1-D uint8")
    if raw.size > MAX_MANIFEST_BYTES:
        raise PackingError(f"manifest is {raw.size} bytes (cap {MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(raw.tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackingError(f"manifest is not JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackingError("manifest is not a fedtune-packed manifest")
    if manifest.get("version") != VERSION:
        raise PackingError(f"manifest version {manifest.get('version')!r}, this side reads {VERSION}")
    tensors, meta = manifest.get("tensors"), manifest.get("meta", {})
    if not isinstance(tensors, list) or not isinstance(meta, dict):
        raise PackingError("manifest: tensors must be a list and meta an object")
    for entry in tensors:
        _check_entry(entry)
    return manifest


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset"}:
        raise PackingError(f"manifest entry {str(entry)[:80]!r}: expected name, dtype, shape, offset")
    name, dtype_name, shape, offset = entry["name"], entry["dtype"], entry["shape"], entry["offset"]
    if not isinstance(name, str) or not name or name.startswith(PREFIX):
        raise PackingError(f"manifest entry name {str(name)[:80]!r} is not a tensor name")
    if not isinstance(dtype_name, str):
        raise PackingError(f"manifest: tensor {name!r} has dtype {dtype_name!r}")
    try:
        _check_dtype(np.dtype(dtype_name), name)
    except TypeError:
        raise PackingError(f"manifest: tensor {name!r} has unknown dtype {dtype_name!r}") from None
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise PackingError(f"manifest: tensor {name!r} has shape {str(shape)[:80]}")
    if not _is_count(offset):
        raise PackingError(f"manifest: tensor {name!r} has offset {offset!r}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- the leaderboard's bytes, without building the record ---------------------------------------------


def npy_header(shape: tuple[int, ...], dtype: np.dtype | str) -> bytes:
    """The header `np.save` writes for a C-ordered array of this shape and dtype."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    buffer = io.BytesIO()
    # np.save writes format 1.0 unless the header needs more (then 2.0): the same choice here
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def npy_bytes(shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    """len() of `np.save(array)` for a C-ordered array of this shape and dtype: header + data."""
    return len(npy_header(shape, dtype)) + math.prod(shape) * np.dtype(dtype).itemsize


def leaderboard_bytes(specs: Iterable[tuple[str, tuple[int, ...], np.dtype | str]]) -> int:
    """Σ `ArrayRecord.count_bytes()` of the per-tensor record (npy bytes + key length) of these tensors,
    the FlowerTune leaderboard's communication cost of one message, computed without serialising."""
    return sum(npy_bytes(tuple(shape), dtype) + len(name) for name, shape, dtype in specs)


def specs_of(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    return [(name, tuple(values.shape), values.dtype) for name, values in arrays.items()]
