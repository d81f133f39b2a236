"""OWL's layer-wise sparsity allocation and outlier ratio."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npsparse.prune import outlier_ratio, owl_sparsities

ratio_lists = st.lists(st.floats(0, 100, allow_subnormal=False), min_size=1, max_size=40)


def reference_allocation(ratios_percent, sparsity, lam):
    """The reference's arithmetic (own wording): min-max scale to [0, 2 lam], densities shifted
    to mean 1 - s, sparsity = 1 - density."""
    r = np.array(ratios_percent, dtype=np.float64)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    density = r - np.mean(r) + (1 - sparsity)
    return 1 - density


@given(ratio_lists, st.floats(0.0, 0.98), st.sampled_from([0.02, 0.08, 0.2]))
def test_mean_is_the_target_and_bounds_hold(ratios, s, lam):
    out = owl_sparsities(ratios, s, lam)
    assert out.shape == (len(ratios),) and out.dtype == np.float64
    assert out.mean() == pytest.approx(s, abs=1e-12)
    assert np.all(out >= 0) and np.all(out <= 0.99 + 1e-12)
    assert out.max() - out.min() <= 2 * lam + 1e-12
    order = np.argsort(ratios, kind="stable")  # more outliers -> lower sparsity
    assert np.all(np.diff(out[order]) <= 1e-12)


@given(ratio_lists, st.floats(0.1, 0.85))
def test_equals_the_reference_formula_when_nothing_is_clamped(ratios, s):
    assume(max(ratios) - min(ratios) > 1e-3)
    expected = reference_allocation(ratios, s, 0.08)
    assume(expected.min() >= 0 and expected.max() <= 0.99)
    np.testing.assert_allclose(owl_sparsities(ratios, s, 0.08), expected, atol=1e-12)
    # Fractions or percentages, or any shift of the ratios: the same allocation.
    np.testing.assert_allclose(owl_sparsities(np.array(ratios) / 100 + 3, s, 0.08),
                               owl_sparsities(ratios, s, 0.08), atol=1e-9)


def test_equal_ratios_give_uniform_sparsity():
    np.testing.assert_array_equal(owl_sparsities([2.5] * 6, 0.7), 0.7)


def test_low_targets_shrink_the_spread_unless_reference_clamp():
    ratios = [0.0, 1.0, 3.0, 10.0]
    out = owl_sparsities(ratios, 0.03, 0.08)
    assert out.mean() == pytest.approx(0.03) and out.min() == pytest.approx(0.0, abs=1e-15)
    reference = owl_sparsities(ratios, 0.03, 0.08, reference_clamp=True)
    assert 0.01 in reference and reference.mean() > 0.03  # the reference's drift


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [np.ones((10, 10)), np.array([[1000.0]])]  # mean = 1100 / 101
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 101)
    assert outlier_ratio([np.ones((3, 3))], 5.0) == 0.0
