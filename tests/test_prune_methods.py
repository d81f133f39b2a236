"""Property tests of the pruning methods: exact masks, OBS closed forms, DSnoT invariants."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune import (DSnoTOptions, InputStats, Pattern, check_nm, dsnot, magnitude,
                            owl_sparsities, prune_layer, reconstruction_error, sparsegpt,
                            stats_needed, wanda)
from npsparse.prune.sparsegpt import inverse_hessian_factor

ALL = ("sq", "hessian", "sum", "var")


def correlated_inputs(rng, k, tokens=512, sequences=4, mean=0.3):
    """Inputs with strongly correlated columns and a few outlier features, in sequences."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    mix += np.eye(k)
    x = rng.normal(size=(sequences * tokens, k)) @ mix
    x[:, : max(1, k // 16)] *= 6.0  # outlier features, as in LLM activations
    return (x + mean).reshape(sequences, tokens, k).astype(np.float32)


def stats_of(x, needs=ALL):
    stats = InputStats(x.shape[-1], needs)
    for seq in x:
        stats.add(seq)
    return stats


shapes = st.tuples(st.integers(1, 24), st.integers(1, 12).map(lambda g: 8 * g))
seeds = st.integers(0, 2**31 - 1)
sparsities = st.floats(0.0, 0.95)
nm_patterns = st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)])


# -- patterns -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("1.5", "sparsity 1.5 is out of range"), ("-0.1", "out of range"), ("1", "out of range"),
    ("3:2", "pattern 3:2 is impossible"), ("0:4", "impossible"), ("4:4", "impossible"),
    ("abc", "cannot read sparsity pattern"), ("nan", "out of range"),
])
def test_impossible_patterns_are_refused(text, message):
    with pytest.raises(NpsparseError, match=message):
        Pattern.parse(text)


def test_pattern_parsing():
    assert Pattern.parse("50%") == Pattern(0.5)
    assert Pattern.parse("2:4") == Pattern(0.5, 2, 4)
    assert Pattern.parse("0.7").sparsity == 0.7


def test_width_not_divisible_by_m():
    with pytest.raises(NpsparseError, match="not divisible by M=4"):
        wanda(np.ones((2, 6), np.float32), np.ones(6), Pattern.parse("2:4"))


# -- magnitude and Wanda ---------------------------------------------------------------------

