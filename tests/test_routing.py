"""PESC routing (npsparse.routing): a naive loop as the spec, gates, ties, gradients, balance loss.

The gradient checks run in float64 with central differences along a random direction, as in
tests/test_backward.py. The top-k choice is piecewise constant, so every case first checks that
the perturbations do not change which experts are chosen.
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npsparse.errors import NpsparseError
from npsparse.routing import (balance_loss, balance_loss_backward, check_routing, expert_load,
                              group_by_expert, pesc_backward, pesc_forward, route)

EPS = 1e-6
seeds = st.integers(0, 2**32 - 1)
few = settings(deadline=None, max_examples=25)


def random_layer(rng, n_tok, dim, n_experts, rank, dtype=np.float64):
    """h, f [T, D], router [E, D], down [E, R, D], up [E, D, R], all nonzero."""
    return (rng.standard_normal((n_tok, dim)).astype(dtype),
            rng.standard_normal((n_tok, dim)).astype(dtype),
            rng.standard_normal((n_experts, dim)).astype(dtype),
            (0.5 * rng.standard_normal((n_experts, rank, dim))).astype(dtype),
            (0.5 * rng.standard_normal((n_experts, dim, rank))).astype(dtype))


def naive_pesc(h, f, router, down, up, k, scale):
    """Token by token, slot by slot: sum_j g_j (F + s U_e gelu(D_e F)), with the exact GELU."""
    n_tok, dim = f.shape
    n_experts = router.shape[0]
    y = np.zeros((n_tok, dim))
    for t in range(n_tok):
        z = [float(np.dot(router[e], h[t])) for e in range(n_experts)]
        chosen = sorted(range(n_experts), key=lambda e: (-z[e], e))[:k]
        top = max(z[e] for e in chosen)
        weights = [math.exp(z[e] - top) for e in chosen]
        for e, w in zip(chosen, weights):
            pre = down[e] @ f[t]  # [R]
            act = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in pre])
            y[t] += (w / sum(weights)) * (f[t] + scale * (up[e] @ act))
    return y


def topk_gap(logits, k):
    """Smallest gap between the k-th and the (k+1)-th logit of any token (inf when k == E)."""
    if k == logits.shape[1]:
        return math.inf
    ordered = -np.sort(-logits, axis=1)
    return float(np.min(ordered[:, k - 1] - ordered[:, k]))


# ----------------------------------------------------------------------------- forward


@few
@given(n_tok=st.integers(1, 7), dim=st.integers(1, 8), n_experts=st.integers(1, 6),
       rank=st.integers(1, 4), k_wanted=st.integers(1, 6), starve=st.booleans(),
       scale=st.sampled_from([1.0, 0.25, 2.0]), seed=seeds)
def test_pesc_forward_equals_a_naive_loop(n_tok, dim, n_experts, rank, k_wanted, starve, scale,
                                          seed):
    k = min(k_wanted, n_experts)  # often k == E
    rng = np.random.default_rng(seed)
    h, f, router, down, up = random_layer(rng, n_tok, dim, n_experts, rank)
    if starve and k < n_experts:  # the last expert's logit is about -100: no token picks it
        h[:, 0] = 10.0
        router[-1, 0] = -10.0
    tape = {}
    y = pesc_forward(h, f, router, down, up, k, scale, tape)
    assert y.shape == (n_tok, dim) and y.dtype == np.float64
    np.testing.assert_allclose(y, naive_pesc(h, f, router, down, up, k, scale), rtol=1e-10,
                               atol=1e-12)
    if starve and k < n_experts:
        tokens, slots = tape["groups"][-1]
        assert tokens.size == 0 and slots.size == 0


def test_pesc_forward_keeps_float32():
    rng = np.random.default_rng(0)
    layer = random_layer(rng, 5, 8, 4, 2, dtype=np.float32)
    y = pesc_forward(*layer, 2)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, naive_pesc(*layer, 2, 1.0), rtol=1e-4, atol=1e-5)


@few
@given(n_tok=st.integers(1, 6), n_experts=st.integers(1, 5), k_wanted=st.integers(1, 5),
       seed=seeds)
def test_zero_up_projections_give_the_ffn_output_exactly(n_tok, n_experts, k_wanted, seed):
    rng = np.random.default_rng(seed)
    h, f, router, down, up = random_layer(rng, n_tok, 6, n_experts, 3)
    for dtype in (np.float64, np.float32):
        args = [a.astype(dtype) for a in (h, f, router, down, np.zeros_like(up))]
        y = pesc_forward(*args, min(k_wanted, n_experts), scale=0.7)
        np.testing.assert_array_equal(y, args[1])


# ----------------------------------------------------------------------------- routing


@few
@given(n_tok=st.integers(1, 8), n_experts=st.integers(1, 8), k_wanted=st.integers(1, 8),
       spread=st.sampled_from([0.1, 1.0, 20.0]), seed=seeds)
def test_route_chooses_the_largest_logits_and_gates_sum_to_one(n_tok, n_experts, k_wanted,
                                                               spread, seed):
    k = min(k_wanted, n_experts)
    rng = np.random.default_rng(seed)
    logits = spread * rng.standard_normal((n_tok, n_experts))
    chosen, gates = route(logits, k)
    assert chosen.shape == (n_tok, k) and chosen.dtype == np.int64
    assert gates.shape == (n_tok, k) and gates.dtype == np.float64
    assert np.all((chosen >= 0) & (chosen < n_experts))
    for row in chosen:
        assert len(set(row.tolist())) == k
    picked = np.take_along_axis(logits, chosen, axis=1)  # [T, k]
    assert np.all(np.diff(picked, axis=1) <= 0)  # by decreasing logit
    assert np.all(picked[:, -1:] >= np.sort(logits, axis=1)[:, n_experts - k:n_experts - k + 1])
    assert np.all(gates > 0)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(np.diff(gates, axis=1) <= 0)


def test_ties_choose_the_lower_expert_index_every_time():
    logits = np.array([[1.0, 3.0, 3.0, 3.0, 0.0],
                       [2.0, 2.0, 2.0, 2.0, 2.0],
                       [0.0, 5.0, 0.0, 5.0, 0.0],
                       [-1.0, -1.0, -2.0, -1.0, -1.0]])
    chosen, gates = route(logits, 2)
    np.testing.assert_array_equal(chosen, [[1, 2], [0, 1], [1, 3], [0, 1]])
    np.testing.assert_array_equal(gates, 0.5)
    chosen3, _ = route(logits, 3)
    np.testing.assert_array_equal(chosen3, [[1, 2, 3], [0, 1, 2], [1, 3, 0], [0, 1, 3]])
    for _ in range(3):
        np.testing.assert_array_equal(route(logits.copy(), 3)[0], chosen3)
    same, _ = route(logits.astype(np.float32), 3)
    np.testing.assert_array_equal(same, chosen3)


@few
@given(n_tok=st.integers(1, 9), n_experts=st.integers(1, 6), k_wanted=st.integers(1, 6),
       seed=seeds)
def test_group_by_expert_serves_every_pair_once(n_tok, n_experts, k_wanted, seed):
    k = min(k_wanted, n_experts)
    rng = np.random.default_rng(seed)
    chosen, _ = route(rng.standard_normal((n_tok, n_experts)), k)
    groups = group_by_expert(chosen, n_experts)
    assert len(groups) == n_experts
    seen = set()
    for e, (tokens, slots) in enumerate(groups):
        assert tokens.dtype == np.int64 and slots.dtype == np.int64
        assert np.all(np.diff(tokens) > 0)  # in token order, each token once
        assert np.all(chosen[tokens, slots] == e)
        seen.update(zip(tokens.tolist(), slots.tolist()))
    assert len(seen) == n_tok * k
    load = expert_load(chosen, n_experts)
    assert load.shape == (n_experts,) and load.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(load, [len(t) / (n_tok * k) for t, _ in groups])


# ----------------------------------------------------------------------------- gradients


def directional(loss, inputs, grads, rng):
    """<grad, v> against the central difference of loss along a random v, for each input."""
    for name in inputs:
        v = rng.standard_normal(inputs[name].shape)
        plus = dict(inputs, **{name: inputs[name] + EPS * v})
        minus = dict(inputs, **{name: inputs[name] - EPS * v})
        numeric = (loss(**plus) - loss(**minus)) / (2 * EPS)
        assert np.sum(grads[name] * v) == pytest.approx(numeric, rel=1e-6, abs=1e-8), name


@few
@given(n_tok=st.integers(1, 6), dim=st.integers(1, 6), n_experts=st.integers(1, 5),
       rank=st.integers(1, 3), k_wanted=st.integers(1, 5), alpha=st.sampled_from([0.0, 0.3]),
       scale=st.sampled_from([1.0, 0.25]), seed=seeds)
def test_pesc_and_balance_gradients_match_finite_differences(n_tok, dim, n_experts, rank,
                                                             k_wanted, alpha, scale, seed):
    k = min(k_wanted, n_experts)
    rng = np.random.default_rng(seed)
    h, f, router, down, up = random_layer(rng, n_tok, dim, n_experts, rank)
    out_weight = rng.standard_normal((n_tok, dim))
    base_logits = h @ router.T
    assume(topk_gap(base_logits, k) > 1e-3)  # no choice flips within EPS
    base_chosen, _ = route(base_logits, k)

    def loss(h, f, router, down, up):
        tape = {}
        y = pesc_forward(h, f, router, down, up, k, scale, tape)
        np.testing.assert_array_equal(tape["chosen"], base_chosen)
        return np.sum(out_weight * y) + balance_loss(tape["logits"], tape["chosen"], alpha)

    tape = {}
    pesc_forward(h, f, router, down, up, k, scale, tape)
    d_logits = balance_loss_backward(tape["logits"], tape["chosen"], alpha)
    d_h, d_f, grads = pesc_backward(out_weight, tape, d_logits=d_logits)
    assert d_h.shape == h.shape and d_f.shape == f.shape
    assert grads["router"].shape == router.shape
    assert grads["down"].shape == down.shape and grads["up"].shape == up.shape
    directional(loss, dict(h=h, f=f, router=router, down=down, up=up),
                dict(h=d_h, f=d_f, **grads), rng)


def test_balance_loss_gradient_alone_reaches_router_and_input():
    rng = np.random.default_rng(3)
    h, f, router, down, up = random_layer(rng, 8, 5, 4, 2)
    k, alpha = 2, 0.7
    base_chosen, _ = route(h @ router.T, k)
    assert topk_gap(h @ router.T, k) > 1e-3

    def loss(h, router):
        logits = h @ router.T
        chosen, _ = route(logits, k)
        np.testing.assert_array_equal(chosen, base_chosen)
        return balance_loss(logits, chosen, alpha)

    tape = {}
    pesc_forward(h, f, router, down, up, k, tape=tape)
    d_logits = balance_loss_backward(tape["logits"], tape["chosen"], alpha)
    d_h, d_f, grads = pesc_backward(np.zeros_like(f), tape, d_logits=d_logits)
    assert np.abs(d_h).max() > 0 and np.abs(grads["router"]).max() > 0
    assert not np.any(d_f) and not np.any(grads["down"]) and not np.any(grads["up"])
    directional(loss, dict(h=h, router=router), dict(h=d_h, router=grads["router"]), rng)


# ----------------------------------------------------------------------------- balance loss


def test_balance_loss_is_alpha_for_uniform_routing():
    n_experts, alpha = 4, 0.01
    chosen = np.array([[0, 1], [2, 3], [1, 0], [3, 2]])  # every expert twice of 8 pairs
    np.testing.assert_array_equal(expert_load(chosen, n_experts), 0.25)
    assert balance_loss(np.zeros((4, n_experts)), chosen, alpha) == pytest.approx(alpha, rel=1e-14)
    rng = np.random.default_rng(0)  # balanced f: any P gives alpha, since sum(P) == 1
    logits = rng.standard_normal((4, n_experts))
    assert balance_loss(logits, chosen, alpha) == pytest.approx(alpha, rel=1e-12)


def test_balance_loss_is_larger_for_collapsed_routing_and_varies():
    n_experts, alpha = 4, 0.01
    logits = np.tile([3.0, 0.0, -1.0, 0.5], (6, 1))  # every token prefers expert 0
    chosen, _ = route(logits, 1)
    assert np.all(chosen == 0)
    collapsed = balance_loss(logits, chosen, alpha)
    assert collapsed > 2 * alpha
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert collapsed == pytest.approx(alpha * n_experts * probs[0], rel=1e-12)
    rng = np.random.default_rng(1)
    values = set()
    for _ in range(5):  # the pre-fix copy in the reference returns one constant
        logits = rng.standard_normal((6, n_experts))
        values.add(round(balance_loss(logits, route(logits, 2)[0], alpha), 12))
    assert len(values) == 5


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("experts, top_k, adapter_dim, message", [
    (0, 1, 4, "the number of experts must be at least 1, not 0"),
    (-2, 1, 4, "the number of experts must be at least 1, not -2"),
    (4, 0, 4, "top-k must be at least 1, not 0"),
    (2, 3, 4, "top-k 3 is more than the 2 experts"),
    (4, 2, 0, "the adapter dimension must be at least 1, not 0"),
])
def test_check_routing_names_the_problem_in_one_line(experts, top_k, adapter_dim, message):
    with pytest.raises(NpsparseError) as error:
        check_routing(experts, top_k, adapter_dim)
    assert str(error.value) == message
    assert "\n" not in str(error.value)


def test_check_routing_accepts_k_equal_to_experts_and_route_checks_k():
    check_routing(8, 8, 1)
    with pytest.raises(NpsparseError, match="top-k 3 is more than the 2 experts"):
        route(np.zeros((1, 2)), 3)
    rng = np.random.default_rng(0)
    with pytest.raises(NpsparseError, match="adapter dimension"):
        h, f, router, down, up = random_layer(rng, 2, 3, 2, 1)
        pesc_forward(h, f, router, down[:, :0], up[:, :, :0], 1)
