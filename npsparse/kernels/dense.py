"""Dense float32 GEMV in Numba: the decode product of :class:`npsparse.linear.DenseLinear`.

NumPy hands ``x @ W.T`` to OpenBLAS, which is as good as it gets for prefill (many tokens) and for
large matrices; for one token against SmolLM2's small matrices its threading costs more than the
arithmetic, and its worker threads keep spinning after the call, competing with Numba's threads
for the same two cores. A plain row loop, parallel over rows like every kernel here, streams the
same bytes with less overhead (measured per block of SmolLM2: see ``bench/bench_decode.py``).
The same loop serves dense bf16 (:class:`~npsparse.kernels.BF16Linear`): ``value_at`` reads a
float32 weight as is and a uint16 one as bf16 bits.
"""

from __future__ import annotations

import numba
import numpy as np

from ._numba import pjit, row_block
from ._simd import value_at


@pjit
def gemv_dense(weight, x):  # weight [N, K] float32 or uint16 (bf16 bits), x [1, K] -> y [1, N]
    """One token times a dense weight, ``y = x @ W.T``, parallel over blocks of output rows.

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]``, float32 or ``uint16`` (bf16 bits, widened exactly).
    x : np.ndarray
        ``[1, K]`` float32; only the first row is read.

    Returns
    -------
    np.ndarray
        ``[1, N]`` float32.
    """
    n_rows, k_cols = weight.shape
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            acc = np.float32(0.0)
            for k in range(k_cols):
                acc += value_at(weight[n], k) * x[0, k]
            y[0, n] = acc
    return y
