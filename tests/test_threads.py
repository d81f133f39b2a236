"""Load-aware decode threads (npsparse.threads): the count follows the other processes' load, and
no result depends on the count."""

from unittest import mock

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse import kernels as nk
from npsparse.kernels.attention import SPLIT_MIN_KEYS
from npsparse.threads import LoadAwareThreads, read_busy_seconds, threads_for_load

CEILING = numba.config.NUMBA_NUM_THREADS
needs_two = pytest.mark.skipif(CEILING < 2, reason="needs NUMBA_NUM_THREADS >= 2")


@given(cpus=st.integers(1, 64), ceiling=st.integers(1, 64),
       loads=st.lists(st.floats(0, 64, allow_nan=False), min_size=2, max_size=2))
def test_fewer_threads_as_the_other_load_grows(cpus, ceiling, loads):
    low, high = sorted(loads)
    a, b = threads_for_load(cpus, low, ceiling), threads_for_load(cpus, high, ceiling)
    assert 1 <= b <= a <= min(cpus, ceiling)
    assert threads_for_load(cpus, 0.0, ceiling) == min(cpus, ceiling)  # quiet: every thread
    assert threads_for_load(cpus, cpus - 0.4, ceiling) == 1  # all CPUs taken: one thread
    if cpus >= 2 and ceiling >= 2:  # one busy core of several: one thread fewer
        assert threads_for_load(cpus, 1.0, ceiling) == min(cpus - 1, ceiling)


def test_proc_stat_busy_time_leaves_out_idle_and_iowait_and_other_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 0 0 9000 0 0 0 0 0 0\n"
                    "cpu0 100 5 20 4000 7 1 2 3 0 0\n"
                    "cpu1 900 0 50 5000 9 0 0 0 0 0\n"
                    "intr 123\n")
    import os

    tick = os.sysconf("SC_CLK_TCK")
    assert read_busy_seconds([0], str(stat)) == pytest.approx((100 + 5 + 20 + 1 + 2 + 3) / tick)
    assert read_busy_seconds([0, 1], str(stat)) == pytest.approx((131 + 950) / tick)
    assert read_busy_seconds([5], str(stat)) is None
    assert read_busy_seconds([0], str(tmp_path / "missing")) is None


class FakeMachine:
    """A clock, the busy seconds of 2 CPUs and this process's CPU seconds, advanced by hand."""

    def __init__(self):
        self.now, self.busy, self.own, self.set_calls = 0.0, 0.0, 0.0, []

    def run(self, seconds, own_cpus, other_cpus):
        self.now += seconds
        self.own += own_cpus * seconds
        self.busy += (own_cpus + other_cpus) * seconds

    def policy(self, interval=0.1):
        return LoadAwareThreads(interval, read_busy=lambda cpus: self.busy,
                                own_seconds=lambda: self.own, clock=lambda: self.now,
                                set_threads=self.set_calls.append, cpus=[0, 1], ceiling=2)


def test_the_thread_count_follows_a_busy_core_and_comes_back():
    machine = FakeMachine()
    policy = machine.policy()
    policy.threads = 2
    machine.run(0.05, 2.0, 0.0)
    assert policy.step() == 2 and machine.set_calls == []  # before the interval: no reading
    machine.run(0.06, 2.0, 0.0)
    assert policy.step() == 2 and machine.set_calls == []  # quiet: unchanged, nothing set
    machine.run(0.2, 1.4, 0.6)  # another process shares the cores (our spinning counts as ours)
    assert policy.step() == 1 and machine.set_calls == [1]
    machine.run(0.2, 1.0, 1.0)  # it keeps one core
    assert policy.step() == 1 and machine.set_calls == [1]
    machine.run(0.2, 1.0, 0.0)  # it stopped
    assert policy.step() == 2 and machine.set_calls == [1, 2]
    assert [t for _, t in policy.history] == [2, 1, 1, 2]
    assert policy.history[2][0] == pytest.approx(1.0)


def test_close_restores_the_count_and_unreadable_load_changes_nothing():
    machine = FakeMachine()
    policy = machine.policy()
    initial = policy.initial
    machine.run(0.2, 1.0, 2.0)
    assert policy.step() == 1
    policy.close()
    assert policy.threads == initial and machine.set_calls[-1] == initial
    blind = LoadAwareThreads(0.0, read_busy=lambda cpus: None, set_threads=machine.set_calls.append)
    calls = len(machine.set_calls)
    assert blind.step() == blind.initial and len(machine.set_calls) == calls


