"""N:M format: in every group of M consecutive input columns, N weights are pruned (zero).

Naming follows the Wanda/SparseGPT code (``prune_n``, ``prune_m``): "2:4" prunes 2 of every 4 and
keeps 2; "4:8" keeps 4 of 8. A row stores its ``M - N`` kept values per group (bf16, or int8 with a
row scale as in :mod:`.bitmask`) and, per kept value, its position inside the group in
``b = ceil(log2 M)`` bits (2 bits for M=4, 3 for M=8), packed LSB-first into a byte stream.
2:4 bf16 costs 2*2 + 2*2/8 = 4.5 bytes per 4 weights (1.125/weight), 4:8 bf16 1.1875.

A group of the mask may keep fewer than M - N positions; the free slots then store zeros at the
lowest pruned positions (the product is unchanged). Keeping more is an error.

Every row has the same number of values, so no row pointers are stored. For the 50% patterns
(2:4, 4:8) the fast kernel picks activations with a two-register permute (``_simd.nm_dot``);
other patterns, widths not a multiple of 32 and non-AVX-512 hosts use the naive kernel.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import PackedLinear, check_arrays, check_option, check_shapes, check_weight_mask
from ._numba import row_block, jit, pjit
from ._simd import (HAS_BMI2, HAS_PERMUTE, NM_OVERREAD_BYTES, nm24_dot, nm_dot1, nm_dot4,
                    value_at)
from .bf16 import from_bf16, to_bf16
from .bitmask import VALUE_TYPES, quantize_rows


def parse_pattern(pattern) -> tuple[int, int]:
    """"2:4" or (2, 4) -> (n_pruned, m), checked: 1 <= n < m <= 32.

    Parameters
    ----------
    pattern : str or (int, int)
        ``"N:M"`` or a pair, ``N`` pruned of every ``M`` consecutive input columns.

    Returns
    -------
    (n, m) : tuple of int

    Raises
    ------
    NpsparseError
        Not of the form ``"N:M"`` / a pair of integers, or not ``1 <= N < M <= 32``.
    """
    try:
        if isinstance(pattern, str):
            n, m = (int(part) for part in pattern.split(":"))
        else:
            n, m = (int(part) for part in pattern)
    except (TypeError, ValueError):
        raise NpsparseError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 1 <= n < m <= 32:
        raise NpsparseError(f"N:M pattern {n}:{m} needs 1 <= N < M <= 32 (N pruned of every M)")
    return n, m


def index_bits(m: int) -> int:
    """Bits per in-group position: ceil(log2 M).

    Parameters
    ----------
    m : int
        Group size ``M >= 2``.

    Returns
    -------
    int
        ``b``: 1 for M=2, 2 for M=4, 3 for M=8 (at least 1).
    """
    return max(1, (m - 1).bit_length())


def group_positions(keep: np.ndarray, n: int, m: int) -> np.ndarray:
    """keep [N, K] bool -> kept in-group positions [N, K/M, M-N] uint8, ascending per group.

    Groups keeping fewer than ``M - N`` are filled with their lowest pruned positions.

    Parameters
    ----------
    keep : np.ndarray
        ``[N, K]`` bool, True = kept.
    n : int
        Weights pruned per group (``N`` of the pattern, not the row count).
    m : int
        Group size ``M``; must divide ``K``.

    Returns
    -------
    np.ndarray
        ``[N, K/M, M-N]`` uint8, positions ``0 .. M-1`` within each group, ascending.

    Raises
    ------
    NpsparseError
        ``K`` not a multiple of ``M``, or a group keeping more than ``M - N`` (the message
        names the first such row and columns).
    """
    rows, k_cols = keep.shape
    if k_cols % m:
        raise NpsparseError(f"width K={k_cols} is not divisible by M={m} for the {n}:{m} pattern")
    kept_per_group = m - n
    groups = keep.reshape(rows, k_cols // m, m)
    counts = groups.sum(axis=2)
    if (counts > kept_per_group).any():
        r, g = np.argwhere(counts > kept_per_group)[0]
        raise NpsparseError(f"mask is not {n}:{m}: row {r}, columns {g * m}..{g * m + m - 1} keep "
                            f"{counts[r, g]} of {m} (at most {kept_per_group} allowed)")
    # Stable sort puts kept positions first (in order), then pruned ones (in order).
    order = np.argsort(~groups, axis=2, kind="stable")[:, :, :kept_per_group]
    return np.sort(order, axis=2).astype(np.uint8)


def pack_indices(positions: np.ndarray, m: int) -> np.ndarray:
    """positions [N, G, S] (< M) -> bit stream [N, ceil(G*S*b/8)] uint8, b bits each, LSB first.

    Parameters
    ----------
    positions : np.ndarray
        ``[N, G, S]`` uint8 in-group positions, each ``< M`` (``G = K/M`` groups, ``S = M - N``
        kept per group), as :func:`group_positions` returns.
    m : int
        Group size ``M``; sets ``b = index_bits(M)``.

    Returns
    -------
    np.ndarray
        ``[N, ceil(G*S*b/8)]`` uint8: each row's positions in order, position ``e`` in bits
        ``e*b .. e*b + b - 1`` of the row's stream (bit ``i`` of byte ``j`` = stream bit
        ``8 j + i``); the last byte is zero-padded.
    """
    rows = positions.shape[0]
    b = index_bits(m)
    bits = (positions.reshape(rows, -1)[:, :, None] >> np.arange(b, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(rows, -1).astype(np.uint8), axis=1, bitorder="little")


def unpack_indices(stream: np.ndarray, m: int, groups: int, kept: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: -> positions [N, G, S] uint8.

    Parameters
    ----------
    stream : np.ndarray
        ``[N, bytes]`` uint8, as :func:`pack_indices` returns.
    m : int
        Group size ``M``; sets ``b = index_bits(M)``.
    groups : int
        ``G = K/M``, groups per row.
    kept : int
        ``S = M - N``, positions stored per group.

    Returns
    -------
    np.ndarray
        ``[N, G, S]`` uint8 in-group positions.
    """
    rows = stream.shape[0]
    b = index_bits(m)
    bits = np.unpackbits(stream, axis=1, bitorder="little", count=groups * kept * b)
    weights = (1 << np.arange(b)).astype(np.uint16)
    positions = (bits.reshape(rows, groups * kept, b) * weights).sum(axis=2)
    return positions.reshape(rows, groups, kept).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _fast_plan(n: int, m: int, k_cols: int):
    """Constants for the permute kernel (``_simd.nm_dot``), or None if it does not apply.

    It needs M = 2 * kept (2:4, 4:8, ...; sixteen values then cover 32 columns), b <= 4 (sixteen
    indices fit a 64-bit load), K % 32 == 0 and AVX-512. Returns (lanes, chunk_bytes, field):
    ``lanes[:16]`` the bit offset of each value's index within its 32-bit word (values 0-7 read
    the chunk's first word, 8-15 the word b bytes later), ``lanes[16:]`` the first column of each
    value's group, ``chunk_bytes = 2 b`` index bytes per chunk, ``field = 2^b - 1``.
    """
    kept, b = m - n, index_bits(m)
    if not HAS_PERMUTE or m != 2 * kept or b > 4 or k_cols % 32:
        return None
    j = np.arange(16, dtype=np.int64)
    lanes = np.concatenate([(j % 8) * b, (j // kept) * m]).astype(np.int64)
    return lanes, 2 * b, (1 << b) - 1


# ---- kernels: values [N, G*S] uint16|int8, indices [N, bytes] uint8, scales [N] float32 or [0],
# ---- x [T, K] float32 -> y [T, N] float32  (G = K/M groups, S = M-N kept per group, b bits)

@jit
def _row_dot_naive(values, indices, m, kept, n, x, t):  # one output: row n of W times x[t]
    n_values = values.shape[1]
    b = 1
    while (1 << b) < m:  # index_bits(m)
        b += 1
    acc = np.float32(0.0)
    for e in range(n_values):
        position = 0
        for i in range(b):
            bit = e * b + i
            position |= ((indices[n, bit >> 3] >> (bit & 7)) & 1) << i
        acc += value_at(values[n], e) * x[t, (e // kept) * m + position]
    return acc


@jit
def _matmul_naive(values, indices, scales, m, kept, x):  # x [T, K] -> y [T, N]
    n_rows = values.shape[0]
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for n in range(n_rows):
            acc = _row_dot_naive(values, indices, m, kept, n, x, t)
            y[t, n] = acc * scales[n] if scales.shape[0] else acc
    return y


@pjit
def _gemv(values, indices, scales, m, kept, lanes, chunk_bytes, field, x):  # x [1, K] -> [1, N]
    n_rows, n_values = values.shape
    row_bytes = indices.shape[1]
    n_chunks = x.shape[1] // 32
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    n_tasks = (n_rows + rows_per - 1) // rows_per
    token_offsets = np.zeros(1, dtype=np.int64)  # read-only: shared by every task
    results = np.empty(n_tasks, dtype=np.float32)  # one slot per task: no allocation per task
    for task in numba.prange(n_tasks):
        result = results[task:task + 1]
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            if (n + 1) * row_bytes + NM_OVERREAD_BYTES <= indices.size:
                nm_dot1(values, n * n_values, indices, n * row_bytes, chunk_bytes, x,
                        token_offsets, n_chunks, lanes, field, result)
                acc = result[0]
            else:  # the last row: its 8-byte index loads could run past the array
                acc = _row_dot_naive(values, indices, m, kept, n, x, 0)
            y[0, n] = acc * scales[n] if scales.shape[0] else acc
    return y


@jit
def x_phases(x, t):
    """x[t] rearranged for ``nm24_dot``: ``phases[64 b + 16 p + j] = x[t, 64 b + 4 j + p]``.

    Parameters
    ----------
    x : np.ndarray
        ``[T, K]`` float32 with ``K`` a multiple of 64 (entries past the last whole 64-column
        block are left unset).
    t : int
        The token (row of ``x``) to rearrange.

    Returns
    -------
    np.ndarray
        ``[K]`` float32: per 64-column block, four runs of 16, run ``p`` holding column
        ``4 j + p`` of every group ``j``.
    """
    k_cols = x.shape[1]
    phases = np.empty(k_cols, dtype=np.float32)
    for b in range(k_cols // 64):
        for j in range(16):
            for p in range(4):
                phases[64 * b + 16 * p + j] = x[t, 64 * b + 4 * j + p]
    return phases


@pjit
def _gemv24(values, indices, x):  # 2:4, bf16 values, K % 64 == 0: x [1, K] -> y [1, N]
    n_rows, n_values = values.shape
    row_bytes = indices.shape[1]
    phases = x_phases(x, 0)
    n_blocks = x.shape[1] // 64
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            y[0, n] = nm24_dot(values, n * n_values, indices, n * row_bytes, phases, n_blocks)
    return y


@pjit
def _gemm(values, indices, scales, m, kept, lanes, chunk_bytes, field, x):  # x [T, K] -> [T, N]
    n_rows, n_values = values.shape
    n_tokens, k_cols = x.shape
    row_bytes = indices.shape[1]
    y = np.empty((n_tokens, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        token_offsets = np.zeros(4, dtype=np.int64)
        result = np.empty(4, dtype=np.float32)
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            scale = scales[n] if scales.shape[0] else np.float32(1.0)
            if (n + 1) * row_bytes + NM_OVERREAD_BYTES > indices.size:
                for t in range(n_tokens):
                    y[t, n] = _row_dot_naive(values, indices, m, kept, n, x, t) * scale
                continue
            for t0 in range(0, n_tokens, 4):  # four tokens per pass; a short tail repeats the last
                for s in range(4):
                    token_offsets[s] = min(t0 + s, n_tokens - 1) * k_cols
                nm_dot4(values, n * n_values, indices, n * row_bytes, chunk_bytes, x,
                        token_offsets, k_cols // 32, lanes, field, result)
                for s in range(min(4, n_tokens - t0)):
                    y[t0 + s, n] = result[s] * scale
    return y


class NMLinear(PackedLinear):
    """N:M structured sparsity: ``M - N`` values and their in-group positions per group of M.

    Arrays: ``values [N, K/M*(M-N)] uint16`` (bf16 bits) or ``int8``, ``indices [N, bytes] uint8``
    (positions, ``ceil(log2 M)`` bits each, LSB first), and for int8 ``scales [N] float32``.
    """

    FORMAT = "nm"

    @classmethod
    def pack(cls, weight, mask=None, pattern="2:4", values="bf16"):
        """Pack ``W [N, K]`` in an N:M pattern: ``M - N`` values and their positions per group.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible); ``K`` must be a multiple of ``M``.
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; every group of ``M`` consecutive columns may keep at
            most ``M - N`` (default: the nonzeros). Groups keeping fewer store zero fillers.
        pattern : str or (int, int)
            ``"2:4"`` (N pruned of every M), ``"4:8"``, ...
        values : {"bf16", "int8"}
            bf16, or int8 with one float32 scale per row (lossy).

        Returns
        -------
        NMLinear
            2:4 with bf16 values: 1.125 bytes per weight; 4:8: 1.1875.

        Raises
        ------
        NpsparseError
            A malformed pattern, ``K`` not a multiple of ``M``, or a group keeping too many.
        """
        n, m = parse_pattern(pattern)
        check_option(values, VALUE_TYPES, "nm values")
        weight, keep = check_weight_mask(weight, mask)
        positions = group_positions(keep, n, m)  # [N, G, S]
        rows, k_cols = weight.shape
        columns = (np.arange(k_cols // m)[None, :, None] * m + positions).reshape(rows, -1)
        kept_weights = np.where(keep, weight, np.float32(0.0))
        picked = np.take_along_axis(kept_weights, columns.astype(np.int64), axis=1)  # [N, G*S]
        arrays = {"indices": pack_indices(positions, m)}
        if values == "bf16":
            arrays["values"] = to_bf16(picked)
        else:
            q, arrays["scales"] = quantize_rows(picked, np.ones(picked.shape, dtype=np.bool_))
            arrays["values"] = q
        return cls(arrays, weight.shape, n, m)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored N:M arrays as a layer, without copying them.

        Names, dtypes and shapes are checked against the pattern and ``shape`` (and, when
        ``M`` is not a power of two, that every stored position is below ``M``).

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``values [N, K/M*(M-N)] uint16`` (bf16 bits) or ``int8``, ``indices [N, bytes]
            uint8``, and for int8 ``scales [N] float32``; others are ignored.
        metadata : dict of str to str
            ``pattern`` (``"N:M"``, required), ``shape`` (``"N,K"``, required) and ``values``
            (``"bf16"``, the default, or ``"int8"``).

        Returns
        -------
        NMLinear

        Raises
        ------
        NpsparseError
            A missing or malformed ``pattern``, an unknown ``values``, ``K`` not a multiple of
            ``M``, an array missing or of the wrong dtype, rank or shape, or a position ``>= M``.
        """
        n, m = parse_pattern(metadata.get("pattern", ""))
        values = metadata.get("values", "bf16")
        check_option(values, VALUE_TYPES, "nm values")
        expected = {"values": (VALUE_TYPES[values], 2), "indices": (np.uint8, 2)}
        if values == "int8":
            expected["scales"] = (np.float32, 1)
        check_arrays(arrays, expected, cls.FORMAT)
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        _check_structure(arrays, shape, n, m)
        return cls({name: arrays[name] for name in expected}, shape, n, m)

    def __init__(self, arrays, shape, n, m):
        super().__init__(arrays, shape)
        self.n, self.m = n, m
        self.values_type = "bf16" if arrays["values"].dtype == np.uint16 else "int8"
        self._no_scales = np.zeros(0, dtype=np.float32)
        # GEMV through _simd.nm24_dot (blends, no permutes): 2:4, bf16 values, 64-column blocks
        self._blend_gemv = (HAS_PERMUTE and HAS_BMI2 and (n, m) == (2, 4)
                            and self.values_type == "bf16" and self.shape[1] % 64 == 0)

    def _options(self):
        return {"pattern": f"{self.n}:{self.m}", "values": self.values_type}

    def _kernel_args(self):
        a = self.arrays
        return a["values"], a["indices"], a.get("scales", self._no_scales)

    def _matmul(self, x):
        if x.shape[0] == 1 and self._blend_gemv:
            return _gemv24(self.arrays["values"], self.arrays["indices"], x)
        plan = _fast_plan(self.n, self.m, self.shape[1])
        if plan is None:
            return self.matmul_naive(x)
        kernel = _gemv if x.shape[0] == 1 else _gemm
        return kernel(*self._kernel_args(), self.m, self.m - self.n, *plan, x)

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop over each row's values.

        Value ``e`` of a row reads its ``b``-bit position from the index stream and meets
        ``x[t, (e // (M-N)) * M + position]``; int8 rows are then multiplied by their scale.
        Also the fast path's fallback for patterns other than 50%, ``K`` not a multiple of 32,
        and hosts without AVX-512.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        return _matmul_naive(*self._kernel_args(), self.m, self.m - self.n, x)

    def positions(self) -> np.ndarray:
        """Stored in-group positions [N, K/M, M-N] uint8."""
        return unpack_indices(self.arrays["indices"], self.m, self.shape[1] // self.m,
                              self.m - self.n)

    def keep_mask(self) -> np.ndarray:
        """keep [N, K] bool: the stored positions (a superset of the packed mask)."""
        rows, k_cols = self.shape
        keep = np.zeros((rows, k_cols // self.m, self.m), dtype=np.bool_)
        np.put_along_axis(keep, self.positions().astype(np.int64), True, axis=2)
        return keep.reshape(rows, k_cols)

    def to_dense(self):
        """The stored values put back at their in-group positions."""
        rows, k_cols = self.shape
        values = self.arrays["values"]
        if self.values_type == "bf16":
            stored = from_bf16(values)
        else:
            stored = values.astype(np.float32) * self.arrays["scales"][:, None]
        dense = np.zeros((rows, k_cols // self.m, self.m), dtype=np.float32)
        np.put_along_axis(dense, self.positions().astype(np.int64),
                          stored.reshape(rows, k_cols // self.m, -1), axis=2)
        return dense.reshape(rows, k_cols)

    @property
    def nnz(self) -> int:
        """int: stored values, ``N * K/M * (M-N)``, including zero fillers of sparser groups."""
        return int(self.arrays["values"].size)


def _check_structure(arrays: dict, shape: tuple[int, int], n: int, m: int) -> None:
    """Stored N:M arrays have the sizes the shape and pattern imply; positions lie in groups."""
    rows, k_cols = shape
    if k_cols % m:
        raise NpsparseError(f"nm layer has K={k_cols} columns, not a multiple of M={m}")
    stored = k_cols // m * (m - n)  # values per row
    shapes = {"values": (rows, stored), "indices": (rows, (stored * index_bits(m) + 7) // 8)}
    if "scales" in arrays:
        shapes["scales"] = (rows,)
    check_shapes(arrays, shapes, "nm")
    if m & (m - 1) and rows:  # b bits can name positions >= M only when M is no power of two
        positions = unpack_indices(arrays["indices"], m, k_cols // m, m - n)
        if positions.max() >= m:
            raise NpsparseError(f"nm array 'indices' holds in-group positions >= M={m}")
