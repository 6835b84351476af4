"""Adapter codecs (issue 18): what the LoRA arrays look like on the wire, chosen by run config `comm.*`.

- `none`: float32, as the reference run (the default; nothing changes).
- `bf16`: the top 16 bits of each float32 (round to nearest even), carried as uint16 under the same key.
- `int8`: per block of `comm.block-size` values, int8 codes (-127..127) × the block's absmax / 127.
- `int4`: per block, 4-bit codes of 15 uniform levels (-7..7) × absmax / 7, two codes a byte.
- `nf4`: per block, 4-bit codes of QLoRA's NormalFloat levels × absmax, two codes a byte.

A quantised tensor `k` travels as two arrays: `k:q` (codes) and `k:s` (float32 block scales). Uploads carry
the delta from the round's global (with error feedback on the node, fedtune/codecs/node.py) where the upload
codec is not `none`; downloads carry the full global adapter. The server aggregates and stores float32 always.
`comm.ffa-lora`: FFA-LoRA — the LoRA A matrices stay at their seeded initial values on every node and only
the B matrices are trained and sent (both directions).

Everything here is numpy on flat float32 vectors: the SuperLink host never needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedtune import packing
from fedtune.codecs import blockwise

CODECS = ("none", "bf16", "int8", "int4", "nf4")
QUANTISED = ("int8", "int4", "nf4")
CODES_SUFFIX = ":q"
SCALES_SUFFIX = ":s"
DEFAULT_BLOCK_SIZE = 64
BF16_WIRE_DTYPE = np.dtype(np.uint16)  # as fedtune.model: bf16 bit patterns in a uint16 array
Shape = tuple[int, ...]


@dataclass(frozen=True)
class CodecSpec:
    """The run's communication settings, as the server sends them in every round's config."""

    upload: str = "none"  # node → server
    download: str = "none"  # server → node
    block_size: int = DEFAULT_BLOCK_SIZE
    ffa_lora: bool = False

    @property
    def active(self) -> bool:
        """False for the reference configuration: the message path is exactly today's."""
        return self.upload != "none" or self.download != "none" or self.ffa_lora

    @property
    def upload_is_delta(self) -> bool:
        """A lossy upload sends (trained - received global) so that quantisation error stays small and
        is fed back; a float32 upload sends the trained values, as the reference does."""
        return self.upload != "none"

    def sent_keys(self, keys: Iterable[str]) -> list[str]:
        """The adapter keys that travel: all, or only the B matrices under FFA-LoRA."""
        return [k for k in keys if not (self.ffa_lora and is_lora_a(k))]

    def to_config(self) -> dict[str, Any]:
        return {f"codec-{k.replace('_', '-')}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CodecSpec:
        """From a round's ConfigRecord (or a reply's codec tag); absent keys = the reference."""
        values = {}
        for name in ("upload", "download", "block_size", "ffa_lora"):
            key = f"codec-{name.replace('_', '-')}"
            if key in config:
                values[name] = config[key]
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        for direction in (self.upload, self.download):
            if direction not in CODECS:
                raise ValueError(f"unknown codec {direction!r} (known: {', '.join(CODECS)})")
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"codec block size {self.block_size!r} must be an even integer >= 2")

    def label(self) -> str:
        parts = [self.download if self.download == self.upload else f"{self.download}↓/{self.upload}↑"]
        if self.ffa_lora:
            parts.insert(0, "ffa")
        return "+".join(parts)


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key or key.endswith(".lora_A")


# ---- one tensor ----------------------------------------------------------------------------------


