"""Numba flags for every kernel in one place, and the thread-count option.

``jit`` is for naive references and serial helpers; ``pjit`` for fast kernels that spread output
rows over threads with ``prange``. ``fastmath`` lets LLVM reassociate float32 reductions so they
vectorise (without it every float sum is one serial chain); ``cache`` keeps compiled kernels on
disk so only the first run pays the compile. No kernel has an explicit signature, so read-only
(memory-mapped) arrays get their own specialisation.
"""

from __future__ import annotations

import functools

import numba

from ..errors import NpsparseError

jit = functools.partial(numba.njit, cache=True, fastmath=True, nogil=True)
pjit = functools.partial(numba.njit, cache=True, fastmath=True, nogil=True, parallel=True)

ROWS_PER_TASK = 64  # output rows per prange task (GEMM tiles); GEMVs use row_block()


@numba.njit(cache=True)
def row_block(n_rows):
    """Output rows per prange task of a GEMV: up to 64 equal tasks, at least 16 rows each.

    prange hands each thread an equal run of tasks, so the threads stay balanced when the task
    count is a multiple of the thread count; ceil(N / 64)-row tasks make that so for SmolLM2's
    192, 576 and 1536 rows on 1, 2 or 4 threads (fixed 64-row tasks split the 192-row k_proj 2:1).
    The thread count itself is not read here: that would keep Numba from caching the kernels.
    """
    return max(16, (n_rows + 63) // 64)


def set_threads(n: int | None = None) -> int:
    """Set how many threads the fast kernels use; returns the count now in effect.

    Parameters
    ----------
    n : int or None
        Thread count, ``1 <= n <= NUMBA_NUM_THREADS`` (the ceiling Numba fixes at import; set the
        environment variable before starting Python to raise it). ``None`` restores the ceiling.

    Returns
    -------
    int
    """
    ceiling = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = ceiling
    if not 1 <= int(n) <= ceiling:
        raise NpsparseError(f"threads={n} is outside 1..{ceiling} (NUMBA_NUM_THREADS={ceiling})")
    numba.set_num_threads(int(n))
    return numba.get_num_threads()


def gemm_tasks() -> int:
    """prange tasks for the GEMMs (each allocates one scratch tile): a few per thread."""
    return 4 * numba.get_num_threads()
