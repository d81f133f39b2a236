"""PESC blocks in the LLaMA body (issue 16): config, gradients, decode, step 0, ties."""

import json

import numpy as np
import pytest
from helpers import (check_directional_derivative, loss_with_values, random_weights, tiny_config,
                     tiny_model)

from npsparse.config import ModelConfig, PescConfig
from npsparse.errors import NpsparseError
from npsparse.io.weights import DictWeights
from npsparse.models import build_model
from npsparse.train import LossWeights, loss_and_grads, parameters
from npsparse.train.pesc import pesc_names, pesc_tensors, with_pesc

PESC = PescConfig(experts=4, top_k=2, adapter_dim=3, scale=0.25)


def pesc64(seed=0):
    """The tiny llama with PESC blocks in float64, every array random (the adapters' up too)."""
    config = tiny_config("llama", pesc=PESC)
    return build_model(config, DictWeights(random_weights(config, seed), dtype=np.float64))


def test_config_json_records_the_structure_and_reads_it_back():
    config = tiny_config("llama", pesc=PESC)
    hf = json.loads(config.to_json())
    assert hf["npsparse_pesc"] == {"experts": 4, "top_k": 2, "adapter_dim": 3, "scale": 0.25}
    assert ModelConfig.from_hf(hf) == config
    assert "npsparse_pesc" not in json.loads(tiny_config("llama").to_json())
    hf["npsparse_pesc"]["top_k"] = 5
    with pytest.raises(NpsparseError, match="top-k 5 is more than the 4 experts"):
        ModelConfig.from_hf(hf)


def test_whole_model_gradients_match_central_differences_with_the_balance_loss():
    model = pesc64()
    params = parameters(model)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 12)
    losses = LossWeights(ce=1.0, balance=0.3)
    terms, grads = loss_and_grads(model, ids, losses)
    assert terms["balance"] > 0 and terms["loss"] == pytest.approx(
        terms["ce"] + 0.3 * terms["balance"])
    loss_at = loss_with_values(model, params, ids, losses, None)
    moe = pesc_names(model)
    assert len(moe) == 3 * model.config.n_layers and set(moe) <= set(grads)
    rng = np.random.default_rng(2)
    for subset in (moe, list(params)):  # routers and adapters alone, then every array
        check_directional_derivative(loss_at, params, grads, subset, rng)


def test_the_balance_loss_moves_the_routers_but_not_the_last_blocks_adapters():
    """The last block's logits come before its adapters; earlier adapters feed later routers."""
    model = pesc64()
    ids = np.arange(10)
    _, without = loss_and_grads(model, ids, LossWeights(ce=1.0))
    _, with_balance = loss_and_grads(model, ids, LossWeights(ce=1.0, balance=0.5))
    for i in (0, 1):
        router = f"model.layers.{i}.mlp.router.weight"
        assert not np.allclose(without[router], with_balance[router])
    for name in ("down", "up"):
        np.testing.assert_array_equal(without[f"model.layers.1.mlp.adapters.{name}"],
                                      with_balance[f"model.layers.1.mlp.adapters.{name}"])
    assert not np.allclose(without["model.layers.0.mlp.adapters.up"],
                           with_balance["model.layers.0.mlp.adapters.up"])


def test_step_zero_equals_the_base_model_bit_for_bit_and_the_seed_fixes_the_draw():
    base = tiny_model("llama")
    ids = np.arange(20) % base.config.vocab_size
    before = base.forward(ids)
    model = with_pesc(base, PESC, seed=3)
    assert model.config.pesc == PESC and all(b.moe is not None for b in model.blocks)
    assert model.blocks[0].linears["mlp.up_proj"].weight is base.blocks[0].linears[
        "mlp.up_proj"].weight  # the base arrays are shared, not copied
    np.testing.assert_array_equal(model.forward(ids), before)
    again, other = pesc_tensors(base, PESC, 3), pesc_tensors(base, PESC, 4)
    for name, array in pesc_tensors(base, PESC, 3).items():
        np.testing.assert_array_equal(array, again[name])
    assert not np.array_equal(again["model.layers.1.mlp.router.weight"],
                              other["model.layers.1.mlp.router.weight"])
    with pytest.raises(NpsparseError, match="PESC experts already"):
        with_pesc(model, PESC, seed=3)


def test_one_token_decode_equals_the_body():
    model = tiny_model("llama", pesc=PESC)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 9)
    body = model.forward(ids)  # [T, V], no cache: the body
    cache = model.new_cache(16)
    model.forward(ids[:4], cache)
    steps = [model.forward(ids[t:t + 1], cache)[0] for t in range(4, 9)]  # the decode path
    np.testing.assert_allclose(np.stack(steps), body[4:], rtol=1e-4, atol=1e-5)


def test_tied_router_logits_choose_the_lowest_experts_with_equal_gates():
    model = tiny_model("llama", pesc=PESC)
    block = model.blocks[0]
    block.moe.router[...] = 0  # every logit ties
    tape = {}
    block(model.embed(np.arange(6), 0), tape=tape)
    np.testing.assert_array_equal(tape["moe"]["chosen"], np.tile([0, 1], (6, 1)))
    np.testing.assert_array_equal(tape["moe"]["gates"], np.full((6, 2), 0.5, np.float32))


def test_one_token_runs_only_the_chosen_experts_adapters():
    model = tiny_model("llama", pesc=PESC)
    block, tape = model.blocks[0], {}
    block.moe(np.ones((1, 32), np.float32), np.ones((1, 32), np.float32), tape)
    ran = [e for e, pre in enumerate(tape["pre"]) if pre is not None]
    assert ran == sorted(tape["chosen"][0].tolist()) and len(ran) == PESC.top_k
