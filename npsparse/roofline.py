"""The memory-bandwidth roofline: how fast this machine can stream weights from RAM.

Decode at batch 1 reads every weight byte once per token, so ``tokens/s <= B / bytes_per_token``
where ``B`` is the measured read bandwidth. ``B`` is measured as a parallel read-only pass (Numba
``prange`` sum with a float32 accumulator) over an array much larger than the last-level cache.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np


@numba.njit(parallel=True, fastmath=True, cache=True)
def parallel_sum(rows):
    """Sum of ``rows [C, n]`` float32, one row per parallel task: the bandwidth probe's read.

    Parameters
    ----------
    rows : np.ndarray
        ``[C, n]`` float32; each of the ``C`` rows is summed by one ``prange`` task, so ``C``
        should be at least the number of threads.

    Returns
    -------
    float
        The sum of all elements, accumulated in float32 with ``fastmath`` (reassociated, so not
        bit-reproducible). Only the read matters to the probe, not the value.
    """
    partial = np.zeros(rows.shape[0], dtype=np.float32)
    for c in numba.prange(rows.shape[0]):
        acc = np.float32(0.0)
        for i in range(rows.shape[1]):
            acc += rows[c, i]
        partial[c] = acc
    return partial.sum()


@dataclass
class Bandwidth:
    """Read bandwidth in bytes/s: best and median of ``passes`` passes over ``nbytes``."""

    best: float
    median: float
    nbytes: int
    passes: int
    threads: int

    def __str__(self) -> str:
        return (f"read bandwidth {self.best / 1e9:.1f} GB/s best, {self.median / 1e9:.1f} GB/s "
                f"median ({self.passes} passes over {self.nbytes / 2**20:.0f} MiB, "
                f"{self.threads} threads)")


def measure_read_bandwidth(nbytes: int = 512 * 2**20, passes: int = 7) -> Bandwidth:
    """Measure read bandwidth with a parallel sum over a ``nbytes`` float32 array.

    Parameters
    ----------
    nbytes : int
        Array size; keep it far above the last-level cache (default 512 MiB).
    passes : int
        Timed passes after one warm-up pass (which also compiles the kernel).

    Returns
    -------
    Bandwidth
    """
    array = np.ones((64, nbytes // 256), dtype=np.float32)  # 64 row tasks share the threads
    parallel_sum(array)  # compile and fault in the pages
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        parallel_sum(array)
        times.append(time.perf_counter() - start)
    times.sort()
    return Bandwidth(best=array.nbytes / times[0], median=array.nbytes / times[len(times) // 2],
                     nbytes=array.nbytes, passes=passes, threads=numba.get_num_threads())


def cpu_name() -> str:
    """This machine's CPU model as ``/proc/cpuinfo`` names it (what benchmarks and reports print).

    Returns
    -------
    str
        The first ``model name``, else ``platform.processor()``, else ``"unknown"``.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