def layout(codec: str, key: str, shape: Shape, block: int) -> list[tuple[str, Shape, np.dtype]]:
    """The arrays (key, shape, dtype) that carry one tensor: what accounting and validation check."""
    size = math.prod(shape)
    if codec == "none":
        return [(key, shape, np.dtype(np.float32))]
    if codec == "bf16":
        return [(key, shape, BF16_WIRE_DTYPE)]
    scales = (key + SCALES_SUFFIX, (blockwise.num_blocks(size, block),), np.dtype(np.float32))
    if codec == "int8":
        return [(key + CODES_SUFFIX, shape, np.dtype(np.int8)), scales]
    if codec in ("int4", "nf4"):
        return [(key + CODES_SUFFIX, ((size + 1) // 2,), np.dtype(np.uint8)), scales]
    raise ValueError(f"unknown codec {codec!r}")


# bf16 bit patterns in a uint16 array, converted exactly as the transport does (round to nearest even)
bf16_bits = packing.to_bf16_bits
bf16_values = packing.from_bf16_bits


def encode_tensor(codec: str, key: str, values: np.ndarray, block: int) -> dict[str, np.ndarray]:
    values = np.ascontiguousarray(values, np.float32)
    if codec == "none":
        return {key: values}
    if codec == "bf16":
        return {key: bf16_bits(values)}
    flat = values.ravel()
    if codec == "int8":
        codes, scales = blockwise.int8_encode(flat, block)
        codes = codes.reshape(values.shape)
    elif codec in ("int4", "nf4"):
        codes, scales = blockwise.four_bit_encode(flat, block, blockwise.codebook(codec))
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return {key + CODES_SUFFIX: codes, key + SCALES_SUFFIX: scales}


def decode_tensor(
    codec: str, key: str, arrays: Mapping[str, np.ndarray], shape: Shape, block: int
) -> np.ndarray:
    """float32 values of `shape`; the arrays must have passed `problem()`."""
    if codec == "none":
        return np.asarray(arrays[key], np.float32).reshape(shape)
    if codec == "bf16":
        return bf16_values(np.asarray(arrays[key])).reshape(shape)
    codes, scales = arrays[key + CODES_SUFFIX], arrays[key + SCALES_SUFFIX]
    if codec == "int8":
        return blockwise.int8_decode(codes.ravel(), scales, block).reshape(shape)
    size = math.prod(shape)
    return blockwise.four_bit_decode(codes, scales, block, size, blockwise.codebook(codec)).reshape(shape)


# ---- a whole adapter -----------------------------------------------------------------------------


def encode_state(state: Mapping[str, np.ndarray], codec: str, block: int) -> dict[str, np.ndarray]:
    encoded: dict[str, np.ndarray] = {}
    for key, values in state.items():
        encoded.update(encode_tensor(codec, key, values, block))
    return encoded


def decode_state(
    encoded: Mapping[str, np.ndarray], shapes: Mapping[str, Shape], codec: str, block: int
) -> dict[str, np.ndarray]:
    return {key: decode_tensor(codec, key, encoded, shape, block) for key, shape in shapes.items()}


def finite(codec: str, array: np.ndarray) -> bool:
    if codec == "bf16":
        return not np.any((array & 0x7F80) == 0x7F80)  # exponent bits all set: Inf or NaN
    return bool(np.all(np.isfinite(array)))


def problem(
    encoded: Mapping[str, np.ndarray], shapes: Mapping[str, Shape], codec: str, block: int
) -> str | None:
    """Why these arrays are not a valid `codec` encoding of tensors of `shapes` (a short label), or None.

    Scales must be finite, >= 0 (an all-zero block has scale 0) and one per block; codes of the exact dtype
    and length; float values finite."""
    expected = {k: (s, d) for key, shape in shapes.items() for k, s, d in layout(codec, key, shape, block)}
    if set(encoded) != set(expected):
        return "wrong-keys"
    for key, (shape, dtype) in expected.items():
        array = encoded[key]
        scales = key.endswith(SCALES_SUFFIX) and codec in QUANTISED
        if np.dtype(array.dtype) != dtype:
            return "bad-scales" if scales else "wrong-dtype"
        if tuple(array.shape) != tuple(shape):
            return "bad-scales" if scales else "wrong-shape"
        if scales:
            if not np.all(np.isfinite(array)) or np.any(array < 0):
                return "bad-scales"
        elif codec == "int8" and np.any(array == -128):
            return "bad-codes"
        elif codec == "int4" and np.any(((array & 0x0F) > 14) | ((array >> 4) > 14)):
            return "bad-codes"  # 15 is not a code of the 15-level grid
        elif codec in ("none", "bf16") and not finite(codec, array):
            return "non-finite"
    return None