@given(shapes, sparsities, seeds)
def test_wanda_prunes_exactly_floor_ks_per_row(shape, s, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    sq = rng.uniform(0.1, 3.0, size=shape[1])
    new, mask = wanda(w, sq, Pattern(s))
    assert mask.dtype == bool and mask.shape == shape
    np.testing.assert_array_equal((~mask).sum(axis=1), int(shape[1] * s))
    assert np.all(new[~mask] == 0) and np.array_equal(new[mask], w[mask])
    # The kept scores of each row are all >= the pruned ones.
    score = np.abs(w) * np.sqrt(sq)
    for row in range(shape[0]):
        if mask[row].any() and (~mask[row]).any():
            assert score[row][mask[row]].min() >= score[row][~mask[row]].max()


@given(shapes, sparsities, seeds, st.floats(0.01, 100))
def test_wanda_mask_ignores_positive_rescaling_of_statistics(shape, s, seed, scale):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    sq = rng.uniform(0.1, 3.0, size=shape[1])
    np.testing.assert_array_equal(wanda(w, sq, Pattern(s))[1], wanda(w, sq * scale, Pattern(s))[1])


@given(shapes, nm_patterns, seeds)
def test_nm_groups_are_exact_and_aligned(shape, nm, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    pattern = Pattern(n / m, n, m)
    for _, mask in (wanda(w, rng.uniform(size=shape[1]), pattern), magnitude(w, pattern)):
        assert check_nm(mask, n, m)
        groups = mask.reshape(shape[0], -1, m)
        np.testing.assert_array_equal(groups.sum(axis=2), m - n)


@given(shapes, sparsities, seeds)
def test_magnitude_per_matrix_prunes_the_smallest(shape, s, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    new, mask = magnitude(w, Pattern(s))
    assert (~mask).sum() == int(w.size * s)
    if mask.any() and (~mask).any():
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()


# -- SparseGPT -------------------------------------------------------------------------------

def obs_sequential_reference(w, h, keep):
    """OBS applied column by column with explicit inverses (no Cholesky, no blocks): when column
    j is pruned, the not-yet-processed columns F = {j, ..., K-1} are corrected by
    dw_F = -(w_j / [H_FF^-1]_00) [H_FF^-1]_0,: (Hassibi & Stork's update restricted to F)."""
    w = w.copy()
    k = w.shape[1]
    for j in range(k):
        h_inv = np.linalg.inv(h[j:, j:])  # [F, F]
        pruned = ~keep[:, j]
        w[pruned, j:] -= np.outer(w[pruned, j] / h_inv[0, 0], h_inv[0])
    return w


def joint_optimum(w, h, keep):
    """The best kept weights for a fixed mask: min (w - w')^T H (w - w') with w'_P = 0."""
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        kept, pruned = keep[r], ~keep[r]
        if kept.any():
            rhs = h[np.ix_(kept, pruned)] @ w[r, pruned]
            out[r, kept] = w[r, kept] + np.linalg.solve(h[np.ix_(kept, kept)], rhs)
    return out


@given(st.integers(1, 10), st.integers(2, 24), seeds, st.floats(0.1, 0.9))
def test_sparsegpt_fixed_mask_equals_closed_form_obs(n, k, seed, s):
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, k, tokens=64, sequences=2)
    stats = stats_of(x, ("hessian",))
    h = stats.hessian
    w = rng.normal(size=(n, k)).astype(np.float32)
    keep = rng.uniform(size=(n, k)) > s
    new, mask = sparsegpt(w, h, Pattern(0.0), blocksize=k, percdamp=0.0, mask=keep)
    np.testing.assert_array_equal(mask, keep)
    expected = obs_sequential_reference(w.astype(np.float64), h, keep)
    expected[~keep] = 0.0
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(new, expected, atol=2e-4 * scale, rtol=0)
    # Sequential OBS never beats the joint optimum for the same mask.
    best = joint_optimum(w.astype(np.float64), h, keep)
    assert reconstruction_error(w, best, h) <= reconstruction_error(w, new, h) * (1 + 1e-6) + 1e-9


@given(st.integers(1, 8), st.integers(2, 20), seeds)
def test_single_weight_obs_update(n, k, seed):
    """Pruning one weight (column 0) with OBS: dw = -(w_0 / [H^-1]_00) H^-1[0, :]."""
    rng = np.random.default_rng(seed)
    stats = stats_of(correlated_inputs(rng, k, tokens=64, sequences=2), ("hessian",))
    h = stats.hessian
    w = rng.normal(size=(n, k))
    keep = np.ones((n, k), dtype=bool)
    keep[:, 0] = False
    new, _ = sparsegpt(w.astype(np.float32), h, Pattern(0.0), blocksize=k, percdamp=0.0, mask=keep)
    h_inv = np.linalg.inv(h)
    expected = w - np.outer(w[:, 0] / h_inv[0, 0], h_inv[0])
    np.testing.assert_allclose(new, expected, atol=1e-4 * max(1, np.abs(expected).max()))
    assert np.all(new[:, 0] == 0)


@given(st.integers(1, 12), st.sampled_from([8, 16, 32, 48]), nm_patterns, seeds)
def test_sparsegpt_nm_does_not_depend_on_blocksize(n, k, nm, seed):
    rng = np.random.default_rng(seed)
    stats = stats_of(correlated_inputs(rng, k, tokens=64, sequences=2), ("hessian",))
    w = rng.normal(size=(n, k)).astype(np.float32)
    pattern = Pattern(nm[0] / nm[1], *nm)
    small, mask_small = sparsegpt(w, stats.hessian, pattern, blocksize=8)
    large, mask_large = sparsegpt(w, stats.hessian, pattern, blocksize=48)
    np.testing.assert_array_equal(mask_small, mask_large)
    assert check_nm(mask_small, *nm)
    np.testing.assert_allclose(small, large, atol=1e-4 * max(1, np.abs(w).max()))


@given(st.integers(1, 12), st.integers(4, 40), sparsities, seeds)
def test_sparsegpt_structure(n, k, s, seed):
    rng = np.random.default_rng(seed)
    stats = stats_of(correlated_inputs(rng, k, tokens=32, sequences=2), ("hessian",))
    w = rng.normal(size=(n, k)).astype(np.float32)
    new, mask = sparsegpt(w, stats.hessian, Pattern(s), blocksize=16)
    assert np.all(new[~mask] == 0)
    for start in range(0, k, 16):  # each block of columns prunes exactly floor(s * N * B)
        block = mask[:, start:start + 16]
        assert (~block).sum() == int(block.size * s)


def test_sparsegpt_dead_columns_end_at_zero():
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 16, tokens=64, sequences=2)
    x[:, :, 5] = 0.0
    stats = stats_of(x, ("hessian",))
    w = rng.normal(size=(6, 16)).astype(np.float32)
    new, _ = sparsegpt(w, stats.hessian, Pattern(0.25), blocksize=8)
    assert np.all(new[:, 5] == 0)


def test_sparsegpt_loss_identity():
    """Sum of per-column OBS losses = 1/2 tr(dW H dW^T) (the OBS identity SparseGPT builds on), via the update."""
    rng = np.random.default_rng(1)
    stats = stats_of(correlated_inputs(rng, 24, tokens=128, sequences=3), ("hessian",))
    w = rng.normal(size=(5, 24)).astype(np.float32)
    keep = rng.uniform(size=w.shape) > 0.5
    new, _ = sparsegpt(w, stats.hessian, Pattern(0.0), blocksize=8, percdamp=0.01, mask=keep)
    upper, w64, h_damped = inverse_hessian_factor(stats.hessian, w, 0.01)
    # Replay the sweep to sum the losses (w - q)^2 / U_jj^2 / 2 column by column.
    work, loss = w64.copy(), 0.0
    for j in range(24):
        q = np.where(keep[:, j], work[:, j], 0.0)
        err = (work[:, j] - q) / upper[j, j]
        loss += float(np.sum(err ** 2) / 2)
        work[:, j:] -= np.outer(err, upper[j, j:])
        work[:, j] = q
    delta = w64 - new.astype(np.float64)
    assert loss == pytest.approx(0.5 * np.einsum("nk,nk->", delta @ h_damped, delta), rel=1e-4)


def test_reconstruction_error_ordering_on_correlated_inputs():
    """SparseGPT <= Wanda <= magnitude in ||W X - W' X||^2, at 50% and 70%.

    Conditions: correlated input columns with a few 6x outlier features and a mean offset (the
    regime of LLM activations), 2048 tokens, K = 512 inputs so that SparseGPT's 128-column blocks
    leave later columns to absorb the OBS updates. Neither inequality is a theorem: with a single
    block (K <= 128) at 70% SparseGPT's one-shot block mask was seen to lose to Wanda by ~2%.
    Measured here: relative errors ~0.015 / 0.025 / 0.07 at 50%, ~0.055 / 0.08 / 0.21 at 70%."""
    for seed in range(2):
        rng = np.random.default_rng(seed)
        x = correlated_inputs(rng, 512, tokens=512, sequences=4)
        stats = stats_of(x)
        w = rng.normal(size=(64, 512)).astype(np.float32)
        for s in (0.5, 0.7):
            err = {m: prune_layer(m, w, stats, Pattern(s))[2]["recon_error"]
                   for m in ("magnitude", "wanda", "sparsegpt")}
            assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], (seed, s, err)


