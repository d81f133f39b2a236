"""Patterns, masks, magnitude and Wanda: structure first, then values, then edge cases."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune import (InputStats, Pattern, check_nm, lowest_mask, magnitude, nm_mask,
                            prune_layer, wanda)

seeds = st.integers(0, 2**31 - 1)
nm_patterns = st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (5, 8), (1, 16)])


@pytest.mark.parametrize("text,expected", [
    ("0.5", Pattern(0.5)), (" 50% ", Pattern(0.5)), ("0", Pattern(0.0)), (0.25, Pattern(0.25)),
    ("2:4", Pattern(0.5, 2, 4)), ("4:8", Pattern(0.5, 4, 8)), ("1:4", Pattern(0.25, 1, 4)),
])
def test_parse(text, expected):
    parsed = Pattern.parse(text)
    assert parsed == expected and Pattern.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text,message", [
    ("1.5", "sparsity 1.5 is out of range: it must satisfy 0 <= s < 1"),
    ("100%", "out of range"), ("-1%", "out of range"), ("inf", "out of range"),
    ("3:2", "pattern 3:2 is impossible"), ("2:0", "impossible"), ("0:4", "impossible"),
    ("50%%", "cannot read sparsity pattern"), ("2:4:8", "cannot read"), ("", "cannot read"),
])
def test_bad_patterns_raise_one_line(text, message):
    with pytest.raises(NpsparseError, match=message) as info:
        Pattern.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_input_width_must_divide_into_groups(method):
    stats = InputStats(6)
    stats.add(np.ones((4, 6), np.float32))
    with pytest.raises(NpsparseError, match="6 input columns, not divisible by M=4"):
        prune_layer(method, np.ones((2, 6), np.float32), stats, Pattern.parse("2:4"),
                    base="wanda")


@given(seeds, st.integers(1, 12), st.integers(1, 10), nm_patterns)
def test_nm_groups_are_exact_and_never_straddle(seed, n, groups, nm):
    """Exactly N pruned per aligned group, the N lowest; changing one group's scores never
    changes another group's mask."""
    p, m = nm
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(n, groups * m))
    mask = nm_mask(score, p, m)
    assert check_nm(mask, p, m)
    blocks, kept = score.reshape(n, groups, m), mask.reshape(n, groups, m)
    low = np.where(kept, -np.inf, blocks).max(axis=2, initial=-np.inf)
    high = np.where(kept, blocks, np.inf).min(axis=2, initial=np.inf)
    assert np.all(low <= high)
    g = rng.integers(groups)
    changed = score.copy()
    changed[:, g * m:(g + 1) * m] = rng.normal(size=(n, m))
    other = np.ones(groups * m, dtype=bool)
    other[g * m:(g + 1) * m] = False
    np.testing.assert_array_equal(nm_mask(changed, p, m)[:, other], mask[:, other])


@given(seeds, st.integers(1, 10), st.integers(1, 30), st.floats(0, 0.99))
def test_lowest_mask_counts_and_reference_ties(seed, n, k, s):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 4, size=(n, k)).astype(np.float32)  # many ties
    count = int(score.size * s)
    exact = lowest_mask(score, count)
    assert (~exact).sum() == count
    reference = lowest_mask(score, count, reference_ties=True)
    threshold = np.sort(score, axis=None)[count]
    np.testing.assert_array_equal(reference, score > threshold)
    assert (~reference).sum() >= count + 1
    assert not np.any(reference & ~exact)  # the reference prunes a superset


@given(seeds, st.integers(1, 10), st.integers(1, 30), st.floats(0, 0.99))
def test_wanda_rows_and_values(seed, n, k, s):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32)
    w[rng.uniform(size=n) < 0.2] = 0.0  # all-zero rows
    sq = rng.uniform(0, 2, size=k) * (rng.uniform(size=k) > 0.2)  # some never-active inputs
    new, mask = wanda(w, sq, Pattern(s))
    assert mask.dtype == bool and new.dtype == np.float32
    np.testing.assert_array_equal((~mask).sum(axis=1), int(k * s))
    assert np.all(new[~mask] == 0) and np.array_equal(new[mask], w[mask])
    # a never-active input's weights go before any active input's nonzero weight
    score = np.abs(w.astype(np.float64)) * np.sqrt(sq)
    kept_min = np.where(mask, score, np.inf).min(axis=1)
    pruned_max = np.where(mask, -np.inf, score).max(axis=1)
    assert np.all(pruned_max <= kept_min)


def test_sparsity_zero_prunes_nothing_per_row():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7)).astype(np.float32)
    stats = InputStats(7)
    stats.add(rng.normal(size=(9, 7)).astype(np.float32))
    for method in ("magnitude", "wanda", "sparsegpt", "dsnot"):
        new, mask, info = prune_layer(method, w, stats, Pattern(0.0), base="wanda")
        assert mask.all() and info["sparsity"] == 0 and info["recon_error"] == 0
        assert new.tobytes() == w.tobytes()


@given(seeds, st.integers(1, 10), st.integers(1, 30), st.floats(0, 0.99))
def test_magnitude_matrix_and_row_groups(seed, n, k, s):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32)
    _, mask = magnitude(w, Pattern(s))
    assert (~mask).sum() == int(w.size * s)
    _, row_mask = magnitude(w, Pattern(s), group="row")
    np.testing.assert_array_equal((~row_mask).sum(axis=1), int(k * s))
    with pytest.raises(NpsparseError, match="unknown magnitude comparison group"):
        magnitude(w, Pattern(s), group="column")


def test_magnitude_reference_ties_on_quantized_weights():
    """fp16-like ties: the reference prunes all weights equal to the threshold (DSnoT#5 logs
    0.6013 at s = 0.6); the default prunes exactly floor(s * N * K)."""
    w = np.tile(np.array([0.5, -0.5, 1.0, 2.0, -0.25], np.float32), (4, 2))  # [4, 10]
    _, exact = magnitude(w, Pattern(0.3))
    _, reference = magnitude(w, Pattern(0.3), reference_ties=True)
    assert (~exact).sum() == 12
    assert (~reference).sum() == 24  # every |w| <= 0.5


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_tiny_matrices(method, pattern):
    rng = np.random.default_rng(1)
    stats = InputStats(4)
    stats.add(rng.normal(size=(3, 4)).astype(np.float32))  # 3 tokens, 4 columns: singular
    for w in (rng.normal(size=(1, 4)).astype(np.float32), np.zeros((2, 4), np.float32)):
        new, mask, info = prune_layer(method, w, stats, Pattern.parse(pattern), base="sparsegpt")
        assert np.all(np.isfinite(new)) and np.all(new[~mask] == 0)
        if Pattern.parse(pattern).structured or method == "wanda":
            np.testing.assert_array_equal((~mask).sum(axis=1), 2)  # per row
        else:  # magnitude per matrix, SparseGPT per block (and DSnoT on SparseGPT's mask)
            assert (~mask).sum() == w.size // 2


def test_nm_constructor_and_consistency():
    assert Pattern.nm(2, 4) == Pattern.parse("2:4") == Pattern(0.5, 2, 4)
    assert Pattern.nm(3, 8).structured and not Pattern(0.5).structured
    with pytest.raises(NpsparseError, match="pattern 2:4 has sparsity 0.5, not 0.3"):
        Pattern(0.3, 2, 4)
