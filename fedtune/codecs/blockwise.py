"""Blockwise quantisation of flat float32 vectors: int8, uniform 4-bit and NF4, one absmax scale per block.

numpy only (the SuperLink host never imports torch), vectorised over all blocks at once. A tensor is flattened
(C order) and cut into blocks of `block` values; the last block is zero-padded for the arithmetic only — the
codes that travel cover exactly the tensor's values. Scales are float32 (a delta of a late round, with a
learning rate of 1e-6, has blocks near 1e-6 in magnitude, where float16 would lose precision).
"""

from __future__ import annotations

import math
from functools import cache
from statistics import NormalDist

import numpy as np

INT8_LEVELS = 127  # symmetric: codes -127..127, 0 exact
INT4_LEVELS = 7  # symmetric uniform 4-bit: codes 0..14 stand for -7..7 (one of 16 codes unused, 0 exact)
NF4_OFFSET = 0.9677083  # QLoRA's choice: the outermost quantiles sit at this probability


def num_blocks(size: int, block: int) -> int:
    return max(1, math.ceil(size / block))


def _blocked(flat: np.ndarray, block: int) -> np.ndarray:
    """(num_blocks, block) float32 view of a zero-padded copy."""
    rows = num_blocks(flat.size, block)
    padded = np.zeros(rows * block, np.float32)
    padded[: flat.size] = flat
    return padded.reshape(rows, block)


def absmax_scales(flat: np.ndarray, block: int) -> np.ndarray:
    return np.abs(_blocked(flat, block)).max(axis=1).astype(np.float32)


def _normalised(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Values divided by their block's absmax (all-zero blocks stay 0), and the scales."""
    blocks = _blocked(flat, block)
    scales = np.abs(blocks).max(axis=1).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    return (blocks / safe[:, None]).ravel()[: flat.size], scales


def _expand(scales: np.ndarray, block: int, size: int) -> np.ndarray:
    return np.repeat(scales, block)[:size]


# ---- int8 ----------------------------------------------------------------------------------------


def int8_encode(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    unit, scales = _normalised(flat, block)
    codes = np.clip(np.rint(unit * INT8_LEVELS), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes, scales


def int8_decode(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    step = _expand(scales, block, codes.size) / np.float32(INT8_LEVELS)
    return codes.astype(np.float32) * step


# ---- 4-bit (uniform or NF4): a 16-entry codebook, two codes a byte -------------------------------


@cache
def nf4_codebook() -> np.ndarray:
    """NF4 (QLoRA): 16 values in [-1, 1] at quantiles of a standard normal, normalised, with an exact 0;
    8 on the positive side, 7 on the negative. Computed here from the definition."""
    normal = NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    values = np.array(sorted([*positive, 0.0, *negative]), np.float64)
    return (values / np.abs(values).max()).astype(np.float32)


@cache
def int4_codebook() -> np.ndarray:
    return (np.arange(-INT4_LEVELS, INT4_LEVELS + 1, dtype=np.float32) / INT4_LEVELS).astype(np.float32)


def codebook(name: str) -> np.ndarray:
    return nf4_codebook() if name == "nf4" else int4_codebook()


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes < 16 → ceil(n/2) bytes, the first code of each pair in the low nibble."""
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, size: int) -> np.ndarray:
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes[:size]


def four_bit_encode(flat: np.ndarray, block: int, book: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unit, scales = _normalised(flat, block)
    midpoints = (book[1:] + book[:-1]) / 2  # nearest codebook entry = the interval between midpoints
    codes = np.searchsorted(midpoints, unit).astype(np.uint8)
    return pack_nibbles(codes), scales


def four_bit_decode(
    packed: np.ndarray, scales: np.ndarray, block: int, size: int, book: np.ndarray
) -> np.ndarray:
    codes = unpack_nibbles(packed, size)
    return book[codes] * _expand(scales, block, size)


def max_relative_error(name: str) -> float:
    """The largest |x - decode(encode(x))| / block absmax a codec can give (half its widest step)."""
    if name == "int8":
        return 0.5 / INT8_LEVELS
    book = codebook(name)
    return float(np.max(np.diff(book))) / 2
