"""Decode threads that follow the machine's load, so a busy core slows decode instead of stalling it.

Every product of a decode step is one Numba parallel region (OpenMP): the rows are split evenly
over the threads and the step waits for the last one. When another program keeps one of the
cores busy, the thread that shares that core runs only in the scheduler's time slices, and each
of the ~200 regions of a token waits for it: decode fell from ~150 to ~1-10 tok/s on 2 cores
(``../shared/PERFORMANCE.md``). With one thread fewer it would have lost only that core's share.

:class:`LoadAwareThreads` measures, every ``interval`` seconds of decoding, how much CPU time
*other* processes took on the CPUs this process may run on: the busy time of those CPUs in
``/proc/stat`` minus this process's own CPU time (``time.process_time``, all its threads, so our
own waiting workers are not counted as load), over the wall time. It then runs
``round(cpus - others)`` threads, at least 1 and at most the ceiling Numba was started with.
Nothing is probed or timed, so a quiet machine keeps every thread and pays only one read of
``/proc/stat`` per interval (tens of microseconds). Where ``/proc/stat`` cannot be read (not
Linux), the thread count stays as it is.

The thread count never changes a result: every kernel splits its work by a fixed row block or
tile, and decode attention splits long contexts by the ceiling, not the current count, so the
tokens are the same bits whatever the load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numba

STAT_PATH = "/proc/stat"
INTERVAL = 0.1  # seconds of decoding between two load readings


def allowed_cpus() -> list[int]:
    """The CPU numbers this process may run on (its affinity; all CPUs where that is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def read_busy_seconds(cpus: list[int], path: str = STAT_PATH) -> float | None:
    """CPU seconds spent busy (anything but idle and iowait) on ``cpus`` since boot.

    Parameters
    ----------
    cpus : list of int
        CPU numbers (the ``cpuN`` lines of ``/proc/stat`` to sum).
    path : str
        The file to read (``/proc/stat``; another path in tests).

    Returns
    -------
    float or None
        None when the file cannot be read or holds none of ``cpus``.
    """
    try:
        with open(path) as handle:
            lines = handle.readlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    found = False
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal ...: all but idle and iowait
            values = [int(v) for v in fields[1:9]]
            ticks += sum(values) - values[3] - values[4]
            found = True
    if not found:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_for_load(cpus: int, others: float, ceiling: int) -> int:
    """The thread count for ``others`` CPUs' worth of other processes' work on ``cpus`` CPUs.

    Parameters
    ----------
    cpus : int
        CPUs this process may run on.
    others : float
        CPU seconds per second that other processes used on them (0 .. cpus).
    ceiling : int
        The most threads allowed (Numba's ``NUMBA_NUM_THREADS``).

    Returns
    -------
    int
        ``round(cpus - others)`` clipped to ``1 .. ceiling``.
    """
    free = int(round(cpus - max(0.0, others)))
    return max(1, min(ceiling, free))


class LoadAwareThreads:
    """Set Numba's thread count from the other processes' load, re-read every ``interval`` s.

    Call :meth:`step` after each decode step; :meth:`close` restores the thread count found at
    the start.

    Parameters
    ----------
    interval : float
        Seconds between readings.
    read_busy : callable, optional
        ``read_busy(cpus) -> seconds or None``; :func:`read_busy_seconds` by default.
    own_seconds, clock : callable, optional
        This process's CPU seconds and the wall clock (``time.process_time``,
        ``time.perf_counter``); replaceable in tests.
    set_threads : callable, optional
        ``set_threads(n)`` (``numba.set_num_threads``).
    """

    def __init__(self, interval: float = INTERVAL,
                 read_busy: Callable[[list], float | None] = read_busy_seconds,
                 own_seconds: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = numba.set_num_threads,
                 cpus: list[int] | None = None, ceiling: int | None = None):
        self.interval = interval
        self.cpus = allowed_cpus() if cpus is None else cpus
        self.ceiling = numba.config.NUMBA_NUM_THREADS if ceiling is None else ceiling
        self._read_busy, self._own, self._clock, self._set = (read_busy, own_seconds, clock,
                                                              set_threads)
        self.initial = numba.get_num_threads()
        self.threads = self.initial
        self.history: list[tuple[float, int]] = []  # (others, threads) per reading
        self._last = self._sample()

    def _sample(self):
        busy = self._read_busy(self.cpus)
        return None if busy is None else (self._clock(), busy, self._own())

    def step(self) -> int:
        """Re-read the load when ``interval`` has passed; returns the thread count in effect."""
        if self._last is None or self.ceiling < 2:
            return self.threads
        now = self._clock()
        if now - self._last[0] < self.interval:
            return self.threads
        sample = self._sample()
        if sample is None:
            self._last = None
            return self.threads
        wall = sample[0] - self._last[0]
        others = ((sample[1] - self._last[1]) - (sample[2] - self._last[2])) / wall
        self._last = sample
        threads = threads_for_load(len(self.cpus), others, self.ceiling)
        self.history.append((others, threads))
        if threads != self.threads:
            self._set(threads)
            self.threads = threads
        return threads

    def close(self) -> None:
        """Restore the thread count found when this object was made."""
        if self.threads != self.initial:
            self._set(self.initial)
            self.threads = self.initial
