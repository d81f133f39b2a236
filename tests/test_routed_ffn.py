"""SPT's routed FFN (issue 16): dispatch vs a loop, ties, the dense limit, gradients, decode."""

import json

import numpy as np
import pytest
from helpers import (check_directional_derivative, loss_with_values, random_weights, tiny_config,
                     tiny_model)

from npsparse.config import ModelConfig, RoutedFfnConfig
from npsparse.errors import NpsparseError
from npsparse.ffn_routing import (check_blocks, oracle_blocks, route_blocks, routed_ffn_backward,
                                  routed_ffn_forward, routed_ffn_loop)
from npsparse.io.weights import DictWeights
from npsparse.models import build_model
from npsparse.train import LossWeights, loss_and_grads, parameters

ROUTED = RoutedFfnConfig(blocks=4, active=2)  # the tiny llama's F = 48: blocks of 12 units


def arrays(seed=0, t=7, d=6, f=12, b=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, d)).astype(dtype), rng.standard_normal((f, d)).astype(dtype),
            rng.standard_normal((f, d)).astype(dtype), rng.standard_normal((d, f)).astype(dtype),
            rng.standard_normal((b, d)).astype(dtype))


def routed64(seed=0):
    config = tiny_config("llama", routed_ffn=ROUTED)
    return build_model(config, DictWeights(random_weights(config, seed), dtype=np.float64))


@pytest.mark.parametrize("active", [1, 2, 4])
def test_grouped_dispatch_equals_the_per_token_loop(active):
    h, gate, up, down, router = arrays()
    tape = {}
    y = routed_ffn_forward(h, gate, up, down, router, active, tape)
    np.testing.assert_allclose(y, routed_ffn_loop(h, gate, up, down, router, active),
                               rtol=1e-12, atol=1e-12)
    ran = [b for b, kept in enumerate(tape["kept"]) if kept is not None]
    assert ran == sorted(set(tape["chosen"].ravel().tolist()))


def test_ties_go_to_the_lower_block_and_one_token_reads_only_its_blocks():
    chosen, weights, _ = route_blocks(np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 2)
    np.testing.assert_array_equal(chosen, [[1, 2], [0, 1]])
    np.testing.assert_allclose(weights[1], [1.0, 1.0])  # uniform router: weight 1 per block
    h, gate, up, down, router = arrays(t=1)
    tape = {}
    routed_ffn_forward(h, gate, up, down, router, 2, tape)
    assert sum(kept is not None for kept in tape["kept"]) == 2
    assert oracle_blocks(np.zeros((1, 6)), gate, up, 4, 3).tolist() == [[0, 1, 2]]  # all 0


def test_all_blocks_and_a_zero_router_are_the_dense_ffn():
    dense = tiny_model("llama")
    config = dense.config.replace(routed_ffn=RoutedFfnConfig(blocks=4, active=4))
    tensors = {**dense.state_dict(),
               **{f"model.layers.{i}.mlp.block_router.weight": np.zeros((4, 32), np.float32)
                  for i in range(2)}}
    routed = build_model(config, DictWeights(tensors))
    ids = np.arange(20) % config.vocab_size
    np.testing.assert_allclose(routed.forward(ids), dense.forward(ids), rtol=1e-5, atol=1e-5)


def test_oracle_picks_blocks_by_activation_norm():
    h, gate, up, down, router = arrays(seed=3)
    chosen = oracle_blocks(h, gate, up, 4, 2)
    act = (h @ gate.T) / (1 + np.exp(-(h @ gate.T))) * (h @ up.T)
    norms = np.linalg.norm(act.reshape(7, 4, 3), axis=-1)
    for t in range(7):
        assert set(chosen[t]) == set(np.argsort(-norms[t])[:2])
    y = routed_ffn_forward(h, gate, up, down, router, 2, oracle=True)
    expected = sum(act[:, 3 * b:3 * b + 3] @ down[:, 3 * b:3 * b + 3].T
                   * np.any(chosen == b, axis=1)[:, None] for b in range(4))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_layer_gradients_match_central_differences():
    h, gate, up, down, router = arrays(seed=1)
    d_y = np.random.default_rng(9).standard_normal((7, 6))
    tape = {}
    routed_ffn_forward(h, gate, up, down, router, 2, tape)
    d_h, grads = routed_ffn_backward(d_y, tape)
    inputs = {"h": h, "gate": gate, "up": up, "down": down, "router": router}
    rng = np.random.default_rng(4)
    for name, array in inputs.items():
        direction = rng.standard_normal(array.shape)
        eps = 1e-6

        def loss(sign):
            moved = {**inputs, name: array + sign * eps * direction}
            return float(np.sum(d_y * routed_ffn_forward(
                moved["h"], moved["gate"], moved["up"], moved["down"], moved["router"], 2)))

        analytic = float(np.sum((d_h if name == "h" else grads[name]) * direction))
        assert analytic == pytest.approx((loss(1) - loss(-1)) / (2 * eps), rel=1e-6), name


