"""Training Monarch layers: the factors' gradients through a whole model.

The factor gradients are checked twice in float64: against central finite differences through
the whole model (every parameter at once, Monarch and dense layers mixed), and against the other
route to them, the engine's ``dL/dW`` of a dense model holding ``W = to_dense()`` pushed through
``to_dense`` by the chain rule.
"""

import numpy as np
import pytest
from helpers import random_weights, tiny_config

from npsparse.io.weights import DictWeights
from npsparse.linear import DenseLinear
from npsparse.models import build_model
from npsparse.monarch import project
from npsparse.train import LossWeights, hidden_states, loss_and_grads, parameters
from npsparse.train.engine import head_of

# (layer, b): MLP layers with 2 blocks, attention with 4 (k/v are 16 x 32: b^2 = 16 divides 16)
CHOSEN = {"model.layers.0.mlp.up_proj": 2, "model.layers.0.mlp.down_proj": 2,
          "model.layers.1.mlp.gate_proj": 2, "model.layers.1.self_attn.k_proj": 4,
          "model.layers.1.self_attn.o_proj": 4}


def model64(seed=0):
    config = tiny_config("llama")
    return build_model(config, DictWeights(random_weights(config, seed), dtype=np.float64))


def monarch64(seed=0):
    """The tiny float64 model with the CHOSEN layers projected onto float64 Monarch copies."""
    model = model64(seed)
    for name, b in CHOSEN.items():
        weight = model.linears()[name].to_dense()  # [N, K] float64
        model.set_linear(name, project(weight, b).trainable_copy(np.float64))
    return model


def test_parameters_name_the_factors_as_a_packed_folder_does():
    model = monarch64()
    params = parameters(model)
    for name, b in CHOSEN.items():
        assert f"{name}.weight" not in params
        layer = model.linears()[name]
        assert params[f"{name}.weight::right"] is layer.arrays["right"]  # live, not a copy
        assert params[f"{name}.weight::left"].dtype == np.float64
        assert params[f"{name}.weight::right"].shape[0] == b
    assert "model.layers.0.self_attn.q_proj.weight" in params


@pytest.mark.parametrize("loss", ["ce", "ce+squarehead"])
def test_whole_model_gradient_with_monarch_layers_equals_finite_differences(loss):
    """Every parameter at once (factors, dense weights, norms, embedding), float64."""
    rng = np.random.default_rng(3)
    student, teacher = monarch64(), model64()
    params = parameters(student)
    losses = LossWeights.parse(loss)
    ids = rng.integers(0, student.config.vocab_size, 10)
    t_out, t_h = hidden_states(teacher, ids)
    teacher_view = (t_out, t_h, head_of(teacher))

    def loss_at(values):
        saved = {n: p.copy() for n, p in params.items()}
        for n, value in values.items():
            params[n][...] = value
        try:
            terms, _ = loss_and_grads(student, ids, losses, teacher=teacher_view, trainable=())
            return terms["loss"]
        finally:
            for n, value in saved.items():
                params[n][...] = value

    terms, grads = loss_and_grads(student, ids, losses, teacher=teacher_view)
    assert set(grads) == set(params)
    factors = [n for n in params if "::" in n]
    assert len(factors) == 2 * len(CHOSEN)
    for subset in (factors, list(params)):  # the factors alone, then everything
        for _ in range(2):
            direction = {n: rng.standard_normal(params[n].shape) for n in subset}
            eps = 1e-6
            plus = loss_at({n: params[n] + eps * d for n, d in direction.items()})
            minus = loss_at({n: params[n] - eps * d for n, d in direction.items()})
            analytic = sum(float(np.sum(grads[n] * d)) for n, d in direction.items())
            assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def chain_rule(d_weight, right, left):
    """dL/dR and dL/dL from dL/dW, W[o b + l, k p + i] = sum_j L[l, o, k r + j] R[k, j b + l, i]."""
    b, q, p = right.shape
    s, r = left.shape[1], q // b
    g4 = d_weight.reshape(s, b, b, p)  # [o, l, k, i]
    left4 = left.reshape(b, s, b, r)  # [l, o, k, j]
    right4 = right.reshape(b, r, b, p)  # [k, j, l, i]
    d_left = np.einsum("olki,kjli->lokj", g4, right4).reshape(left.shape)
    d_right = np.einsum("olki,lokj->kjli", g4, left4).reshape(right.shape)
    return d_right, d_left


def test_factor_gradients_equal_the_chain_rule_through_to_dense():
    """The route not taken (dense W_eff, then the chain rule) gives the same gradients."""
    rng = np.random.default_rng(4)
    student, teacher = monarch64(), model64()
    dense = model64()
    for name in CHOSEN:
        dense.set_linear(name, DenseLinear(student.linears()[name].to_dense()))
    ids = rng.integers(0, student.config.vocab_size, 10)
    t_out, t_h = hidden_states(teacher, ids)
    losses = LossWeights.parse("ce+squarehead")
    view = (t_out, t_h, head_of(teacher))
    terms, grads = loss_and_grads(student, ids, losses, teacher=view)
    dense_terms, dense_grads = loss_and_grads(dense, ids, losses, teacher=view)
    assert terms["loss"] == pytest.approx(dense_terms["loss"], rel=1e-12)
    for name in CHOSEN:
        layer = student.linears()[name]
        d_right, d_left = chain_rule(dense_grads.pop(f"{name}.weight"), *layer.factors())
        np.testing.assert_allclose(grads.pop(f"{name}.weight::right"), d_right, rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(grads.pop(f"{name}.weight::left"), d_left, rtol=1e-9,
                                   atol=1e-12)
    assert set(grads) == set(dense_grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, dense_grads[name], rtol=1e-9, atol=1e-12)
