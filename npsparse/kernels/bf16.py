"""bfloat16: the rounding rule, and the dense bf16 format (the fair dense baseline).

bf16 is the top 16 bits of a float32 (1 sign, 8 exponent, 7 mantissa bits). Rounding a float32 to
bf16 here is round-to-nearest, ties-to-even on the bit pattern, which handles subnormals and
overflow (to +-inf) with the same integer add; NaN is kept NaN (quiet bit set, sign kept) because
the add could carry a NaN with a small payload into infinity. Stored as ``uint16``; decoding is
``bits << 16`` reinterpreted as float32, which vectorises (no float16 arithmetic on CPU).
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import PackedLinear, as_float32, check_arrays, check_weight_mask
from ._numba import gemm_tasks, jit, pjit
from ._simd import bits_to_f32
from ._tile import TILE_ROWS, tile_matmul
from .dense import gemv_dense


def to_bf16(a) -> np.ndarray:
    """Round float32 values to bf16 (nearest, ties to even) and return the bit patterns.

    Parameters
    ----------
    a : array_like
        float32 values (any shape; other dtypes only if float32 holds them exactly).

    Returns
    -------
    np.ndarray
        ``uint16`` bf16 bit patterns, same shape as ``a``.
    """
    a = np.ascontiguousarray(as_float32(a, "bf16 input"))
    bits = a.view(np.uint32)
    lsb = (bits >> 16) & np.uint32(1)
    # No overflow for non-NaN input: the largest such pattern is -inf = 0xFF800000.
    out = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


def from_bf16(bits) -> np.ndarray:
    """bf16 bit patterns (``uint16``) to float32 values (exact).

    Parameters
    ----------
    bits : np.ndarray
        ``uint16``, any shape.

    Returns
    -------
    np.ndarray
        float32, same shape.
    """
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise NpsparseError(f"bf16 bits must be uint16, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_round(a) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), returned as float32.

    What a bf16 format stores, seen as float32: ``from_bf16(to_bf16(a))``.

    Parameters
    ----------
    a : array_like
        float32 values (any shape; other dtypes only if float32 holds them exactly).

    Returns
    -------
    np.ndarray
        float32, same shape as ``a``; NaN stays NaN.

    Raises
    ------
    NpsparseError
        A non-numeric dtype, or values float32 cannot hold exactly.
    """
    return from_bf16(to_bf16(a))


# ---- kernels: weight bits [N, K] uint16, x [T, K] float32 -> y [T, N] float32 ----------------

@jit
def _matmul_naive(bits, x):  # bits [N, K] uint16, x [T, K] -> y [T, N]
    n_rows, k_cols = bits.shape
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for n in range(n_rows):
            acc = np.float32(0.0)
            for k in range(k_cols):
                acc += bits_to_f32(np.uint32(bits[n, k]) << 16) * x[t, k]
            y[t, n] = acc
    return y


@pjit
def _gemm(bits, x, n_tasks):  # bits [N, K] uint16, x [T, K] -> y [T, N]
    n_rows, k_cols = bits.shape
    y = np.empty((x.shape[0], n_rows), dtype=np.float32)
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    n_tasks = min(n_tiles, n_tasks)
    for task in numba.prange(n_tasks):
        tile = np.empty((TILE_ROWS, k_cols), dtype=np.float32)  # decoded rows, reused
        for i in range(task * n_tiles // n_tasks, (task + 1) * n_tiles // n_tasks):
            n0 = i * TILE_ROWS
            rows = min(TILE_ROWS, n_rows - n0)
            for r in range(rows):
                for k in range(k_cols):
                    tile[r, k] = bits_to_f32(np.uint32(bits[n0 + r, k]) << 16)
            tile_matmul(tile, rows, x, y, n0)
    return y


class BF16Linear(PackedLinear):
    """Dense weight stored as bf16 bits: 2 bytes per weight.

    Arrays: ``bits [N, K] uint16``.
    """

    FORMAT = "bf16"

    @classmethod
    def pack(cls, weight, mask=None):
        """Store ``W [N, K]`` (times ``mask``, if given) as bf16 bits.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible).
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; pruned positions are stored as zeros.

        Returns
        -------
        BF16Linear
            ``bits [N, K] uint16``: each value rounded to the nearest bf16, ties to even.
        """
        weight, keep = check_weight_mask(weight, mask)
        return cls({"bits": to_bf16(np.where(keep, weight, np.float32(0.0)))}, weight.shape)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap a stored ``bits`` array as a layer (no copy); the shape is the array's.

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``bits [N, K] uint16``; other entries are ignored.
        metadata : dict of str to str
            Not read: the format has no options.

        Returns
        -------
        BF16Linear

        Raises
        ------
        NpsparseError
            ``bits`` missing, or not a 2-D ``uint16`` array.
        """
        check_arrays(arrays, {"bits": (np.uint16, 2)}, cls.FORMAT)
        return cls({"bits": arrays["bits"]}, arrays["bits"].shape)

    def _matmul(self, x):
        if x.shape[0] == 1:
            return gemv_dense(self.arrays["bits"], x)
        return _gemm(self.arrays["bits"], x, gemm_tasks())

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop that widens each bf16 weight as it goes."""
        return _matmul_naive(self.arrays["bits"], np.ascontiguousarray(x, dtype=np.float32))

    def to_dense(self):
        """The stored weight, every bf16 value widened exactly to float32."""
        return from_bf16(self.arrays["bits"])

    @property
    def nnz(self) -> int:
        """int: stored weights that are not zero (+0 or -0); every position is stored here."""
        return int(np.count_nonzero(self.arrays["bits"] & np.uint16(0x7FFF)))
