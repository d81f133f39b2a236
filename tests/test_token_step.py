"""One compiled call per block in decode (``npsparse.models.llama_token``, issue 13): the same
logits, cache and tokens as the per-block steps in every format with a compiled product, the
per-block path wherever it does not apply, and the kept arguments rebuilt when a layer changes."""

import numpy as np
import pytest
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse.generate import generate
from npsparse.kernels import MonarchLinear, pack
from npsparse.kernels.rowops import silu_mul
from npsparse.kernels.step import read_ticks, step_args, tick_seconds
from npsparse.linear import DenseLinear
from npsparse.models import llama_token
from npsparse.models.llama_token import PRODUCT_TICKS, block_args, silu_mul_row
from npsparse.packing import apply_format

few = settings(deadline=None, max_examples=6)
HEADS = {"dense": "dense", "bf16": "bf16"}  # the head format each block format is tried with


def _pruned(arch, fmt, seed):
    """A tiny model with every block layer pruned (2:4 for nm, else about half, per row
    irregular) and packed as ``fmt``."""
    model = tiny_model(arch, seed)
    rng = np.random.default_rng(seed)
    for name, layer in model.linears().items():
        w = layer.to_dense().copy()
        if fmt == "nm":  # the two largest of every four
            groups = np.abs(w).reshape(w.shape[0], -1, 4)
            keep = np.argsort(np.argsort(groups, axis=2), axis=2) >= 2
            w *= keep.reshape(w.shape)
        else:
            w *= rng.random(w.shape) < 0.5
        model.set_linear(name, DenseLinear(w))
    apply_format(model, fmt, head=HEADS.get(fmt, "q8_0"))
    return model


def _decode_both(model, ids, n_prompt):
    """Logits of each token after the prompt, token step and per-block steps, on two caches."""
    caches = [model.new_cache(len(ids)), model.new_cache(len(ids))]
    for cache in caches:
        model.prefill(ids[:n_prompt], cache)
    out = []
    for t in range(n_prompt, len(ids)):
        ticks = PRODUCT_TICKS[0]
        model.token_step = True
        fast = model.forward(ids[t:t + 1], caches[0])
        took_token_path = PRODUCT_TICKS[0] != ticks
        model.token_step = False
        slow = model.forward(ids[t:t + 1], caches[1])
        out.append((fast, slow, took_token_path))
    del model.token_step
    return out, caches


@few
@pytest.mark.parametrize("fmt", ["dense", "bf16", "panel", "bitmask", "csr", "nm", "qpanel"])
@given(arch=st.sampled_from(["llama", "qwen2"]), seed=st.integers(0, 2**16),
       n_prompt=st.integers(1, 4))
def test_token_step_equals_block_steps(fmt, arch, seed, n_prompt):
    model = _pruned(arch, fmt, seed)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, n_prompt + 4)
    steps, caches = _decode_both(model, ids, n_prompt)
    for fast, slow, took_token_path in steps:
        assert took_token_path  # the compiled path ran (its products were timed)
        assert fast.shape == slow.shape == (1, model.config.vocab_size)
        # same kernels and order; SwiGLU's exp differs by float32 rounding
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max())
    for k_fast, k_slow in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        np.testing.assert_allclose(k_fast, k_slow, rtol=1e-5, atol=1e-6)
    assert caches[0].length == caches[1].length == len(ids)


def test_unstacked_groups_and_greedy_tokens_match():
    """A model whose q/k/v and gate/up are not stacked (dense float32: no arena) runs the groups
    as separate products; greedy generation gives the same tokens either way."""
    model = tiny_model("llama", 3)
    assert not any(block.fused for block in model.blocks)
    args = block_args(model.blocks[0])
    assert len(args[2]) == 3 and len(args[7]) == 2  # q, k, v and gate, up one by one
    tokens = {}
    for flag in (True, False):
        model.token_step = flag
        tokens[flag] = generate(model, [5, 7, 11], 12, adapt_threads=False).ids
    assert tokens[True] == tokens[False]


def test_blocks_without_a_compiled_path_run_the_block_steps():
    """A Monarch layer (no compiled product) or top-L attention on any block: no token step,
    and forward still gives the per-block logits."""
    model = tiny_model("llama", 1)
    model.set_linear("model.layers.1.mlp.down_proj",
                     MonarchLinear.pack(model.linears()["model.layers.1.mlp.down_proj"]
                                        .to_dense(), blocks=4))
    assert block_args(model.blocks[0]) is not None and block_args(model.blocks[1]) is None
    cache = model.new_cache(8)
    model.prefill(np.array([1, 2]), cache)
    assert llama_token.decode_token(model, np.array([3]), 2, cache) is None
    assert cache.length == 2  # nothing written
    reference = tiny_model("llama", 1)
    reference.set_linear("model.layers.1.mlp.down_proj",
                         model.linears()["model.layers.1.mlp.down_proj"])
    reference.token_step = False
    ref_cache = reference.new_cache(8)
    reference.prefill(np.array([1, 2]), ref_cache)
    np.testing.assert_array_equal(model.forward(np.array([3]), cache),
                                  reference.forward(np.array([3]), ref_cache))


def test_kept_arguments_follow_a_replaced_layer():
    """The block's kept step arguments are rebuilt when a layer object is replaced, so decode
    never runs a stale weight."""
    model = _pruned("llama", "bf16", 4)
    ids = np.array([3, 1, 4, 1, 5])
    cache = model.new_cache(8)
    model.prefill(ids[:3], cache)
    model.forward(ids[3:4], cache)  # keeps block 0's arguments
    kept = model.blocks[0]._token_args[2]
    name = "model.layers.0.mlp.down_proj"
    model.set_linear(name, pack(2 * model.linears()[name].to_dense(), format="bf16"))
    assert block_args(model.blocks[0]) is not kept
    ref_cache = model.new_cache(8)  # the same history, for the per-block steps
    ref_cache.k, ref_cache.v = [a.copy() for a in cache.k], [a.copy() for a in cache.v]
    ref_cache.length = cache.length
    got = model.forward(ids[4:5], cache)
    model.token_step = False
    np.testing.assert_allclose(got, model.forward(ids[4:5], ref_cache), rtol=1e-5, atol=1e-5)


def test_step_args_refuses_layers_without_a_compiled_product():
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    assert step_args(MonarchLinear.pack(w, blocks=2)) is None
    assert step_args(DenseLinear(w.astype(np.float64))) is None  # gradient checks' float64
    assert step_args(DenseLinear(w)) is not None


@settings(deadline=None, max_examples=50)
@given(ffn=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 10.0, 60.0]))
def test_silu_mul_row_matches_numpy(ffn, seed, scale):
    rng = np.random.default_rng(seed)
    gate_up = (scale * rng.standard_normal((1, 2 * ffn))).astype(np.float32)
    gate_up[0, :min(ffn, 6)] = [100.0, -100.0, 0.0, 87.5, -90.0, -1e-30][:min(ffn, 6)]
    expected = silu_mul(gate_up[:, :ffn].copy(), gate_up[:, ffn:].copy())
    got = silu_mul_row(gate_up, ffn)
    np.testing.assert_allclose(got, expected, rtol=6e-7, atol=1e-37)  # a few float32 ulps


def test_cycle_counter_counts_forward():
    first = read_ticks()
    assert read_ticks() >= first
    seconds = tick_seconds(0.01)
    assert 1e-11 < seconds < 1e-7  # 10 MHz .. 100 GHz
