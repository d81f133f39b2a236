"""CSR format: per row, the kept values and their column indices, in column order.

Column indices are ``uint16`` when K <= 65536 (every column fits), else ``int32``; values are
float32 or bf16 (``uint16`` bits). Bytes per weight at density d: 4d with bf16 + uint16 (2.0 at
50%), 6d with float32 + uint16, 8d with float32 + int32. Row pointers are ``int64 [N+1]``.

CSR is the general-purpose sparse format (and what scipy.sparse uses); with two index bytes per
kept weight it only beats dense bf16 above ~50% sparsity, and its inner loop gathers activations
one by one, so it is compute-bound well below the read bandwidth (see
bench/results/kernel_bench.md).
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import (PackedLinear, check_arrays, check_option, check_row_pointers, check_shapes,
                     check_weight_mask, row_pointers)
from ._numba import row_block, gemm_tasks, jit, pjit
from ._simd import value_at
from ._tile import TILE_ROWS, tile_matmul
from .bf16 import from_bf16, to_bf16

VALUE_TYPES = {"fp32": np.float32, "bf16": np.uint16}


def index_dtype(k_cols: int) -> type:
    """uint16 column indices if every column index fits (``K <= 65536``), else int32.

    Parameters
    ----------
    k_cols : int
        The weight's width ``K``.

    Returns
    -------
    type
        ``np.uint16`` or ``np.int32``.
    """
    return np.uint16 if k_cols <= 65536 else np.int32


# ---- kernels: values [nnz] float32|uint16, cols [nnz] uint16|int32, row_ptr [N+1] int64,
# ---- x [T, K] float32 -> y [T, N] float32

@jit
def _matmul_naive(values, cols, row_ptr, x):  # x [T, K] -> y [T, N]
    n_rows = row_ptr.shape[0] - 1
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for n in range(n_rows):
            acc = np.float32(0.0)
            for p in range(row_ptr[n], row_ptr[n + 1]):
                acc += value_at(values, p) * x[t, cols[p]]
            y[t, n] = acc
    return y


@pjit
def _gemv(values, cols, row_ptr, x):  # x [1, K] -> y [1, N]
    n_rows = row_ptr.shape[0] - 1
    xs = x[0]  # [K]
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            # Row views indexed from 0: LLVM then sees contiguous loads (indexing from row_ptr[n]
            # kept Numba's negative-index check per element and ran 4x slower).
            row_values = values[row_ptr[n]:row_ptr[n + 1]]
            row_cols = cols[row_ptr[n]:row_ptr[n + 1]]
            acc = np.float32(0.0)
            for i in range(row_values.shape[0]):
                acc += value_at(row_values, i) * xs[np.intp(row_cols[i])]
            y[0, n] = acc
    return y


@pjit
def _gemm(values, cols, row_ptr, x, n_tasks):  # x [T, K] -> y [T, N]
    n_rows = row_ptr.shape[0] - 1
    k_cols = x.shape[1]
    y = np.empty((x.shape[0], n_rows), dtype=np.float32)
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    n_tasks = min(n_tiles, n_tasks)
    for task in numba.prange(n_tasks):
        tile = np.zeros((TILE_ROWS, k_cols), dtype=np.float32)  # scattered rows, reused
        for i in range(task * n_tiles // n_tasks, (task + 1) * n_tiles // n_tasks):
            n0 = i * TILE_ROWS
            rows = min(TILE_ROWS, n_rows - n0)
            for r in range(rows):
                for p in range(row_ptr[n0 + r], row_ptr[n0 + r + 1]):
                    tile[r, cols[p]] = value_at(values, p)
            tile_matmul(tile, rows, x, y, n0)
            for r in range(rows):  # clear only what was written
                for p in range(row_ptr[n0 + r], row_ptr[n0 + r + 1]):
                    tile[r, cols[p]] = 0.0
    return y


class CSRLinear(PackedLinear):
    """Compressed sparse rows with 16-bit (K <= 65536) or 32-bit column indices.

    Arrays: ``values [nnz] float32`` or ``uint16`` (bf16 bits), ``cols [nnz] uint16|int32``
    (ascending within each row), ``row_ptr [N+1] int64``.
    """

    FORMAT = "csr"

    @classmethod
    def pack(cls, weight, mask=None, values="bf16"):
        """Pack ``W [N, K]`` as compressed sparse rows.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible).
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; default: the nonzeros of ``weight``.
        values : {"bf16", "fp32"}
            Value storage; fp32 keeps the weights exactly.

        Returns
        -------
        CSRLinear
            Column indices are uint16 when ``K <= 65536``, else int32 (:func:`index_dtype`).

        Raises
        ------
        NpsparseError
            Unknown ``values``, or a weight/mask shape or dtype problem.
        """
        check_option(values, VALUE_TYPES, "csr values")
        weight, keep = check_weight_mask(weight, mask)
        rows, cols = np.nonzero(keep)  # row-major: rows ascending, columns ascending per row
        kept = weight[rows, cols]
        arrays = {
            "values": to_bf16(kept) if values == "bf16" else kept.astype(np.float32),
            "cols": cols.astype(index_dtype(weight.shape[1])),
            "row_ptr": row_pointers(np.bincount(rows, minlength=weight.shape[0])),
        }
        return cls(arrays, weight.shape)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored CSR arrays as a layer, without copying them.

        Names, dtypes, shapes and the indices' ranges are checked (vectorised, once, at load:
        the kernels trust them); columns need not be sorted within a row.

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``values [nnz]`` (``uint16`` bf16 bits, or ``float32``), ``cols [nnz]`` of
            :func:`index_dtype` for ``K``, and ``row_ptr [N+1] int64``; others are ignored.
        metadata : dict of str to str
            ``shape`` (``"N,K"``, required) and ``values`` (``"bf16"``, the default, or
            ``"fp32"``).

        Returns
        -------
        CSRLinear

        Raises
        ------
        NpsparseError
            An unknown ``values``, an array missing or of the wrong dtype, rank or shape, row
            pointers that decrease or do not run from 0 to ``nnz``, or a column ``>= K``.
        """
        values = metadata.get("values", "bf16")
        check_option(values, VALUE_TYPES, "csr values")
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        expected = {"values": (VALUE_TYPES[values], 1), "cols": (index_dtype(shape[1]), 1),
                    "row_ptr": (np.int64, 1)}
        check_arrays(arrays, expected, cls.FORMAT)
        _check_structure(arrays, shape)
        return cls({name: arrays[name] for name in expected}, shape)

    def __init__(self, arrays, shape):
        super().__init__(arrays, shape)
        self.values_type = "bf16" if arrays["values"].dtype == np.uint16 else "fp32"

    def _options(self):
        return {"values": self.values_type}

    def _kernel_args(self):
        return self.arrays["values"], self.arrays["cols"], self.arrays["row_ptr"]

    def _matmul(self, x):
        if x.shape[0] == 1:
            return _gemv(*self._kernel_args(), x)
        return _gemm(*self._kernel_args(), x, gemm_tasks())

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop: per row, ``sum values[p] * x[t, cols[p]]``."""
        return _matmul_naive(*self._kernel_args(), np.ascontiguousarray(x, dtype=np.float32))

    def to_dense(self):
        """The stored values scattered to ``(row, cols[p])``."""
        values = self.arrays["values"]
        row_ptr = self.arrays["row_ptr"]
        rows = np.repeat(np.arange(self.shape[0]), np.diff(row_ptr))
        dense = np.zeros(self.shape, dtype=np.float32)
        dense[rows, self.arrays["cols"]] = (from_bf16(values) if self.values_type == "bf16"
                                            else values)
        return dense

    @property
    def nnz(self) -> int:
        """int: stored entries, the length of ``values`` (kept weights, including kept zeros)."""
        return int(self.arrays["values"].shape[0])


def _check_structure(arrays: dict, shape: tuple[int, int]) -> None:
    """Stored CSR arrays agree with the shape and each other; every column is below K."""
    nnz = arrays["values"].shape[0]
    check_shapes(arrays, {"cols": (nnz,)}, "csr")
    check_row_pointers(arrays["row_ptr"], shape[0], nnz, "csr")
    cols = arrays["cols"]
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= shape[1]):
        raise NpsparseError(f"csr array 'cols' holds columns outside [0, {shape[1]})")
