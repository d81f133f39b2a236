"""LoRA, PST and SaRA adapters: gradients against finite differences (float64), masks, schedule.

For a function ``W_eff = f(params)`` and a random upstream ``G``, the scalar ``L = <G, f>`` has
directional derivative ``<dL/dp, v>`` along a random ``v``; :meth:`Adapter.backward` must give
the same number as ``(L(p + e v) - L(p - e v)) / 2e``. PST's top-k has no derivative: with the
mask held fixed its product part is checked that way, and its straight-through part against the
closed form ``dL/dS = G ⊙ W'`` pushed through the score by finite differences.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npsparse.errors import NpsparseError
from npsparse.prune.patterns import Pattern, check_nm, lowest_mask, nm_mask
from npsparse.train.adapters import (PST, LoRA, SaRA, SparsitySchedule, check_fraction,
                                     check_rank, cubic_sparsity, nm_keep, nm_ramp_mask,
                                     nuclear_norm_subgradient, top_k_mask)
from npsparse.train.optim import AdamW, AdamWSettings

EPS = 1e-6
seeds = st.integers(0, 2**32 - 1)


def directional_check(adapter, loss_of, grads, rng, names=None):
    """<grad, v> against the central difference of ``loss_of()`` along v, per parameter."""
    params = adapter.params()
    for name in names or params:
        p = params[name]
        v = rng.standard_normal(p.shape)
        saved = p.copy()
        p += EPS * v
        plus = loss_of()
        p[...] = saved - EPS * v
        minus = loss_of()
        p[...] = saved
        numeric = (plus - minus) / (2 * EPS)
        analytic = float(np.sum(grads[name] * v))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def perturb(adapter, rng, scale=0.3):
    """Move every trainable array away from its (partly zero) initial value."""
    for p in adapter.params().values():
        p += scale * rng.standard_normal(p.shape)


# -- masks and schedule ----------------------------------------------------------------------

@given(n=st.integers(1, 8), k=st.integers(1, 12), levels=st.integers(1, 6), seed=seeds,
       data=st.data())
def test_top_k_mask_is_exact_and_equals_the_sorting_mask(n, k, levels, seed, data):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, levels, (n, k)).astype(np.float64)  # many ties
    n_keep = data.draw(st.integers(0, n * k))
    mask = top_k_mask(score, n_keep)
    assert mask.dtype == bool and mask.shape == score.shape
    assert int(mask.sum()) == n_keep
    np.testing.assert_array_equal(mask, lowest_mask(score, n * k - n_keep))


@given(rows=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(2, 4), (1, 4),
       (4, 8), (1, 2)]), seed=seeds, data=st.data())
def test_nm_ramp_mask_prunes_the_count_and_ends_on_the_pattern(rows, groups, nm, seed, data):
    n, m = nm
    rng = np.random.default_rng(seed)
    score = rng.standard_normal((rows, groups * m))
    most = rows * groups * n
    n_prune = data.draw(st.integers(0, most))
    mask = nm_ramp_mask(score, n_prune, n, m)
    assert int((~mask).sum()) == n_prune
    kept_per_group = mask.reshape(rows, groups, m).sum(axis=2)
    assert np.all(kept_per_group >= m - n)
    assert np.all(mask[nm_mask(score, n, m)])  # each group's top m - n is never pruned
    final = nm_ramp_mask(score, most, n, m)
    assert check_nm(final, n, m)
    np.testing.assert_array_equal(final, nm_mask(score, n, m))


@given(rows=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(2, 4), (1, 4),
       (3, 4), (4, 8), (1, 2)]), levels=st.integers(1, 5), seed=seeds)
def test_nm_keep_equals_the_sorting_nm_mask(rows, groups, nm, levels, seed):
    n, m = nm
    score = np.random.default_rng(seed).integers(0, levels, (rows, groups * m)).astype(float)
    np.testing.assert_array_equal(nm_keep(score, n, m), nm_mask(score, n, m))  # ties included


@given(total=st.integers(1, 300), final=st.floats(0, 0.95), initial_frac=st.floats(0, 1),
       warm=st.floats(0, 0.5), cool=st.floats(0, 0.45))
def test_cubic_schedule_endpoints_and_monotone(total, final, initial_frac, warm, cool):
    initial = final * initial_frac
    schedule = SparsitySchedule(final, initial, warm, cool)
    values = [schedule.at(t, total) for t in range(total + 1)]
    assert values[0] == initial and values[-1] == final
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))
    assert all(initial - 1e-15 <= v <= final + 1e-15 for v in values)


def test_cubic_schedule_follows_the_reference_formula():
    # 100 steps, 10% at s_i, 30% at s_f: step 40 is half-way through the ramp
    assert cubic_sparsity(10, 100, 0.0, 0.5) == 0.0
    assert cubic_sparsity(40, 100, 0.0, 0.5) == pytest.approx(0.5 - 0.5 * 0.5**3)
    assert cubic_sparsity(70, 100, 0.0, 0.5) == pytest.approx(0.5)
    assert cubic_sparsity(71, 100, 0.0, 0.5) == 0.5


@pytest.mark.parametrize("kwargs,message", [
    (dict(final=1.5), "out of range"),
    (dict(final=0.5, initial=0.6), "initial sparsity"),
    (dict(final=0.5, initial_warmup=0.7, final_warmup=0.3), "sum < 1"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(NpsparseError, match=message):
        SparsitySchedule(**kwargs)


def test_bad_rank_fraction_and_pattern_are_refused():
    for rank in (0, -1):
        with pytest.raises(NpsparseError, match="at least 1"):
            check_rank(rank)
    with pytest.raises(NpsparseError, match="exceeds"):
        check_rank(9, (8, 16))
    for fraction in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(NpsparseError, match="0 < F < 1"):
            check_fraction(fraction)
    with pytest.raises(NpsparseError, match="impossible"):
        Pattern.parse("3:2")
    with pytest.raises(NpsparseError, match="out of range"):
        Pattern.parse("1.5")
    with pytest.raises(NpsparseError, match="not divisible"):
        PST(np.ones((4, 6)), Pattern.nm(2, 4), rank=2, rng=np.random.default_rng(0))


# -- LoRA ------------------------------------------------------------------------------------

@given(n=st.integers(1, 7), k=st.integers(1, 9), rank=st.integers(1, 4), seed=seeds)
def test_lora_gradients_equal_finite_differences(n, k, rank, seed):
    rng = np.random.default_rng(seed)
    rank = min(rank, n, k)
    lora = LoRA(rng.standard_normal((n, k)), rank, alpha=2.0 * rank, rng=rng)
    assert not lora.B.any() and lora.trainable_count() == rank * (n + k)
    np.testing.assert_array_equal(lora.effective(), lora.base)  # B = 0: starts at W
    perturb(lora, rng)
    upstream = rng.standard_normal((n, k))
    grads = lora.backward(upstream)
    directional_check(lora, lambda: float(np.sum(upstream * lora.effective())), grads, rng)
    np.testing.assert_allclose(lora.merged(), lora.base + 2.0 * lora.B @ lora.A)


@given(n=st.integers(1, 7), k=st.integers(1, 9), seed=seeds)
def test_masked_lora_keeps_the_zeros_and_its_gradient_is_exact(n, k, seed):
    rng = np.random.default_rng(seed)
    keep = rng.random((n, k)) < 0.5
    lora = LoRA(rng.standard_normal((n, k)) * keep, 1, keep=keep, rng=rng)
    perturb(lora, rng)
    assert not lora.merged()[~keep].any()
    upstream = rng.standard_normal((n, k))
    grads = lora.backward(upstream)
    directional_check(lora, lambda: float(np.sum(upstream * lora.effective())), grads, rng)


# -- PST -------------------------------------------------------------------------------------

def make_pst(rng, n, k, rank, pattern, **kwargs):
    return PST(rng.standard_normal((n, k)), pattern, rank, rng=rng, **kwargs)


@given(n=st.integers(2, 6), groups=st.integers(1, 3), rank=st.integers(1, 3),
       structured=st.booleans(), alphas=st.tuples(st.floats(0.5, 2), st.floats(0.5, 2),
                                                  st.floats(0.5, 2)), seed=seeds)
def test_pst_gradient_product_part_and_straight_through_part(n, groups, rank, structured, alphas,
                                                             seed):
    rng = np.random.default_rng(seed)
    k = 4 * groups
    rank = min(rank, n)
    pattern = Pattern.nm(2, 4) if structured else Pattern(0.5)
    alpha1, alpha2, beta = alphas
    pst = make_pst(rng, n, k, rank, pattern, alpha1=alpha1, alpha2=alpha2, beta=beta)
    perturb(pst, rng)
    weff = pst.effective(5, 10)  # mid-ramp
    mask = pst.mask.copy()
    np.testing.assert_array_equal(weff, pst.weight() * mask)
    upstream = rng.standard_normal((n, k))
    grads = pst.backward(upstream)

    # the product part: L = <G, M ⊙ W'(U, V)> with M fixed
    product = {"U": np.zeros_like(pst.U), "V": np.zeros_like(pst.V)}
    d_weight = upstream * mask
    product["U"] = beta * d_weight @ pst.V.T
    product["V"] = beta * pst.U.T @ d_weight
    directional_check(pst, lambda: float(np.sum(upstream * mask * pst.weight())), product, rng,
                      names=["U", "V"])

    # the straight-through part: dL/dS = G ⊙ W' (closed form), pushed through S(U, V, A, B, R, C)
    d_score = upstream * pst.weight()
    through = {name: grads[name] - product.get(name, 0) for name in grads}
    directional_check(pst, lambda: float(np.sum(d_score * pst.score(pst.weight()))), through, rng)


def test_pst_straight_through_closed_form():
    """dL/dW' = G ⊙ (M + |W'|), read off through U (with V's gradient as its witness)."""
    rng = np.random.default_rng(3)
    pst = make_pst(rng, 5, 8, 2, Pattern(0.5), beta=1.0)
    perturb(pst, rng)
    pst.effective(9, 10)
    upstream = rng.standard_normal((5, 8))
    d_weight = upstream * (pst.mask + np.abs(pst.weight()))
    np.testing.assert_allclose(pst.backward(upstream)["V"], pst.U.T @ d_weight, rtol=1e-12)


@given(n=st.integers(1, 9), groups=st.integers(1, 4), sparsity=st.floats(0, 0.95),
       nm=st.sampled_from([None, (2, 4), (1, 4), (4, 8)]), seed=seeds)
def test_pst_final_mask_is_exact_and_merged_equals_the_factorised_weight(n, groups, sparsity, nm,
                                                                        seed):
    rng = np.random.default_rng(seed)
    pattern = Pattern.nm(*nm) if nm else Pattern(sparsity)
    k = 8 * groups
    pst = make_pst(rng, n, k, 1, pattern)
    perturb(pst, rng)
    mask = pst.final_mask()
    if nm:
        assert check_nm(mask, *nm)
    else:
        assert int((~mask).sum()) == int(sparsity * n * k)
    merged = pst.merged()
    factorised = (pst.base + pst.beta * pst.U @ pst.V) * mask
    np.testing.assert_array_equal(merged, factorised)
    np.testing.assert_array_equal(pst.effective(20, 20), merged)  # the last step is the final


def test_pst_starts_dense_at_the_base_weight_and_counts_its_parameters():
    rng = np.random.default_rng(0)
    pst = make_pst(rng, 6, 8, 2, Pattern(0.5))
    np.testing.assert_array_equal(pst.effective(0, 10), pst.base)  # V = 0, s_i = 0
    assert pst.trainable_count() == (2 * 2 + 1) * (6 + 8)


def test_pst_mask_ramps_with_the_schedule():
    rng = np.random.default_rng(1)
    pst = make_pst(rng, 16, 32, 2, Pattern(0.75))
    pruned = []
    for step in range(21):
        pst.effective(step, 20)
        pruned.append(int((~pst.mask).sum()))
    assert pruned[0] == 0 and pruned[-1] == int(0.75 * 16 * 32)
    assert pruned == sorted(pruned)


def test_pst_same_seed_same_arrays():
    w = np.random.default_rng(5).standard_normal((6, 8))
    a = PST(w, Pattern(0.5), 2, rng=np.random.default_rng(7))
    b = PST(w, Pattern(0.5), 2, rng=np.random.default_rng(7))
    c = PST(w, Pattern(0.5), 2, rng=np.random.default_rng(8))
    for name, p in a.params().items():
        np.testing.assert_array_equal(p, b.params()[name])
    assert not np.array_equal(a.U, c.U)


# -- SaRA ------------------------------------------------------------------------------------

@given(n=st.integers(1, 8), k=st.integers(1, 10), fraction=st.floats(0.01, 0.99),
       pruned=st.booleans(), seed=seeds)
def test_sara_selects_the_smallest_and_keeps_state_for_them_only(n, k, fraction, pruned, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k))
    keep = rng.random((n, k)) < 0.5 if pruned else None
    if pruned:
        w *= keep
    sara = SaRA(w, fraction, keep)
    kept = int(keep.sum()) if pruned else n * k
    count = int(fraction * kept)
    # structure first: sorted, in range, the count, inside the kept entries
    assert sara.index.dtype == np.int32 and len(sara.index) == count
    assert np.all(np.diff(sara.index) > 0) and np.all((sara.index >= 0) & (sara.index < n * k))
    if pruned:
        assert np.all(keep.ravel()[sara.index])
    # then values: no unselected kept entry is smaller than a selected one
    magnitude = np.abs(w).ravel()
    others = np.ones(n * k, bool)
    others[sara.index] = False
    if pruned:
        others &= keep.ravel()
    if count and others.any():
        assert magnitude[sara.index].max() <= magnitude[others].min()
    optimizer = AdamW(sara.params(), None, AdamWSettings(lr=1e-2))
    assert {a.shape for a in optimizer.exp_avg.values()} == {(count,)}
    assert sara.trainable_count() == count


