"""Bitmask format: one bit per weight position plus the kept values, packed in row order.

Bytes per weight at density d: 1/8 + 2d with bf16 values (1.125 at 50%, 0.725 at 70%), or
1/8 + d with int8 values and one float32 scale per row (0.625 / 0.425). The fast kernels expand
16 packed values at a time into their mask positions (see ``_simd``) and meet dense activations
with vector FMAs, so they read the weight bytes sequentially and never gather.

int8 option: per row, ``scale = max|kept w| / 127`` and ``q = round(w / scale)``; the error per
weight is at most ``scale / 2`` (0.4% of the row's largest magnitude). It is a lossy option that
:func:`npsparse.kernels.choose_format` never picks on its own.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import (PackedLinear, check_arrays, check_option, check_row_pointers, check_shapes,
                     check_weight_mask, pad_columns, row_pointers)
from ._numba import row_block, gemm_tasks, jit, pjit
from ._simd import OVERREAD, expand_dot, expand_row, value_at
from ._tile import TILE_ROWS, tile_matmul
from .bf16 import from_bf16, to_bf16

VALUE_TYPES = {"bf16": np.uint16, "int8": np.int8}


def pack_bits(keep: np.ndarray) -> np.ndarray:
    """keep [N, K] bool -> words [N, ceil(K/32)] uint32; bit j of word c is column 32c + j.

    Parameters
    ----------
    keep : np.ndarray
        ``[N, K]`` bool, True = kept.

    Returns
    -------
    np.ndarray
        ``[N, ceil(K/32)]`` uint32; the bits past column ``K - 1`` of the last word are 0.
    """
    n_rows, k_cols = keep.shape
    n_words = (k_cols + 31) // 32
    padded = np.zeros((n_rows, n_words * 32), dtype=np.bool_)
    padded[:, :k_cols] = keep
    as_bytes = np.packbits(padded, axis=1, bitorder="little")  # [N, 4 * words] uint8
    return np.ascontiguousarray(as_bytes).view("<u4").astype(np.uint32)


def unpack_bits(words: np.ndarray, k_cols: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: words [N, ceil(K/32)] uint32 -> keep [N, K] bool.

    Parameters
    ----------
    words : np.ndarray
        ``[N, ceil(K/32)]`` uint32 mask words.
    k_cols : int
        ``K``; bits past it in the last word are ignored.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool, True where the bit is set.
    """
    as_bytes = np.ascontiguousarray(words.astype("<u4")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, bitorder="little", count=k_cols).astype(np.bool_)


