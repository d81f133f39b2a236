"""Panel bitmask format: the bitmask of :mod:`.bitmask`, laid out for 16 output rows at a time.

Rows are grouped in panels of 16 (the last padded with empty rows) and columns in pairs (K padded
to even). Per panel and column pair ``j`` one uint32 mask word: bit ``r`` = (row ``16 q + r``,
column ``2 j``) kept, bit ``16 + r`` = (same row, column ``2 j + 1``) kept. A panel's kept values
(bf16 bits) follow its words in bit order, contiguous per panel; ``panel_ptr`` holds where each
panel starts. 2:4 and other N:M masks ride the same kernel.

Bytes per weight at density d: 1/8 + 2d (as bitmask), with one 8-byte pointer per 16 rows instead
of per row. The kernel (see :mod:`._panel_simd`) expands one word's values into 32 lanes and meets
x[k], x[k+1] with two FMAs into 16 row accumulators, storing 16 outputs at once: x is read once per
panel and no horizontal sum is needed (the bitmask kernel re-reads x per row and sums per row).
Each output is exact float32 arithmetic; only the summation order differs from the naive loop.

``auto`` (:func:`npsparse.kernels.choose_format`) weighs it in place of ``bitmask`` while
:data:`npsparse.kernels.AUTO_ROW_MASK` is ``"panel"``.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import (PackedLinear, check_arrays, check_shapes, check_weight_mask, pack_words,
                     pad_columns, row_pointers, unpack_words)
from ._numba import jit, pjit
from ._panel_simd import (OVERREAD, panel_dot, panel_dot4, panel_dot4_portable,
                          panel_dot_portable)
from ._simd import value_at
from .bf16 import from_bf16, to_bf16

PANEL = 16  # rows per panel: one float32 AVX-512 register of outputs


def panel_nbytes(n_rows: int, k_cols: int, nnz: int) -> int:
    """Bytes a panel layer of this size holds: mask words, bf16 values and panel pointers.

    Parameters
    ----------
    n_rows, k_cols : int
        ``N`` and ``K`` of the weight.
    nnz : int
        Kept weights.

    Returns
    -------
    int
        ``4 P ceil(K/2) + 2 nnz + 8 (P + 1)`` with ``P = ceil(N/16)`` panels.
    """
    panels = -(-n_rows // PANEL)
    return 4 * panels * -(-k_cols // 2) + 2 * nnz + 8 * (panels + 1)


def _panel_order(a: np.ndarray, fill) -> np.ndarray:
    """[N, K] -> [P, KP, 2, 16]: panel, column pair, column in pair, row in panel (bit order)."""
    n_rows, k_cols = a.shape
    panels, pairs = -(-n_rows // PANEL), -(-k_cols // 2)
    padded = np.full((panels * PANEL, pairs * 2), fill, dtype=a.dtype)
    padded[:n_rows, :k_cols] = a
    return padded.reshape(panels, PANEL, pairs, 2).transpose(0, 2, 3, 1)


def _from_panel_order(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_panel_order`: [P, KP, 2, 16] -> [N, K]."""
    panels, pairs = a.shape[:2]
    rows = a.transpose(0, 3, 1, 2).reshape(panels * PANEL, pairs * 2)
    return np.ascontiguousarray(rows[: shape[0], : shape[1]])


def pack_panel_bits(keep: np.ndarray) -> np.ndarray:
    """keep [N, K] bool -> words [ceil(N/16), ceil(K/2)] uint32 in the panel bit order.

    Parameters
    ----------
    keep : np.ndarray
        ``[N, K]`` bool, True = kept.

    Returns
    -------
    np.ndarray
        ``[P, KP]`` uint32; bit ``r`` of word ``(q, j)`` is ``keep[16 q + r, 2 j]``, bit
        ``16 + r`` is ``keep[16 q + r, 2 j + 1]``; padding rows and columns are 0.
    """
    bits = _panel_order(keep, False)  # [P, KP, 2, 16] = [P, KP, 32] in bit order
    return pack_words(bits.reshape(*bits.shape[:2], 32), 32)


