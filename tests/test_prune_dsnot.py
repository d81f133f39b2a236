"""DSnoT against a naive per-row oracle, and the invariants of its swaps.

The oracle below is written from the DSnoT paper's algorithm (Zhang et al., ICLR 2024: the
grow and prune criteria and the stopping rule) one row at a time with plain Python loops; the
library's version is vectorised over rows. Masks must agree bit for bit.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune import (DSnoTOptions, InputStats, Pattern, check_nm, dsnot, magnitude,
                            sparsegpt, wanda)

seeds = st.integers(0, 2**31 - 1)
widths = st.sampled_from([4, 8, 16, 32])
nm_patterns = st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)])
bases = st.sampled_from(["wanda", "magnitude", "sparsegpt"])


def make_stats(rng, k, sequences=2, tokens=32):
    """Correlated inputs with a random per-column offset, so e_i takes both signs."""
    mix = np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k)
    offset = rng.uniform(-1.0, 1.0, size=k)
    stats = InputStats(k, ("sq", "sum", "var", "hessian"))
    for _ in range(sequences):
        stats.add((rng.normal(size=(tokens, k)) @ mix + offset).astype(np.float32))
    return stats


def base_prune(base, w, stats, pattern):
    if base == "wanda":
        return wanda(w, stats.sq_norm, pattern)
    if base == "magnitude":
        return magnitude(w, pattern, group="row")
    return sparsegpt(w, stats.hessian, pattern, blocksize=8)


def signed_error(dense, current, mu):
    """e_i = sum_j (W_ij - W'_ij) mu_j  [N] float64: the expected output shift, in DSnoT's units."""
    return ((dense.astype(np.float64) - current.astype(np.float64)) * mu[None, :]).sum(axis=1)


def oracle(dense, weight, keep, stats, pattern, options):
    """Reference DSnoT one row at a time (plus npsparse's guards, switched by ``options``)."""
    initial, keep = keep, keep.copy()
    values = np.where(keep, weight, dense).astype(np.float64)
    mu, var = stats.dsnot_sum, stats.variance
    d = values * mu[None, :]
    wanda_score = np.abs(values) * np.sqrt(stats.sq_norm)[None, :]
    floor = max(1e-12 * float(np.max(var)), 1e-30)
    e_all = signed_error(dense, np.where(keep, weight, 0), mu)
    xtx = stats.xtx
    n_cols = dense.shape[1]
    for i in range(dense.shape[0]):
        e_start = e = float(e_all[i])
        rank = [d[i, j] / max(var[j], floor) ** options.pow_of_var if not keep[i, j] else 0.0
                for j in range(n_cols)]
        grow_list = sorted(range(n_cols), key=lambda j: rank[j])  # Python's sort is stable
        negative = sorted((j for j in range(n_cols) if keep[i, j] and d[i, j] < 0),
                          key=lambda j: wanda_score[i, j])
        positive = sorted((j for j in range(n_cols) if keep[i, j] and d[i, j] > 0),
                          key=lambda j: -wanda_score[i, j])
        prune_list = negative + positive  # static: only weights the base method kept
        score = np.where(keep[i], wanda_score[i], np.inf)
        g_lo, g_hi, p_lo, p_hi = 0, n_cols - 1, 0, len(prune_list) - 1
        for _ in range(options.max_cycles):
            if abs(e) <= options.threshold:
                break
            if e > 0:
                taken, g_hi = g_hi, g_hi - 1
            else:
                taken, g_lo = g_lo, g_lo + 1
            grow = grow_list[min(max(taken, 0), n_cols - 1)]
            valid = g_lo <= g_hi + 1  # the slot was not already used from the other end
            valid = valid and not initial[i, grow] and np.sign(d[i, grow]) == np.sign(e)
            if pattern.structured:
                start = grow // pattern.m * pattern.m
                prune = start + int(np.argmin(score[start:start + pattern.m]))
                valid = valid and np.isfinite(score[prune])
                score[prune] = np.inf
            else:
                if e < 0:
                    p_taken, p_hi = p_hi, p_hi - 1
                else:
                    p_taken, p_lo = p_lo, p_lo + 1
                valid = valid and p_lo <= p_hi + 1 and 0 <= p_taken < len(prune_list)
                prune = prune_list[p_taken] if valid else 0
                valid = valid and keep[i, prune] and np.sign(d[i, prune]) == -np.sign(e)
            e_new = e + d[i, prune] - d[i, grow]
            if pattern.structured or options.same_sign:
                valid = valid and np.sign(e_new) == np.sign(e_start)
            if not valid:
                break
            if options.guard == "mean" and not abs(e_new) < abs(e):
                continue
            if options.guard == "recon":
                # the row's error ||delta X||^2 before and after the swap, recomputed from scratch
                delta = dense[i].astype(np.float64) - np.where(keep[i], values[i], 0.0)
                step = np.zeros(n_cols)
                step[prune], step[grow] = values[i, prune], -values[i, grow]
                if not 2 * step @ (xtx @ delta) + step @ xtx @ step < 0:
                    continue
            keep[i, prune], keep[i, grow] = False, True
            e = e_new
    return keep


def run_case(seed, n, k, pattern, base, options):
    rng = np.random.default_rng(seed)
    stats = make_stats(rng, k)
    w = rng.normal(size=(n, k)).astype(np.float32)
    w[rng.uniform(size=n) < 0.1] = 0.0  # some all-zero rows
    start_w, start_mask = base_prune(base, w, stats, pattern)
    new, mask, info = dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum,
                            stats.variance, pattern, options, xtx=stats.xtx)
    return w, stats, start_w, start_mask, new, mask, info


option_sets = st.builds(DSnoTOptions, max_cycles=st.sampled_from([1, 5, 50]),
                        threshold=st.sampled_from([0.0, 0.1, 3.0]),
                        pow_of_var=st.sampled_from([0.0, 1.0]), same_sign=st.booleans(),
                        guard=st.sampled_from(["recon", "mean", "none"]))


@given(seeds, st.integers(1, 10), widths, st.floats(0.0, 0.9), bases, option_sets)
def test_unstructured_matches_the_per_row_oracle(seed, n, k, s, base, options):
    w, stats, start_w, start_mask, new, mask, _ = run_case(seed, n, k, Pattern(s), base, options)
    expected = oracle(w, start_w, start_mask, stats, Pattern(s), options)
    np.testing.assert_array_equal(mask, expected)


@given(seeds, st.integers(1, 10), st.sampled_from([8, 16, 32]), nm_patterns, bases, option_sets)
def test_nm_matches_the_per_row_oracle(seed, n, k, nm, base, options):
    pattern = Pattern(nm[0] / nm[1], *nm)
    w, stats, start_w, start_mask, new, mask, _ = run_case(seed, n, k, pattern, base, options)
    np.testing.assert_array_equal(mask, oracle(w, start_w, start_mask, stats, pattern, options))


@given(seeds, st.integers(1, 10), st.sampled_from([8, 16, 32]), st.one_of(
    st.floats(0.0, 0.9).map(Pattern), nm_patterns.map(lambda nm: Pattern(nm[0] / nm[1], *nm))),
    bases, option_sets)
def test_swaps_keep_structure_and_values(seed, n, k, pattern, base, options):
    """Structure first (zeros per row, per N:M group), then values: kept weights keep the base
    method's value, a regrown weight takes its dense value, pruned weights are exactly 0."""
    w, stats, start_w, start_mask, new, mask, info = run_case(seed, n, k, pattern, base, options)
    assert mask.dtype == bool and mask.shape == w.shape and new.dtype == np.float32
    np.testing.assert_array_equal(mask.sum(axis=1), start_mask.sum(axis=1))
    if pattern.structured:
        assert check_nm(mask, pattern.n, pattern.m)
    assert np.all(new[~mask] == 0)
    stayed, grown = mask & start_mask, mask & ~start_mask
    np.testing.assert_array_equal(new[stayed], start_w[stayed])
    np.testing.assert_array_equal(new[grown], w[grown])
    assert info["swaps"] == grown.sum() <= options.max_cycles * n


@given(seeds, st.integers(1, 10), st.sampled_from([8, 16, 32]), st.one_of(
    st.floats(0.0, 0.9).map(Pattern), nm_patterns.map(lambda nm: Pattern(nm[0] / nm[1], *nm))),
    bases, st.booleans())
def test_mean_guard_never_increases_any_rows_mean_error(seed, n, k, pattern, base, same_sign):
    w, stats, start_w, start_mask, new, mask, info = run_case(
        seed, n, k, pattern, base, DSnoTOptions(same_sign=same_sign, guard="mean"))
    before = np.abs(signed_error(w, start_w, stats.dsnot_sum))
    after = np.abs(signed_error(w, new, stats.dsnot_sum))
    assert np.all(after <= before + 1e-9 * (1 + before))
    assert info["error_after"] <= info["error_before"] * (1 + 1e-12) + 1e-9


def row_recon_error(dense, current, xtx):
    """||(W_i - W'_i) X||^2 per row [N] float64."""
    delta = dense.astype(np.float64) - current.astype(np.float64)
    return np.einsum("nk,kl,nl->n", delta, xtx, delta)


@given(seeds, st.integers(1, 10), st.sampled_from([8, 16, 32]), st.one_of(
    st.floats(0.0, 0.9).map(Pattern), nm_patterns.map(lambda nm: Pattern(nm[0] / nm[1], *nm))),
    bases, st.booleans())
def test_default_guard_never_increases_any_rows_reconstruction_error(seed, n, k, pattern, base,
                                                                     same_sign):
    w, stats, start_w, start_mask, new, mask, info = run_case(
        seed, n, k, pattern, base, DSnoTOptions(same_sign=same_sign))
    before = row_recon_error(w, start_w, stats.xtx)
    after = row_recon_error(w, new, stats.xtx)
    assert np.all(after <= before + 1e-9 * (1 + before))


def test_guards_are_checked():
    with pytest.raises(NpsparseError, match="guard"):
        DSnoTOptions(guard="sometimes")
    rng = np.random.default_rng(0)
    stats = make_stats(rng, 8)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    start_w, start_mask = wanda(w, stats.sq_norm, Pattern(0.5))
    with pytest.raises(ValueError, match="xtx"):
        dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum, stats.variance,
              Pattern(0.5))


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_reference_behaviour_can_increase_the_error(pattern):
    """Why the guard exists: without it (the reference), some row ends with a larger |e_i| than
    it started with, unstructured (no sign test) and N:M (pruned weight of either sign)."""
    increased = 0
    for seed in range(10):
        w, stats, start_w, _, new, _, _ = run_case(
            seed, 8, 16, Pattern.parse(pattern), "wanda", DSnoTOptions(guard="none"))
        before = np.abs(signed_error(w, start_w, stats.dsnot_sum))
        after = np.abs(signed_error(w, new, stats.dsnot_sum))
        increased += bool(np.any(after > before + 1e-9))
    assert increased >= 5


