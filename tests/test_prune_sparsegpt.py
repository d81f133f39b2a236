"""SparseGPT against a naive oracle: explicit inverses of the remaining Hessian, no Cholesky, no
lazy blocks, eager OBS updates. Plus edge cases: s = 0, dead columns, tiny and odd shapes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune import InputStats, Pattern, check_nm, prune_layer, sparsegpt

seeds = st.integers(0, 2**31 - 1)


def hessian_of(rng, k, tokens=None, dead=()):
    """H = (2/S) X^T X of correlated inputs (S = 2 sequences), with some always-zero inputs."""
    tokens = tokens or 3 * k + 8
    mix = np.eye(k) + 0.7 * rng.normal(size=(k, k)) / np.sqrt(k)
    stats = InputStats(k, ("hessian",))
    for _ in range(2):
        x = (rng.normal(size=(tokens, k)) @ mix + 0.2).astype(np.float32)
        x[:, list(dead)] = 0.0
        stats.add(x)
    return stats.hessian


def naive_sparsegpt(w, h, pattern, blocksize, percdamp):
    """SparseGPT (Frantar & Alistarh 2023) written column by column: U_jj^2 = [(H_FF)^-1]_00 with
    F = {j, ..., K-1}, and pruning w_rj updates row r by -(w_rj / [H_FF^-1]_00) H_FF^-1[0, :]."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n_rows, n_cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(n_cols)
    inverses = [np.linalg.inv(h[j:, j:]) for j in range(n_cols)]  # [F, F] each
    d2 = np.array([inv[0, 0] for inv in inverses])  # [K] U_jj^2
    keep = np.ones(w.shape, dtype=bool)
    for j in range(n_cols):
        if not pattern.structured and j % blocksize == 0:
            block = slice(j, min(j + blocksize, n_cols))
            saliency = (w[:, block] ** 2 / d2[block]).ravel()  # row-major, like the block
            pruned = np.argsort(saliency, kind="stable")[:int(saliency.size * pattern.sparsity)]
            flat = np.ones(saliency.size, dtype=bool)
            flat[pruned] = False
            keep[:, block] = flat.reshape(n_rows, -1)
        if pattern.structured and j % pattern.m == 0:
            group = slice(j, j + pattern.m)
            saliency = w[:, group] ** 2 / d2[group]  # [N, M]
            for r in range(n_rows):
                keep[r, j + np.argsort(saliency[r], kind="stable")[:pattern.n]] = False
        for r in np.flatnonzero(~keep[:, j]):
            w[r, j:] -= w[r, j] / d2[j] * inverses[j][0]
            w[r, j] = 0.0
    return w, keep


@given(seeds, st.integers(1, 9), st.integers(1, 40), st.sampled_from([4, 8, 16, 128]),
       st.floats(0.0, 0.9), st.sampled_from([0.0, 0.01, 0.1]), st.booleans())
def test_unstructured_matches_the_naive_oracle(seed, n, k, blocksize, s, percdamp, with_dead):
    rng = np.random.default_rng(seed)
    dead = (k // 2,) if with_dead and k > 1 else ()
    h = hessian_of(rng, k, dead=dead)
    w = rng.normal(size=(n, k)).astype(np.float32)
    new, mask = sparsegpt(w, h, Pattern(s), blocksize=blocksize, percdamp=percdamp)
    expected, expected_mask = naive_sparsegpt(w, h, Pattern(s), blocksize, percdamp)
    np.testing.assert_array_equal(mask, expected_mask)
    assert new.dtype == np.float32 and np.all(new[~mask] == 0)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


@given(seeds, st.integers(1, 9), st.sampled_from([8, 16, 24, 48]),
       st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)]), st.sampled_from([8, 16, 128]),
       st.booleans())
def test_nm_matches_the_naive_oracle(seed, n, k, nm, blocksize, with_dead):
    rng = np.random.default_rng(seed)
    h = hessian_of(rng, k, dead=(1, 5) if with_dead else ())
    w = rng.normal(size=(n, k)).astype(np.float32)
    pattern = Pattern(nm[0] / nm[1], *nm)
    new, mask = sparsegpt(w, h, pattern, blocksize=blocksize)
    expected, expected_mask = naive_sparsegpt(w, h, pattern, blocksize, 0.01)
    assert check_nm(mask, *nm)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))
    if with_dead:
        assert np.all(new[:, [1, 5]] == 0)


