"""N:M format: in every group of M consecutive input columns, N weights are pruned (zero).

Naming follows the Wanda/SparseGPT code (``prune_n``, ``prune_m``): "2:4" prunes 2 of every 4 and
keeps 2; "4:8" keeps 4 of 8. A row stores its ``M - N`` kept values per group (bf16, or int8 with a
row scale as in :mod:`.bitmask`) and, per kept value, its position inside the group in
``b = ceil(log2 M)`` bits (2 bits for M=4, 3 for M=8), packed LSB-first into a byte stream.
2:4 bf16 costs 2*2 + 2*2/8 = 4.5 bytes per 4 weights (1.125/weight), 4:8 bf16 1.1875.

A group of the mask may keep fewer than M - N positions; the free slots then store zeros at the
lowest pruned positions (the product is unchanged). Keeping more is an error.

The fast kernel turns each 32-column chunk of index bits into a 32-bit keep mask with a small
lookup table, then reuses the bitmask expand kernel (``_simd``); every row has the same number of
values, so no row pointers are stored.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import PackedLinear, check_arrays, check_weight_mask
from ._numba import ROWS_PER_TASK, gemm_tasks, jit, pjit
from ._simd import OVERREAD, expand_dot, expand_row, value_at
from ._tile import TILE_ROWS, tile_matmul
from .bf16 import from_bf16, to_bf16
from .bitmask import VALUE_TYPES, quantize_rows


def parse_pattern(pattern) -> tuple[int, int]:
    """"2:4" or (2, 4) -> (n_pruned, m), checked: 1 <= n < m <= 32."""
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
    """Bits per in-group position: ceil(log2 M)."""
    return max(1, (m - 1).bit_length())


def group_positions(keep: np.ndarray, n: int, m: int) -> np.ndarray:
    """keep [N, K] bool -> kept in-group positions [N, K/M, M-N] uint8, ascending per group.

    Groups keeping fewer than ``M - N`` are filled with their lowest pruned positions.
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
    """positions [N, G, S] (< M) -> bit stream [N, ceil(G*S*b/8)] uint8, b bits each, LSB first."""
    rows = positions.shape[0]
    b = index_bits(m)
    bits = (positions.reshape(rows, -1)[:, :, None] >> np.arange(b, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(rows, -1).astype(np.uint8), axis=1, bitorder="little")


def unpack_indices(stream: np.ndarray, m: int, groups: int, kept: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: -> positions [N, G, S] uint8."""
    rows = stream.shape[0]
    b = index_bits(m)
    bits = np.unpackbits(stream, axis=1, bitorder="little", count=groups * kept * b)
    weights = (1 << np.arange(b)).astype(np.uint16)
    positions = (bits.reshape(rows, groups * kept, b) * weights).sum(axis=2)
    return positions.reshape(rows, groups, kept).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _fast_plan(n: int, m: int, k_cols: int):
    """Lookup table for the fast kernel, or None if this pattern/width needs the naive one.

    Returns (lut, lut_bits, lut_span, lookups, chunk_bytes): every 32-column chunk is
    ``chunk_bytes`` bytes of index stream, read as ``lookups`` fields of ``lut_bits`` bits, each
    mapped by ``lut`` to the keep mask of ``lut_span`` columns.
    """
    kept, b = m - n, index_bits(m)
    field = kept * b  # bits per group
    if k_cols % 32 or 32 % m or (32 // m) * field % 8 or (32 // m) * field > 64:
        return None
    groups_per_chunk = 32 // m
    per_lookup = max((j for j in range(1, groups_per_chunk + 1)
                      if groups_per_chunk % j == 0 and j * field <= 12), default=0)
    if per_lookup == 0:
        return None
    lut_bits = per_lookup * field
    lut = np.zeros(1 << lut_bits, dtype=np.uint32)
    for value in range(1 << lut_bits):
        for slot in range(per_lookup * kept):
            position = (value >> (slot * b)) & ((1 << b) - 1)
            lut[value] |= np.uint32(1 << ((slot // kept) * m + position))
    return (lut, lut_bits, per_lookup * m, groups_per_chunk // per_lookup,
            groups_per_chunk * field // 8)


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


@jit
def _row_masks(indices, n, lut, lut_bits, lut_span, lookups, chunk_bytes, words):
    """Keep-mask words [32-column chunks] of row n, decoded from its index stream."""
    field_mask = np.uint64((1 << lut_bits) - 1)
    for c in range(words.shape[0]):
        stream = np.uint64(0)
        for i in range(chunk_bytes):
            stream |= np.uint64(indices[n, c * chunk_bytes + i]) << np.uint64(8 * i)
        word = np.uint32(0)
        for q in range(lookups):
            field = (stream >> np.uint64(q * lut_bits)) & field_mask
            word |= lut[field] << np.uint32(q * lut_span)
        words[c] = word


@pjit
def _gemv(values, indices, scales, m, kept, plan, x):  # x [1, K], K % 32 == 0 -> y [1, N]
    lut, lut_bits, lut_span, lookups, chunk_bytes = plan
    n_rows, n_values = values.shape
    n_words = x.shape[1] // 32
    y = np.empty((1, n_rows), dtype=np.float32)
    safe_end = n_rows * n_values - OVERREAD  # rows ending later use the scalar loop
    for task in numba.prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        words = np.empty(n_words, dtype=np.uint32)
        for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            if (n + 1) * n_values <= safe_end:
                _row_masks(indices, n, lut, lut_bits, lut_span, lookups, chunk_bytes, words)
                acc = expand_dot(words, 0, values, n * n_values, x, 0, n_words)
            else:
                acc = _row_dot_naive(values, indices, m, kept, n, x, 0)
            y[0, n] = acc * scales[n] if scales.shape[0] else acc
    return y


@pjit
def _gemm(values, indices, scales, m, kept, plan, x, n_tasks):  # x [T, K], K % 32 == 0
    lut, lut_bits, lut_span, lookups, chunk_bytes = plan
    n_rows, n_values = values.shape
    k_cols = x.shape[1]
    y = np.empty((x.shape[0], n_rows), dtype=np.float32)
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    n_tasks = min(n_tiles, n_tasks)
    safe_end = n_rows * n_values - OVERREAD
    for task in numba.prange(n_tasks):
        tile = np.empty((TILE_ROWS, k_cols), dtype=np.float32)  # decoded rows, reused
        words = np.empty(k_cols // 32, dtype=np.uint32)
        for i in range(task * n_tiles // n_tasks, (task + 1) * n_tiles // n_tasks):
            n0 = i * TILE_ROWS
            rows = min(TILE_ROWS, n_rows - n0)
            for r in range(rows):
                n = n0 + r
                _row_masks(indices, n, lut, lut_bits, lut_span, lookups, chunk_bytes, words)
                if (n + 1) * n_values <= safe_end:
                    expand_row(words, 0, values, n * n_values, tile[r], 0, words.shape[0])
                else:
                    _decode_row_scalar(words, values[n], tile[r])
            tile_matmul(tile, rows, x, y, n0)
            if scales.shape[0]:
                for t in range(x.shape[0]):
                    for r in range(rows):
                        y[t, n0 + r] *= scales[n0 + r]
    return y


@jit
def _decode_row_scalar(words, row_values, out):  # keep words + packed values -> out [K]
    p = 0
    for k in range(out.shape[0]):
        if (words[k >> 5] >> np.uint32(k & 31)) & np.uint32(1):
            out[k] = value_at(row_values, p)
            p += 1
        else:
            out[k] = 0.0


class NMLinear(PackedLinear):
    """N:M structured sparsity: ``M - N`` values and their in-group positions per group of M.

    Arrays: ``values [N, K/M*(M-N)] uint16`` (bf16 bits) or ``int8``, ``indices [N, bytes] uint8``
    (positions, ``ceil(log2 M)`` bits each, LSB first), and for int8 ``scales [N] float32``.
    """

    FORMAT = "nm"

    @classmethod
    def pack(cls, weight, mask=None, pattern="2:4", values="bf16"):
        """Pack ``W [N, K]``; ``mask`` must prune at least N of every M (default: the zeros)."""
        n, m = parse_pattern(pattern)
        if values not in VALUE_TYPES:
            raise NpsparseError(f"nm values must be one of {sorted(VALUE_TYPES)}, got {values!r}")
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
        n, m = parse_pattern(metadata.get("pattern", ""))
        values = metadata.get("values", "bf16")
        if values not in VALUE_TYPES:
            raise NpsparseError(f"nm values must be one of {sorted(VALUE_TYPES)}, got {values!r}")
        expected = {"values": (VALUE_TYPES[values], 2), "indices": (np.uint8, 2)}
        if values == "int8":
            expected["scales"] = (np.float32, 1)
        check_arrays(arrays, expected, cls.FORMAT)
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        return cls({name: arrays[name] for name in expected}, shape, n, m)

    def __init__(self, arrays, shape, n, m):
        super().__init__(arrays, shape)
        self.n, self.m = n, m
        self.values_type = "bf16" if arrays["values"].dtype == np.uint16 else "int8"
        self._no_scales = np.zeros(0, dtype=np.float32)

    def _options(self):
        return {"pattern": f"{self.n}:{self.m}", "values": self.values_type}

    def _kernel_args(self):
        a = self.arrays
        return a["values"], a["indices"], a.get("scales", self._no_scales)

    def _matmul(self, x):
        plan = _fast_plan(self.n, self.m, self.shape[1])
        if plan is None:
            return self.matmul_naive(x)
        if x.shape[0] == 1:
            return _gemv(*self._kernel_args(), self.m, self.m - self.n, plan, x)
        return _gemm(*self._kernel_args(), self.m, self.m - self.n, plan, x, gemm_tasks())

    def matmul_naive(self, x):
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
        return int(self.arrays["values"].size)