def test_rows_under_the_threshold_are_unchanged():
    w, stats, start_w, start_mask, new, mask, info = run_case(
        1, 8, 16, Pattern(0.5), "wanda", DSnoTOptions(threshold=np.inf))
    np.testing.assert_array_equal(mask, start_mask)
    np.testing.assert_array_equal(new, start_w)
    assert info["swaps"] == 0


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0"])
def test_bit_identical_across_runs(pattern):
    first = run_case(7, 16, 32, Pattern.parse(pattern), "sparsegpt", DSnoTOptions())
    second = run_case(7, 16, 32, Pattern.parse(pattern), "sparsegpt", DSnoTOptions())
    assert first[4].tobytes() == second[4].tobytes() and first[5].tobytes() == second[5].tobytes()


@pytest.mark.parametrize("pattern", ["0.5", "1:2"])
def test_tiny_and_degenerate_inputs(pattern):
    """1 x 2 matrices, all-zero weights, a constant (zero-variance) input column and an
    all-zero input column: no warning, no crash, structure kept."""
    rng = np.random.default_rng(0)
    stats = InputStats(2, ("sq", "sum", "var"))
    for _ in range(2):
        x = np.zeros((8, 2), np.float32)
        x[:, 0] = 1.5  # constant: zero variance
        stats.add(x)  # column 1 is always zero: zero mean, variance and norm
    p = Pattern.parse(pattern)
    for w in (rng.normal(size=(1, 2)).astype(np.float32), np.zeros((3, 2), np.float32)):
        start_w, start_mask = wanda(w, stats.sq_norm, p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new, mask, _ = dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum,
                                 stats.variance, p, DSnoTOptions(guard="mean"))
        np.testing.assert_array_equal(mask.sum(axis=1), start_mask.sum(axis=1))
        assert np.all(np.isfinite(new)) and np.all(new[~mask] == 0)


def test_regrown_weights_take_the_given_values():
    rng = np.random.default_rng(2)
    stats = make_stats(rng, 16)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    start_w, start_mask = sparsegpt(w, stats.hessian, Pattern(0.5), blocksize=8)
    regrow = rng.normal(size=w.shape).astype(np.float32)
    new, mask, info = dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum,
                            stats.variance, Pattern(0.5), DSnoTOptions(guard="mean"),
                            regrow=regrow)
    grown = mask & ~start_mask
    assert info["swaps"] == grown.sum() > 0
    np.testing.assert_array_equal(new[grown], regrow[grown])