@given(n=st.integers(1, 6), k=st.integers(1, 8), seed=seeds)
def test_sara_gradient_equals_finite_differences_and_merges(n, k, seed):
    rng = np.random.default_rng(seed)
    sara = SaRA(rng.standard_normal((n, k)), 0.5)
    np.testing.assert_array_equal(sara.effective(), sara.base)
    perturb(sara, rng)
    upstream = rng.standard_normal((n, k))
    grads = sara.backward(upstream)
    directional_check(sara, lambda: float(np.sum(upstream * sara.effective())), grads, rng)
    expected = sara.base.copy().ravel()
    expected[sara.index] += sara.delta
    np.testing.assert_array_equal(sara.merged().ravel(), expected)
    outside = np.ones(n * k, bool)
    outside[sara.index] = False
    np.testing.assert_array_equal(sara.merged().ravel()[outside], sara.base.ravel()[outside])


@given(n=st.integers(2, 7), k=st.integers(2, 7), seed=seeds)
def test_nuclear_norm_subgradient_equals_finite_differences(n, k, seed):
    rng = np.random.default_rng(seed)
    # distinct, well-separated singular values: the norm is differentiable there
    q = min(n, k)
    u, _ = np.linalg.qr(rng.standard_normal((n, q)))
    v, _ = np.linalg.qr(rng.standard_normal((k, q)))
    x = u @ np.diag(np.arange(1, q + 1, dtype=float)) @ v.T
    value, grad = nuclear_norm_subgradient(x)
    assert value == pytest.approx(q * (q + 1) / 2)
    d = rng.standard_normal((n, k))

    def norm(m):
        return np.linalg.svd(m, compute_uv=False).sum()

    numeric = (norm(x + EPS * d) - norm(x - EPS * d)) / (2 * EPS)
    assert float(np.sum(grad * d)) == pytest.approx(numeric, rel=1e-6)
    assert nuclear_norm_subgradient(np.zeros((n, k)))[0] == 0.0