@given(seeds, st.integers(1, 9), st.integers(1, 40))
def test_sparsity_zero_returns_the_weights_unchanged(seed, n, k):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32)
    new, mask = sparsegpt(w, hessian_of(rng, k), Pattern(0.0), blocksize=16)
    assert mask.all()
    assert new.tobytes() == w.tobytes()


def test_reference_ties_prune_one_more_even_at_zero():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 20)).astype(np.float32)
    h = hessian_of(rng, 20)
    _, mask = sparsegpt(w, h, Pattern(0.0), blocksize=8, reference_ties=True)
    np.testing.assert_array_equal([(~mask[:, i:i + 8]).sum() for i in (0, 8, 16)], [1, 1, 1])
    _, mask = sparsegpt(w, h, Pattern(0.5), blocksize=8, reference_ties=True)
    np.testing.assert_array_equal([(~mask[:, i:i + 8]).sum() for i in (0, 8, 16)], [17, 17, 9])


def test_blocksize_must_hold_whole_groups():
    rng = np.random.default_rng(0)
    with pytest.raises(NpsparseError, match="blocksize 6 must be a multiple of M=4"):
        sparsegpt(np.ones((2, 8), np.float32), hessian_of(rng, 8), Pattern.parse("2:4"),
                  blocksize=6)


def test_a_singular_hessian_without_dampening_is_a_clear_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8))  # 3 tokens, 8 features: rank 3, no zero diagonal
    h = 2 * x.T @ x
    with pytest.raises(NpsparseError, match="not positive definite"):
        sparsegpt(np.ones((2, 8), np.float32), h, Pattern(0.5), percdamp=0.0)
    new, _ = sparsegpt(np.ones((2, 8), np.float32), h, Pattern(0.5))  # 1% dampening suffices
    assert np.all(np.isfinite(new))


def test_all_dead_and_all_zero_inputs():
    """Every input is always zero: every weight is irrelevant and ends at 0."""
    w = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    new, mask = sparsegpt(w, np.zeros((8, 8)), Pattern(0.5), blocksize=4)
    assert np.all(new == 0) and (~mask).sum() == 12


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
def test_bit_identical_across_runs(pattern):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 64)).astype(np.float32)
    h = hessian_of(rng, 64)
    first = sparsegpt(w, h, Pattern.parse(pattern), blocksize=32)
    second = sparsegpt(w.copy(), h.copy(), Pattern.parse(pattern), blocksize=32)
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() == second[1].tobytes()


def correlated_stats(seed, k=64, sequences=8, tokens=256, rho=0.9):
    """Inputs whose columns share a strong common factor (correlation ~rho), with log-normal
    column scales and an 8x outlier feature every 16 columns, as in LLM activations."""
    rng = np.random.default_rng(seed)
    stats = InputStats(k, ("sq", "hessian"))
    scale = np.exp(0.5 * rng.normal(size=k))
    scale[::16] *= 8.0
    for _ in range(sequences):
        common = rng.normal(size=(tokens, 1))
        x = np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.normal(size=(tokens, k))
        stats.add((x * scale).astype(np.float32))
    return stats, rng


@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_error_ordering_on_strongly_correlated_inputs(pattern):
    """SparseGPT <= Wanda <= magnitude in ||W X - W' X||^2.

    Not a theorem: SparseGPT's mask is chosen greedily per 128-column block (all rows together)
    and its update is sequential OBS, which is not even the joint optimum for its own mask; Wanda's
    score ignores correlations. What is a theorem is only that, for a FIXED mask, the joint
    least-squares optimum beats leaving the kept weights alone. Measured with this generator over
    20 seeds: with rho = 0.9 and 0.5 both inequalities held 20/20 for all four patterns; with
    independent inputs (rho = 0) SparseGPT lost to Wanda at 70% in 20/20 (its per-block mask
    allocation is worse than Wanda's per-row one when there is nothing to compensate), and with
    all outlier features in one 2:4 group Wanda and magnitude tie up to noise. So the claim is
    asserted where it is expected: strongly correlated inputs (rho = 0.9), outlier features spread
    over the groups, 2048 tokens >> 64 columns, 5 fixed seeds."""
    for seed in range(5):
        stats, rng = correlated_stats(seed)
        w = rng.normal(size=(48, 64)).astype(np.float32)
        err = {m: prune_layer(m, w, stats, Pattern.parse(pattern))[2]["recon_error"]
               for m in ("magnitude", "wanda", "sparsegpt")}
        assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], (seed, err)