@given(st.integers(1, 6), st.integers(2, 16), seeds)
def test_reconstruction_error_is_the_sum_over_tokens(n, k, seed):
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, k, tokens=16, sequences=2)
    stats = stats_of(x, ("hessian",))
    w, w2 = rng.normal(size=(2, n, k)).astype(np.float32)
    flat = x.reshape(-1, k).astype(np.float64)
    direct = np.sum((flat @ w.T.astype(np.float64) - flat @ w2.T.astype(np.float64)) ** 2)
    assert reconstruction_error(w, w2, stats.xtx) == pytest.approx(direct, rel=1e-8)


# -- DSnoT -----------------------------------------------------------------------------------

def _dsnot_case(seed, n, k, s, base="wanda", options=DSnoTOptions(), nm=None):
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, k, tokens=64, sequences=2, mean=rng.uniform(-1, 1))
    stats = stats_of(x)
    w = rng.normal(size=(n, k)).astype(np.float32)
    pattern = Pattern(nm[0] / nm[1], *nm) if nm else Pattern(s)
    if base == "wanda":
        start_w, start_mask = wanda(w, stats.sq_norm, pattern)
    else:
        start_w, start_mask = sparsegpt(w, stats.hessian, pattern, blocksize=8)
    new, mask, info = dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum,
                            stats.variance, pattern, options, xtx=stats.xtx)
    return w, stats, start_w, start_mask, new, mask, info


