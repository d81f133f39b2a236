"""Calibration statistics: the references' running averages, batching, and what is collected."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune import InputStats, reconstruction_error, stats_needed

seeds = st.integers(0, 2**31 - 1)


def sequences_of(seed, count=3, tokens=(1, 40), k=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens[0], tokens[1] + 1, size=count)
    offset = rng.normal(size=k) * 3
    return [(rng.normal(size=(t, k)) * rng.uniform(0.1, 2, size=k) + offset).astype(np.float32)
            for t in lengths]


def running_reference(seqs):
    """The references' float64 running-average updates, one sequence per add_batch call:
    Wanda's scaler_row, SparseGPT's H and DSnoT's sum_metric_row and token-weighted var."""
    k = seqs[0].shape[1]
    scaler, hessian, sum_metric, var = np.zeros(k), np.zeros((k, k)), np.zeros(k), np.zeros(k)
    n, ntokens = 0, 0
    for seq in seqs:
        x = seq.astype(np.float64).T  # [K, T], as the hooks see it
        scaler *= n / (n + 1)
        hessian *= n / (n + 1)
        sum_metric *= n / (n + 1)
        var_now = x.var(axis=1)  # population variance within the sequence
        t = x.shape[1]
        var = var_now if ntokens == 0 else (var * ntokens + var_now * t) / (ntokens + t)
        ntokens += t
        n += 1
        scaler += np.linalg.norm(x, axis=1) ** 2 / n
        sum_metric += x.sum(axis=1) / n
        scaled = np.sqrt(2 / n) * x
        hessian += scaled @ scaled.T
    return scaler, hessian, sum_metric, var


@given(seeds, st.integers(1, 6))
def test_matches_the_references_running_averages(seed, count):
    seqs = sequences_of(seed, count)
    stats = InputStats(6)
    for seq in seqs:
        stats.add(seq)
    scaler, hessian, sum_metric, var = running_reference(seqs)
    np.testing.assert_allclose(stats.sq_norm, scaler, rtol=1e-12)
    np.testing.assert_allclose(stats.hessian, hessian, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.dsnot_sum, sum_metric, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-10, atol=1e-12)
    assert stats.sequences == count and stats.tokens == sum(len(s) for s in seqs)


@given(seeds, st.integers(1, 6))
def test_plain_definitions_and_pooled_variance(seed, count):
    seqs = sequences_of(seed, count)
    stats = InputStats(6)
    for seq in seqs:
        stats.add(seq)
    x = np.concatenate(seqs).astype(np.float64)  # [T, K]
    np.testing.assert_allclose(stats.sq_norm, (x ** 2).sum(axis=0) / count, rtol=1e-12)
    np.testing.assert_allclose(stats.hessian, 2 * x.T @ x / count, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.xtx, x.T @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.pooled_variance, x.var(axis=0), rtol=1e-8, atol=1e-10)
    assert np.all(stats.pooled_variance >= stats.variance - 1e-9)  # between-sequence part >= 0


def test_a_batch_of_sequences_counts_each_one():
    seqs = np.stack([s[:10] for s in sequences_of(3, 4, tokens=(10, 10))])  # [S, T, K]
    batched, one_by_one = InputStats(6), InputStats(6)
    batched.add(seqs)
    for seq in seqs:
        one_by_one.add(seq)
    assert batched.sequences == 4 and batched.tokens == 40
    for name in ("sq_norm", "hessian", "dsnot_sum", "variance"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(one_by_one, name))


def test_only_what_is_asked_is_collected():
    stats = InputStats(4, ("sq",))
    stats.add(np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(stats.sq_norm, 3.0)
    for name in ("hessian", "xtx", "dsnot_sum", "variance"):
        with pytest.raises(NpsparseError, match="was not collected"):
            getattr(stats, name)
    assert InputStats(4, ("var",)).needs == {"sq", "sum", "var"}
    with pytest.raises(ValueError, match="unknown statistics"):
        InputStats(4, ("hessain",))
    with pytest.raises(ValueError, match="expected"):
        stats.add(np.ones((3, 5), np.float32))


def test_float32_inputs_are_summed_in_float64():
    """A large offset with a small spread: float32 accumulation would lose the spread."""
    x = (np.float32(1000.0) + np.float32(0.001) * np.arange(-512, 512, dtype=np.float32))
    stats = InputStats(1, ("var", "hessian"))
    for _ in range(100):
        stats.add(x[:, None])
    exact = x.astype(np.float64)
    np.testing.assert_allclose(stats.variance, exact.var(), rtol=1e-9)
    np.testing.assert_allclose(stats.xtx, 100 * (exact ** 2).sum(), rtol=1e-14)


def test_constant_and_zero_columns():
    stats = InputStats(2)
    for _ in range(3):
        stats.add(np.tile(np.array([[0.7, 0.0]], np.float32), (5, 1)))
    np.testing.assert_allclose(stats.variance, 0.0, atol=1e-15)
    assert stats.sq_norm[1] == 0 and stats.hessian[1, 1] == 0 and stats.dsnot_sum[1] == 0


def test_stats_needed():
    assert stats_needed("wanda") == ("hessian", "sq")
    assert stats_needed("wanda", error=False) == ("sq",)
    assert stats_needed("magnitude", error=False) == ()
    assert stats_needed("dsnot", "sparsegpt", error=False) == ("hessian", "sq", "sum", "var")
    with pytest.raises(NpsparseError, match="unknown pruning method 'obs'"):
        stats_needed("obs")


@given(seeds)
def test_reconstruction_error_from_x_equals_from_xtx(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 7, 5)).astype(np.float32)
    w, w2 = rng.normal(size=(2, 3, 5)).astype(np.float32)
    stats = InputStats(5, ("hessian",))
    stats.add(x)
    delta = w.astype(np.float64) - w2.astype(np.float64)
    direct = np.sum((x.reshape(-1, 5).astype(np.float64) @ delta.T) ** 2)
    assert reconstruction_error(w, w2, x=x) == pytest.approx(direct, rel=1e-12)
    assert reconstruction_error(w, w2, stats.xtx) == pytest.approx(direct, rel=1e-9)
    # SparseGPT's H = (2/S) X^T X gives the same error times 2/S.
    assert reconstruction_error(w, w2, stats.hessian) == pytest.approx(direct * 2 / 2, rel=1e-9)