def test_sara_nuclear_penalty_is_the_update_norm_at_the_selected_entries():
    rng = np.random.default_rng(2)
    sara = SaRA(rng.standard_normal((6, 5)), 0.5)
    assert sara.nuclear_penalty(1e-3)[0] == 0.0 and not sara.nuclear_penalty(1e-3)[1].any()
    sara.delta[...] = rng.standard_normal(sara.delta.shape)
    value, grad = sara.nuclear_penalty(0.5)
    full_value, full_grad = nuclear_norm_subgradient(sara.update())
    assert value == pytest.approx(0.5 * full_value)
    np.testing.assert_allclose(grad, 0.5 * full_grad.ravel()[sara.index])


def test_sara_reselection_freezes_the_grown_entries_and_keeps_the_merged_weight():
    rng = np.random.default_rng(4)
    sara = SaRA(rng.standard_normal((8, 8)), 0.25)
    before = len(sara.index)
    sara.delta[::2] = 10.0  # half the selected entries grow far past the threshold
    merged = sara.merged()
    frozen = sara.reselect()
    assert frozen == (before + 1) // 2 and len(sara.index) == before - frozen
    assert len(sara.delta) == len(sara.index) and sara.threshold > 0
    np.testing.assert_array_equal(sara.merged(), merged)  # nothing moved, only froze
    assert sara.reselect() == 0  # the rest are still below the threshold


def test_sara_same_inputs_same_selection():
    w = np.random.default_rng(6).standard_normal((10, 12)).astype(np.float32)
    a, b = SaRA(w, 0.1), SaRA(w, 0.1)
    np.testing.assert_array_equal(a.index, b.index)
    assert a.delta.dtype == np.float32


@given(final=st.floats(0.05, 0.95), total=st.integers(1, 60))
def test_a_schedule_fits_a_run_exactly_when_its_last_step_trains_at_the_final_sparsity(final,
                                                                                        total):
    schedule = SparsitySchedule(final)
    if schedule.at(total - 1, total) == final:
        schedule.check_fits(total)
        return
    with pytest.raises(NpsparseError, match=f"{total} steps never train") as error:
        schedule.check_fits(total)
    shortest = int(str(error.value).rsplit(" ", 1)[1])
    assert shortest > total and schedule.at(shortest - 1, shortest) == final
    assert all(schedule.at(t - 1, t) != final for t in range(total, shortest))