@needs_two
@settings(max_examples=20)
@given(fmt=st.sampled_from(["bf16", "csr", "bitmask", "panel", "nm", "q8_0", "dense",
                            "monarch"]),
       n_rows=st.sampled_from([16, 48, 200]), k_cols=st.sampled_from([64, 128]),
       tokens=st.sampled_from([1, 3, 9]), seed=st.integers(0, 2**32 - 1))
def test_kernel_results_do_not_depend_on_the_thread_count(fmt, n_rows, k_cols, tokens, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
    keep = rng.random((n_rows, k_cols)) < 0.5
    options = {}
    if fmt == "nm":
        keep = None
        weight = weight * (np.arange(k_cols) % 4 < 2)  # 2:4 by position
        options = {"pattern": "2:4"}
    if fmt == "monarch":
        if n_rows % 16:
            return
        keep, options = None, {"blocks": 4}
    layer = nk.pack(weight, keep, fmt, **options)
    x = rng.standard_normal((tokens, k_cols)).astype(np.float32)
    initial = numba.get_num_threads()
    try:
        results = []
        for threads in (1, CEILING):
            nk.set_threads(threads)
            results.append(layer(x))
    finally:
        nk.set_threads(initial)
    np.testing.assert_array_equal(results[0], results[1])


@needs_two
def test_decode_gives_the_same_bits_with_one_thread_and_with_all(smollm2_path):
    """Past SPLIT_MIN_KEYS positions too, where decode attention splits the cache: the split
    follows the thread ceiling, not the count in use, so load-aware threads change no token."""
    import npsparse
    from npsparse.packing import apply_format

    llm = npsparse.load(smollm2_path)
    apply_format(llm.model, "bf16")
    prompt = llm.eval_windows("pydoc", seqlen=SPLIT_MIN_KEYS + 4, windows=1)[0]
    initial = numba.get_num_threads()
    logits = []
    try:
        for threads in (1, CEILING):
            nk.set_threads(threads)
            cache = llm.model.new_cache(len(prompt) + 3)
            llm.model.prefill(prompt[:-3], cache)
            logits.append([llm.model.forward(prompt[i:i + 1], cache)[-1]
                           for i in range(len(prompt) - 3, len(prompt))])
    finally:
        nk.set_threads(initial)
    np.testing.assert_array_equal(np.array(logits[0]), np.array(logits[1]))


@needs_two
@pytest.mark.parametrize("fmt", ["panel", "auto"])
def test_panel_decode_gives_the_same_bits_with_one_thread_and_with_two(fmt):
    """A tiny model packed as panel (stacked q/k/v and gate/up, 16 panels per layer and more),
    prefilled and decoded token by token: identical logits with 1 and with 2 threads."""
    from helpers import tiny_model

    from npsparse.packing import apply_format

    model = tiny_model("llama", seed=4, dim=64, ffn_dim=256, head_dim=16, vocab_size=101)
    rng = np.random.default_rng(4)
    for name, layer in model.linears().items():
        weight = layer.to_dense()
        model.set_linear(name, nk.pack(weight * (rng.random(weight.shape) < 0.4), format="dense"))
    with mock.patch.object(nk, "AUTO_ROW_MASK", "panel"):
        info = apply_format(model, fmt)
    assert "PanelLinear" in info["formats"]
    ids = rng.integers(0, 101, size=20)
    initial = numba.get_num_threads()
    logits = []
    try:
        for threads in (1, 2):
            nk.set_threads(threads)
            cache = model.new_cache(len(ids))
            steps = [model.forward(ids[:8], cache)]
            steps += [model.forward(ids[i:i + 1], cache) for i in range(8, len(ids))]
            logits.append(np.concatenate(steps))
    finally:
        nk.set_threads(initial)
    np.testing.assert_array_equal(logits[0], logits[1])


def test_generate_restores_the_thread_count_and_records_its_readings(smollm2_path):
    import npsparse

    llm = npsparse.load(smollm2_path)
    initial = numba.get_num_threads()
    out = llm.generate("def f(x):", 6)
    assert numba.get_num_threads() == initial
    fixed = llm.generate("def f(x):", 6, adapt_threads=False)
    assert out.ids == fixed.ids and fixed.thread_history == []
    assert all(1 <= t <= CEILING for _, t in out.thread_history)