def unpack_panel_bits(words: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pack_panel_bits`: words [P, KP] uint32 -> keep [N, K] bool.

    Parameters
    ----------
    words : np.ndarray
        ``[ceil(N/16), ceil(K/2)]`` uint32 mask words.
    shape : tuple of int
        ``(N, K)``; padding rows and columns are dropped.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool.
    """
    return _from_panel_order(_bits_in_order(words), shape)


def _bits_in_order(words: np.ndarray) -> np.ndarray:
    """words [P, KP] uint32 -> bits [P, KP, 2, 16] bool (bit order)."""
    return unpack_words(words, 32).reshape(*words.shape, 2, PANEL)


# ---- kernels: masks [P, KP] uint32, values [nnz] uint16, panel_ptr [P+1] int64 -----------------

@jit
def _matmul_naive(masks, values, panel_ptr, x, n_rows):  # x [T, K] -> y [T, N]
    n_panels, n_pairs = masks.shape
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for q in range(n_panels):
            p = panel_ptr[q]
            for j in range(n_pairs):
                word = masks[q, j]
                for b in range(32):  # bit order: rows of column 2j, then rows of column 2j+1
                    if (word >> np.uint32(b)) & np.uint32(1):
                        y[t, PANEL * q + (b & 15)] += value_at(values, p) * x[t, 2 * j + (b >> 4)]
                        p += 1
    return y


@jit
def _panel(masks, values, panel_ptr, x, q, exact, y):  # panel q, every token -> y [T, 16 P]
    n_pairs = masks.shape[1]
    n_tokens, xstride, ostride = x.shape[0], x.shape[1], y.shape[1]
    start, moff, ooff = panel_ptr[q], q * n_pairs, PANEL * q
    t = 0
    while t + 4 <= n_tokens:  # four tokens per pass: each word is expanded once for all four
        if exact:
            panel_dot4_portable(masks, moff, values, start, x, t * xstride, xstride, n_pairs,
                                y, ooff + t * ostride, ostride)
        else:
            panel_dot4(masks, moff, values, start, x, t * xstride, xstride, n_pairs, y,
                       ooff + t * ostride, ostride)
        t += 4
    while t < n_tokens:
        if exact:
            panel_dot_portable(masks, moff, values, start, x, t * xstride, 0, n_pairs, y,
                               ooff + t * ostride, 0)
        else:
            panel_dot(masks, moff, values, start, x, t * xstride, 0, n_pairs, y,
                      ooff + t * ostride, 0)
        t += 1


@pjit
def _matmul(masks, values, panel_ptr, x, portable):  # x [T, 2 KP] zero-padded -> y [T, 16 P]
    n_panels = masks.shape[0]
    y = np.empty((x.shape[0], PANEL * n_panels), dtype=np.float32)
    safe_end = values.shape[0] - OVERREAD  # panels ending later use the exact-read lowering
    per_task = max(1, (n_panels + 63) // 64)  # fixed by the shape: results ignore thread count
    for task in numba.prange((n_panels + per_task - 1) // per_task):
        for q in range(task * per_task, min(n_panels, (task + 1) * per_task)):
            _panel(masks, values, panel_ptr, x, q, portable or panel_ptr[q + 1] > safe_end, y)
    return y


class PanelLinear(PackedLinear):
    """16-row panel bitmask + packed bf16 values.

    Arrays: ``masks [ceil(N/16), ceil(K/2)] uint32`` (bit r = row 16q + r at column 2j, bit
    16 + r = the same row at column 2j + 1), ``values [nnz] uint16`` (bf16 bits, panel by panel in
    bit order) and ``panel_ptr [ceil(N/16) + 1] int64`` (start of each panel in ``values``).
    """

    FORMAT = "panel"
    # arena.consolidate stacks layers by concatenating every array along its first axis and
    # offsetting panel_ptr: that is the panel layer of the stacked rows only when no padding rows
    # sit between the parts, i.e. every part but the last fills its last panel.
    POINTER = "panel_ptr"
    ROW_BLOCK = PANEL

    @classmethod
    def pack(cls, weight, mask=None, values="bf16"):
        """Pack ``W [N, K]`` into 16-row panels: one bit per position plus the kept values.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible).
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; default: the nonzeros of ``weight``.
        values : {"bf16"}
            Value type (bf16, nearest, ties to even); the only one so far.

        Returns
        -------
        PanelLinear
            1/8 + 2d bytes per weight at density d, plus 8 bytes per 16 rows.

        Raises
        ------
        NpsparseError
            Another ``values``, or a weight/mask shape or dtype problem.
        """
        _check_values(values)
        weight, keep = check_weight_mask(weight, mask)
        bits = _panel_order(keep, False)  # [P, KP, 2, 16]
        arrays = {
            "masks": pack_panel_bits(keep),
            "values": to_bf16(_panel_order(weight, 0.0)[bits]),  # C order = bit order
            "panel_ptr": row_pointers(bits.reshape(bits.shape[0], -1).sum(axis=1,
                                                                            dtype=np.int64)),
        }
        return cls(arrays, weight.shape)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored panel arrays as a layer, without copying them.

        Names, dtypes and shapes are checked, no mask bit may fall in the padding, and
        ``panel_ptr`` must agree with the masks' bit counts (once, at load: the kernels trust it).

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``masks [P, ceil(K/2)] uint32``, ``values [nnz] uint16``, ``panel_ptr [P+1] int64``
            with ``P = ceil(N/16)``; others are ignored.
        metadata : dict of str to str
            ``shape`` (``"N,K"``, required) and ``values`` (``"bf16"``, the default).

        Returns
        -------
        PanelLinear

        Raises
        ------
        NpsparseError
            A missing or mistyped array, bits set in the padding, or pointers that do not match.
        """
        _check_values(metadata.get("values", "bf16"))
        expected = {"masks": (np.uint32, 2), "values": (np.uint16, 1),
                    "panel_ptr": (np.int64, 1)}
        check_arrays(arrays, expected, cls.FORMAT)
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        _check_structure(arrays, shape)
        return cls({name: np.ascontiguousarray(arrays[name]) for name in expected}, shape)

    def __init__(self, arrays, shape):
        super().__init__(arrays, shape)
        self._portable = False  # tests set it to run the exact-read lowering everywhere

    def _options(self):
        return {"values": "bf16"}

    def _matmul(self, x):
        a = self.arrays
        x = pad_columns(x, 2 * a["masks"].shape[1])
        y = _matmul(a["masks"], a["values"], a["panel_ptr"], x, self._portable)
        if y.shape[1] != self.shape[0]:  # drop the last panel's padding rows
            y = np.ascontiguousarray(y[:, : self.shape[0]])
        return y

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop over each panel's mask bits, in bit order."""
        a = self.arrays
        return _matmul_naive(a["masks"], a["values"], a["panel_ptr"],
                             np.ascontiguousarray(x, dtype=np.float32), self.shape[0])

    def keep_mask(self) -> np.ndarray:
        """keep [N, K] bool: the stored positions."""
        return unpack_panel_bits(self.arrays["masks"], self.shape)

    def to_dense(self):
        """The packed values put back at their mask positions."""
        bits = _bits_in_order(self.arrays["masks"])
        dense = np.zeros(bits.shape, dtype=np.float32)
        dense[bits] = from_bf16(self.arrays["values"])
        return _from_panel_order(dense, self.shape)

    @property
    def nnz(self) -> int:
        """int: packed values, one per set mask bit."""
        return int(self.arrays["values"].shape[0])


def _check_values(values) -> None:
    if values != "bf16":
        raise NpsparseError(f"panel values must be 'bf16', got {values!r}")


def _check_structure(arrays: dict, shape: tuple[int, int]) -> None:
    """Stored panel arrays agree with the shape and each other."""
    rows, k_cols = shape
    panels = -(-rows // PANEL)
    check_shapes(arrays, {"masks": (panels, -(-k_cols // 2)), "panel_ptr": (panels + 1,)},
                 "panel")
    ptr = arrays["panel_ptr"]
    nnz = arrays["values"].shape[0]
    if ptr[0] != 0 or ptr[-1] != nnz or np.any(ptr[1:] < ptr[:-1]):
        raise NpsparseError(f"panel array 'panel_ptr' must rise from 0 to the {nnz} stored "
                            "values")
    counts = np.bitwise_count(arrays["masks"]).sum(axis=1, dtype=np.int64)  # [P] kept per panel
    if unpack_panel_bits(arrays["masks"], shape).sum() != counts.sum():
        raise NpsparseError(f"panel array 'masks' has bits set past row {rows} or column "
                            f"{k_cols}")
    if np.any(counts != np.diff(ptr)):
        raise NpsparseError("panel array 'panel_ptr' does not match the number of mask bits of "
                            "each panel")
