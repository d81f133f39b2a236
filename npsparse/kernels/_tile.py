"""Small-batch GEMM core shared by every format: a decoded float32 row tile times T activations.

Each fast GEMM decodes a few weight rows into a dense float32 tile (in L1/L2), then multiplies it
by all ``T`` activation rows here. Two tile rows x four tokens per pass over K keep eight
vectorised accumulators busy with six loads per eight fused multiply-adds.
"""

from __future__ import annotations

import numpy as np

from ._numba import jit

TILE_ROWS = 8  # weight rows decoded to float32 at once (8 x K floats stay in L1/L2)


@jit
def _dot(a, b):  # a [K], b [K] float32 -> float32
    acc = np.float32(0.0)
    for k in range(a.shape[0]):
        acc += a[k] * b[k]
    return acc


@jit
def tile_matmul(tile, rows, x, y, n0):
    """y[:, n0:n0+rows] = x [T, Kp] @ tile[:rows, :Kp].T, float32; ``Kp = x.shape[1]``.

    Parameters
    ----------
    tile : np.ndarray
        ``[TILE_ROWS, >= Kp]`` float32: weight rows ``n0 .. n0+rows-1`` decoded to float32
        (columns past ``Kp`` are ignored).
    rows : int
        Rows of ``tile`` in use, ``<= TILE_ROWS`` (fewer for the last tile of a weight).
    x : np.ndarray
        ``[T, Kp]`` float32 activations, zero-padded to the tile's width where the format needs.
    y : np.ndarray
        ``[T, N]`` float32 output; only columns ``n0 .. n0+rows-1`` are written, in place.
    n0 : int
        Weight row (output column) that ``tile[0]`` holds.
    """
    n_tokens, width = x.shape
    r = 0
    while r + 2 <= rows:
        w0 = tile[r, :width]
        w1 = tile[r + 1, :width]
        t = 0
        while t + 4 <= n_tokens:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            for k in range(width):
                u = w0[k]
                v = w1[k]
                a00 += u * x0[k]
                a01 += u * x1[k]
                a02 += u * x2[k]
                a03 += u * x3[k]
                a10 += v * x0[k]
                a11 += v * x1[k]
                a12 += v * x2[k]
                a13 += v * x3[k]
            y[t, n0 + r], y[t + 1, n0 + r] = a00, a01
            y[t + 2, n0 + r], y[t + 3, n0 + r] = a02, a03
            y[t, n0 + r + 1], y[t + 1, n0 + r + 1] = a10, a11
            y[t + 2, n0 + r + 1], y[t + 3, n0 + r + 1] = a12, a13
            t += 4
        while t < n_tokens:
            y[t, n0 + r] = _dot(w0, x[t])
            y[t, n0 + r + 1] = _dot(w1, x[t])
            t += 1
        r += 2
    if r < rows:
        for t in range(n_tokens):
            y[t, n0 + r] = _dot(tile[r, :width], x[t])