@given(seeds, st.integers(1, 16), st.sampled_from([8, 16, 32]), st.floats(0.2, 0.8),
       st.sampled_from(["wanda", "sparsegpt"]), st.booleans())
def test_dsnot_keeps_zeros_per_row_and_only_swaps(seed, n, k, s, base, same_sign):
    w, _, start_w, start_mask, new, mask, info = _dsnot_case(
        seed, n, k, s, base, DSnoTOptions(same_sign=same_sign))
    np.testing.assert_array_equal(mask.sum(axis=1), start_mask.sum(axis=1))
    assert np.all(new[~mask] == 0)
    # Weights are never modified apart from masking: kept-before keep their base value, regrown
    # ones take the dense value.
    stayed = mask & start_mask
    np.testing.assert_array_equal(new[stayed], start_w[stayed])
    grown = mask & ~start_mask
    np.testing.assert_array_equal(new[grown], w[grown])
    assert info["swaps"] <= 50 * n


@given(seeds, st.integers(1, 16), st.sampled_from([8, 16, 32]), nm_patterns)
def test_dsnot_preserves_nm(seed, n, k, nm):
    *_, mask, info = _dsnot_case(seed, n, k, 0.5, nm=nm)
    assert check_nm(mask, *nm)


@given(seeds, st.integers(1, 16), st.sampled_from([8, 16, 32]), st.floats(0.2, 0.8))
def test_dsnot_with_sign_test_never_increases_its_objective(seed, n, k, s):
    """With the sign test (always on for N:M, an option for unstructured), every swap moves e_i
    toward 0 without crossing it, so sum_i |e_i| can only fall."""
    *_, info = _dsnot_case(seed, n, k, s, options=DSnoTOptions(same_sign=True, guard="none"))
    assert info["error_after"] <= info["error_before"] + 1e-9


def test_dsnot_leaves_rows_below_threshold_alone():
    w, stats, start_w, start_mask, new, mask, info = _dsnot_case(
        0, 8, 16, 0.5, options=DSnoTOptions(threshold=1e12))
    np.testing.assert_array_equal(mask, start_mask)
    assert info["swaps"] == 0


def test_dsnot_zero_variance_columns_do_not_break_it():
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 16, tokens=32, sequences=2)
    x[:, :, 2] = 1.5  # constant input: zero variance
    stats = stats_of(x)
    w = rng.normal(size=(4, 16)).astype(np.float32)
    start_w, start_mask = wanda(w, stats.sq_norm, Pattern(0.5))
    new, mask, _ = dsnot(w, start_w, start_mask, stats.sq_norm, stats.dsnot_sum, stats.variance,
                         Pattern(0.5), xtx=stats.xtx)
    assert np.all(np.isfinite(new))
    np.testing.assert_array_equal(mask.sum(axis=1), start_mask.sum(axis=1))


# -- driver-level API ------------------------------------------------------------------------

@given(seeds, st.sampled_from(["magnitude", "wanda", "sparsegpt", "dsnot"]),
       st.sampled_from(["0.5", "0.7", "2:4"]))
def test_prune_layer_is_deterministic(seed, method, pattern):
    rng = np.random.default_rng(seed)
    stats = stats_of(correlated_inputs(rng, 16, tokens=32, sequences=2))
    w = rng.normal(size=(8, 16)).astype(np.float32)
    first = prune_layer(method, w, stats, Pattern.parse(pattern), base="wanda")
    second = prune_layer(method, w, stats, Pattern.parse(pattern), base="wanda")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2]["recon_error"] == second[2]["recon_error"]


def test_dsnot_needs_a_base():
    with pytest.raises(NpsparseError, match="DSnoT needs --base"):
        stats_needed("dsnot", None)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=40), st.floats(0.1, 0.9))
def test_owl_sparsities_average_to_the_target(ratios, s):
    assume(max(ratios) - min(ratios) > 1e-6)
    out = owl_sparsities(ratios, s, 0.08)
    assert abs(out.mean() - s) < 1e-9 or (out.min() == 0.0 or out.max() == 0.99)
    assert out.max() - out.min() <= 0.16 + 1e-9
    # More outliers -> lower sparsity.
    order = np.argsort(ratios, kind="stable")
    assert np.all(np.diff(out[order]) <= 1e-12)