def quantize_rows(weight: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (q [N, K] int8, scales [N] float32); q = round(w / scale).

    ``scale = max |kept w| / 127`` per row (1.0 for a row with no nonzero kept weight), so
    ``q * scale`` is within ``scale / 2`` of every kept weight; ties round to even.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32.
    keep : np.ndarray
        ``[N, K]`` bool, True = kept; the other positions quantise to 0 and do not set the scale.

    Returns
    -------
    q : np.ndarray
        ``[N, K]`` int8 in ``-127 .. 127``, 0 where ``keep`` is False.
    scales : np.ndarray
        ``[N]`` float32.
    """
    kept = np.where(keep, weight, np.float32(0.0))
    peak = np.abs(kept).max(axis=1) if kept.size else np.zeros(kept.shape[0], np.float32)
    scales = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(kept / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


# ---- kernels: masks [N, KC] uint32, values [nnz] uint16|int8, row_ptr [N+1] int64,
# ---- scales [N] float32 (int8) or [0], x [T, K] float32 -> y [T, N] float32

@jit
def _row_dot_naive(masks, values, row_ptr, n, x, t):  # one output: row n of W times x[t]
    p = row_ptr[n]
    acc = np.float32(0.0)
    for k in range(x.shape[1]):
        if (masks[n, k >> 5] >> np.uint32(k & 31)) & np.uint32(1):
            acc += value_at(values, p) * x[t, k]
            p += 1
    return acc


@jit
def _matmul_naive(masks, values, row_ptr, scales, x):  # x [T, K] -> y [T, N]
    n_rows = masks.shape[0]
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for n in range(n_rows):
            acc = _row_dot_naive(masks, values, row_ptr, n, x, t)
            y[t, n] = acc * scales[n] if scales.shape[0] else acc
    return y


@pjit
def _gemv(masks, values, row_ptr, scales, x):  # x [1, 32 KC] zero-padded -> y [1, N]
    n_rows, n_words = masks.shape
    y = np.empty((1, n_rows), dtype=np.float32)
    safe_end = values.shape[0] - OVERREAD  # rows ending later use the scalar loop
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            if row_ptr[n + 1] <= safe_end:
                acc = expand_dot(masks, n * n_words, values, row_ptr[n], x, 0, n_words)
            else:
                acc = _row_dot_naive(masks, values, row_ptr, n, x, 0)
            y[0, n] = acc * scales[n] if scales.shape[0] else acc
    return y


@jit
def _decode_row(masks, values, row_ptr, n, out):  # row n -> out [32 KC] float32 (unscaled)
    n_words = masks.shape[1]
    if row_ptr[n + 1] <= values.shape[0] - OVERREAD:
        expand_row(masks, n * n_words, values, row_ptr[n], out, 0, n_words)
        return
    p = row_ptr[n]
    for k in range(32 * n_words):
        if (masks[n, k >> 5] >> np.uint32(k & 31)) & np.uint32(1):
            out[k] = value_at(values, p)
            p += 1
        else:
            out[k] = 0.0


@pjit
def _gemm(masks, values, row_ptr, scales, x, n_tasks):  # x [T, 32 KC] zero-padded -> y [T, N]
    n_rows, n_words = masks.shape
    y = np.empty((x.shape[0], n_rows), dtype=np.float32)
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    n_tasks = min(n_tiles, n_tasks)
    for task in numba.prange(n_tasks):
        tile = np.empty((TILE_ROWS, 32 * n_words), dtype=np.float32)  # decoded rows, reused
        for i in range(task * n_tiles // n_tasks, (task + 1) * n_tiles // n_tasks):
            n0 = i * TILE_ROWS
            rows = min(TILE_ROWS, n_rows - n0)
            for r in range(rows):
                _decode_row(masks, values, row_ptr, n0 + r, tile[r])
            tile_matmul(tile, rows, x, y, n0)
            if scales.shape[0]:
                for t in range(x.shape[0]):
                    for r in range(rows):
                        y[t, n0 + r] *= scales[n0 + r]
    return y


class BitmaskLinear(PackedLinear):
    """Bitmask + packed values (bf16, or int8 with per-row float32 scales).

    Arrays: ``masks [N, ceil(K/32)] uint32`` (bit j of word c = column 32c + j, 1 = kept),
    ``values [nnz] uint16`` (bf16 bits) or ``int8``, ``row_ptr [N+1] int64`` (start of each row in
    ``values``), and for int8 ``scales [N] float32``.
    """

    FORMAT = "bitmask"

    @classmethod
    def pack(cls, weight, mask=None, values="bf16"):
        """Pack ``W [N, K]``: one bit per position, plus the kept values row by row.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible).
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; default: the nonzeros of ``weight``.
        values : {"bf16", "int8"}
            bf16 (nearest, ties to even), or int8 with one float32 scale per row
            (``max |kept w| / 127``; lossy, at most half a step per weight).

        Returns
        -------
        BitmaskLinear
            1/8 + 2d bytes per weight at density d (bf16), or 1/8 + d (int8).

        Raises
        ------
        NpsparseError
            Unknown ``values``, or a weight/mask shape or dtype problem.
        """
        check_option(values, VALUE_TYPES, "bitmask values")
        weight, keep = check_weight_mask(weight, mask)
        arrays = {"masks": pack_bits(keep)}
        if values == "bf16":
            arrays["values"] = to_bf16(weight[keep])  # row-major order = row by row
        else:
            q, arrays["scales"] = quantize_rows(weight, keep)
            arrays["values"] = q[keep]
        arrays["row_ptr"] = row_pointers(keep.sum(axis=1, dtype=np.int64))
        return cls(arrays, weight.shape)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored bitmask arrays as a layer, without copying them.

        Names, dtypes and shapes are checked, and that ``row_ptr`` agrees with the masks' bit
        counts (vectorised, once, at load: the kernels trust them).

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``masks [N, ceil(K/32)] uint32``, ``values [nnz] uint16`` (bf16 bits) or ``int8``,
            ``row_ptr [N+1] int64``, and for int8 ``scales [N] float32``; others are ignored.
        metadata : dict of str to str
            ``shape`` (``"N,K"``, required) and ``values`` (``"bf16"``, the default, or
            ``"int8"``).

        Returns
        -------
        BitmaskLinear

        Raises
        ------
        NpsparseError
            An unknown ``values``, an array missing or of the wrong dtype, rank or shape, mask
            bits set past column ``K``, or row pointers that do not match the masks.
        """
        values = metadata.get("values", "bf16")
        check_option(values, VALUE_TYPES, "bitmask values")
        expected = {"masks": (np.uint32, 2), "values": (VALUE_TYPES[values], 1),
                    "row_ptr": (np.int64, 1)}
        if values == "int8":
            expected["scales"] = (np.float32, 1)
        check_arrays(arrays, expected, cls.FORMAT)
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        _check_structure(arrays, shape)
        return cls({name: arrays[name] for name in expected}, shape)

    def __init__(self, arrays, shape):
        super().__init__(arrays, shape)
        self.values_type = "bf16" if arrays["values"].dtype == np.uint16 else "int8"
        self._no_scales = np.zeros(0, dtype=np.float32)

    def _options(self):
        return {"values": self.values_type}

    def _kernel_args(self):
        a = self.arrays
        return a["masks"], a["values"], a["row_ptr"], a.get("scales", self._no_scales)

    def _matmul(self, x):
        x = pad_columns(x, 32 * self.arrays["masks"].shape[1])
        if x.shape[0] == 1:
            return _gemv(*self._kernel_args(), x)
        return _gemm(*self._kernel_args(), x, gemm_tasks())

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop over each row's mask bits.

        Every set bit, in column order, takes the row's next packed value; int8 rows are then
        multiplied by their scale.
        """
        return _matmul_naive(*self._kernel_args(), np.ascontiguousarray(x, dtype=np.float32))

    def keep_mask(self) -> np.ndarray:
        """keep [N, K] bool: the stored positions."""
        return unpack_bits(self.arrays["masks"], self.shape[1])

    def to_dense(self):
        """The packed values put back at their mask positions."""
        dense = np.zeros(self.shape, dtype=np.float32)
        values = self.arrays["values"]
        if self.values_type == "bf16":
            dense[self.keep_mask()] = from_bf16(values)
        else:
            dense[self.keep_mask()] = values.astype(np.float32)
            dense *= self.arrays["scales"][:, None]
        return dense

    @property
    def nnz(self) -> int:
        """int: packed values, one per set mask bit (kept weights, including kept zeros)."""
        return int(self.arrays["values"].shape[0])


def _check_structure(arrays: dict, shape: tuple[int, int]) -> None:
    """Stored bitmask arrays agree with the shape and each other (row i's values are the
    ``popcount(masks[i])`` entries from ``row_ptr[i]``)."""
    rows, k_cols = shape
    shapes = {"masks": (rows, (k_cols + 31) // 32)}
    if "scales" in arrays:
        shapes["scales"] = (rows,)
    check_shapes(arrays, shapes, "bitmask")
    masks = arrays["masks"]
    nnz = arrays["values"].shape[0]
    check_row_pointers(arrays["row_ptr"], rows, nnz, "bitmask")
    if k_cols % 32 and rows and np.any(masks[:, -1] >> np.uint32(k_cols % 32)):
        raise NpsparseError(f"bitmask array 'masks' has bits set past column {k_cols}")
    counts = np.bitwise_count(masks).sum(axis=1, dtype=np.int64)  # [N] kept per row
    if np.any(counts != np.diff(arrays["row_ptr"])):
        raise NpsparseError("bitmask array 'row_ptr' does not match the number of mask bits "
                            "of each row")