def test_whole_model_gradients_match_central_differences_and_reach_the_routers():
    model = routed64()
    params = parameters(model)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 12)
    losses = LossWeights(ce=1.0)
    _, grads = loss_and_grads(model, ids, losses)
    routers = [f"model.layers.{i}.mlp.block_router.weight" for i in range(2)]
    for name in routers:
        assert np.abs(grads[name]).max() > 1e-6
    loss_at = loss_with_values(model, params, ids, losses, None)
    rng = np.random.default_rng(2)
    for subset in (routers, list(params)):
        check_directional_derivative(loss_at, params, grads, subset, rng)


def test_the_balance_loss_reaches_the_routers_and_its_gradients_match_central_differences():
    from npsparse.routing import balance_loss
    from npsparse.train.engine import balance_terms

    model = routed64(seed=3)
    params = parameters(model)
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, 12)
    with_balance, without = LossWeights(ce=1.0, balance=0.5), LossWeights(ce=1.0)
    terms, grads = loss_and_grads(model, ids, with_balance)
    _, plain = loss_and_grads(model, ids, without)
    # the term is Switch's E * sum_i f_i P_i of each layer's routing, summed over layers
    tapes = [{} for _ in model.blocks]
    x = model.embed(ids, 0)
    for block, tape in zip(model.blocks, tapes):
        x = block(x, tape=tape)
    expected = sum(balance_loss(t["routed_ffn"]["logits"], t["routed_ffn"]["chosen"], 1.0)
                   for t in tapes)
    assert terms["balance"] == pytest.approx(expected, rel=1e-12) and expected >= 2.0 - 1e-9
    assert terms["loss"] == pytest.approx(terms["ce"] + 0.5 * expected, rel=1e-12)
    total, d_logits = balance_terms(model, tapes, 0.0, 1.0)
    assert total == 0.0 and d_logits == [None, None]  # alpha 0: no term, no gradients
    routers = [f"model.layers.{i}.mlp.block_router.weight" for i in range(2)]
    for name in routers:  # the balance term changes the routers' gradients only ...
        assert not np.allclose(grads[name], plain[name])
    np.testing.assert_allclose(grads["model.layers.1.mlp.up_proj.weight"],
                               plain["model.layers.1.mlp.up_proj.weight"], rtol=1e-12)
    loss_at = loss_with_values(model, params, ids, with_balance, None)
    rng = np.random.default_rng(6)
    for subset in (routers, list(params)):  # ... but every input below a router feels it
        check_directional_derivative(loss_at, params, grads, subset, rng)


def test_one_token_decode_equals_the_body():
    model = tiny_model("llama", routed_ffn=ROUTED)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 9)
    body = model.forward(ids)
    cache = model.new_cache(16)
    model.forward(ids[:4], cache)
    steps = [model.forward(ids[t:t + 1], cache)[0] for t in range(4, 9)]
    np.testing.assert_allclose(np.stack(steps), body[4:], rtol=1e-4, atol=1e-5)


def test_config_json_records_the_structure_and_checks_it():
    config = tiny_config("llama", routed_ffn=ROUTED)
    hf = json.loads(config.to_json())
    assert hf["npsparse_routed_ffn"] == {"blocks": 4, "active": 2}
    assert ModelConfig.from_hf(hf) == config
    hf["npsparse_routed_ffn"]["blocks"] = 5
    with pytest.raises(NpsparseError, match="5 blocks do not divide the FFN's 48 hidden units"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("blocks,active,message", [
    (0, 1, "at least 1, not 0"), (4, 0, "active blocks must be at least 1"),
    (4, 5, "5 active blocks is more than the 4 blocks"), (5, 1, "do not divide"),
])
def test_bad_settings(blocks, active, message):
    with pytest.raises(NpsparseError, match=message):
        check_blocks(48, blocks, active)


def test_the_oracle_model_and_a_fresh_router_start_near_the_dense_model():
    from npsparse.train.routed_ffn import with_oracle_routing, with_routed_ffn

    dense = tiny_model("llama")
    ids = np.arange(16) % dense.config.vocab_size
    logits = dense.forward(ids)
    every = RoutedFfnConfig(blocks=4, active=4)
    np.testing.assert_allclose(with_oracle_routing(dense, every).forward(ids), logits,
                               rtol=1e-5, atol=1e-5)
    fresh = with_routed_ffn(dense, every, seed=0)  # B * p within a few percent of 1
    tape = {}
    fresh.blocks[0](dense.embed(ids, 0), tape=tape)
    assert np.abs(tape["routed_ffn"]["weights"] - 1).max() < 0.1
    error = np.linalg.norm(fresh.forward(ids) - logits) / np.linalg.norm(logits)
    assert error < 0.05  # measured: 0.028
    half = with_oracle_routing(dense, ROUTED)
    tape = {}
    half.blocks[0](dense.embed(ids, 0), tape=tape)
    assert tape["routed_ffn"] == {}  # forward only: nothing kept, and no backward
    with pytest.raises(NpsparseError, match="forward only"):
        half.blocks[0].backward(np.ones((16, 32), np.float32), tape)
    assert not np.allclose(half.forward(ids), logits)
