"""Every backward against central finite differences, in float64.

For a function ``y = f(x)`` and a random output weighting ``w``, the scalar ``L = <w, f(x)>`` has
directional derivative ``<dL/dx, v>`` along a random ``v``; the backward's gradient must give the
same number as ``(L(x + e v) - L(x - e v)) / 2e``. float32 differences are too noisy for this,
so every check runs in float64 (the ops are dtype-generic).
"""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npsparse.config import ModelConfig
from npsparse.models.backward import (attention_backward, embedding_backward, rms_norm_backward,
                                      rope_backward, swiglu_backward)
from npsparse.models.layers import (RopeTables, apply_rope, attend, attention_probs, merge_heads,
                                    rms_norm, rope_inv_freq, rope_tables, silu, split_heads)
from npsparse.models.llama import LINEAR_NAMES, LlamaBlock

EPS = 1e-6


def directional(f, inputs, grads, rng, out_weight):
    """Compare <grad, v> with the central difference of <out_weight, f> along v, for each input."""
    for i, (x, g) in enumerate(zip(inputs, grads)):
        v = rng.standard_normal(x.shape)
        plus = [a.copy() for a in inputs]
        minus = [a.copy() for a in inputs]
        plus[i] = x + EPS * v
        minus[i] = x - EPS * v
        numeric = (np.sum(out_weight * f(*plus)) - np.sum(out_weight * f(*minus))) / (2 * EPS)
        analytic = np.sum(g * v)
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8), f"input {i}"


seeds = st.integers(0, 2**32 - 1)


@given(t=st.integers(1, 6), d=st.integers(1, 12), seed=seeds)
def test_rms_norm_backward(t, d, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((t, d)), rng.standard_normal(d)
    out_w = rng.standard_normal((t, d))
    d_x, d_w = rms_norm_backward(out_w, x, w, 1e-5)
    assert d_x.dtype == np.float64 and d_w.shape == (d,)
    directional(lambda a, b: rms_norm(a, b, 1e-5), [x, w], [d_x, d_w], rng, out_w)


def test_rms_norm_backward_keeps_float32():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 8), dtype=np.float32), rng.standard_normal(8, dtype=np.float32)
    d_x, d_w = rms_norm_backward(np.ones_like(x), x, w, 1e-5)
    assert d_x.dtype == np.float32 and d_w.dtype == np.float32


@given(heads=st.integers(1, 3), t=st.integers(1, 5), half=st.integers(1, 4),
       start=st.integers(0, 50), seed=seeds)
def test_rope_backward(heads, t, half, start, seed):
    rng = np.random.default_rng(seed)
    hd = 2 * half
    cos, sin = rope_tables(np.arange(start, start + t), rope_inv_freq(hd, 10000.0, None))
    x = rng.standard_normal((heads, t, hd))
    out_w = rng.standard_normal(x.shape)
    directional(lambda a: apply_rope(a, cos, sin), [x], [rope_backward(out_w, cos, sin)], rng,
                out_w)


@given(kv=st.integers(1, 3), group=st.integers(1, 3), t=st.integers(1, 6), hd=st.integers(1, 5),
       seed=seeds)
def test_attention_backward(kv, group, t, hd, seed):
    """Causal grouped-query attention: dq, dk, dv (keys shared by ``group`` query heads)."""
    rng = np.random.default_rng(seed)
    n_heads = kv * group
    q = rng.standard_normal((n_heads, t, hd))
    k, v = rng.standard_normal((kv, t, hd)), rng.standard_normal((kv, t, hd))

    def f(q, k, v):
        return attend(attention_probs(q, k, 0), v, n_heads)  # [T, H*hd]

    out_w = rng.standard_normal((t, n_heads * hd))
    probs = attention_probs(q, k, 0)
    grads = attention_backward(split_heads(out_w, n_heads), q, k, v, probs)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    directional(f, [q, k, v], grads, rng, out_w)


def test_attention_backward_respects_the_causal_mask():
    """The first query sees only the first key: no gradient reaches later keys from it."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 3)) for _ in range(3))
    out_w = np.zeros((4, 3))
    out_w[0] = 1.0
    _, d_k, d_v = attention_backward(split_heads(out_w, 1), q, k, v, attention_probs(q, k, 0))
    assert np.all(d_k[:, 1:] == 0) and np.all(d_v[:, 1:] == 0)
    assert np.any(d_v[:, 0] != 0)


@given(t=st.integers(1, 5), f=st.integers(1, 9), seed=seeds)
def test_swiglu_backward(t, f, seed):
    rng = np.random.default_rng(seed)
    gate, up = 3 * rng.standard_normal((t, f)), rng.standard_normal((t, f))
    out_w = rng.standard_normal((t, f))
    directional(lambda g, u: silu(g) * u, [gate, up], swiglu_backward(out_w, gate, up), rng, out_w)


@given(t=st.integers(1, 8), vocab=st.integers(1, 6), seed=seeds)
def test_embedding_backward_adds_repeated_rows(t, vocab, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, t)
    d_x = rng.standard_normal((t, 3))
    expected = np.zeros((vocab, 3))
    for i, token in enumerate(ids):
        expected[token] += d_x[i]
    np.testing.assert_array_equal(embedding_backward(d_x, ids, vocab), expected)


def test_split_and_merge_heads_are_inverse():
    x = np.arange(2 * 12, dtype=np.float64).reshape(2, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (3, 2, 4)
    np.testing.assert_array_equal(heads[1, 0], x[0, 4:8])
    np.testing.assert_array_equal(merge_heads(heads), x)


def random_block(rng, kv, group, hd, d, f, bias, dtype=np.float64):
    cfg = ModelConfig(arch="qwen2" if bias else "llama", vocab_size=16, dim=d, n_layers=1,
                      n_heads=kv * group, n_kv_heads=kv, head_dim=hd, ffn_dim=f, qkv_bias=bias)
    shapes = {"self_attn.q_proj": (kv * group * hd, d), "self_attn.k_proj": (kv * hd, d),
              "self_attn.v_proj": (kv * hd, d), "self_attn.o_proj": (d, kv * group * hd),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    tensors = {name + ".weight": (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(dtype)
               for name, shape in shapes.items()}
    tensors["input_layernorm.weight"] = (1 + 0.3 * rng.standard_normal(d)).astype(dtype)
    tensors["post_attention_layernorm.weight"] = (1 + 0.3 * rng.standard_normal(d)).astype(dtype)
    if bias:
        for name in "qkv":
            rows = shapes[f"self_attn.{name}_proj"][0]
            tensors[f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(rows)).astype(dtype)
    rope = RopeTables(rope_inv_freq(hd, 10000.0, None))
    return LlamaBlock(cfg, tensors, rope)


@given(kv=st.integers(1, 2), group=st.integers(1, 3), half=st.integers(1, 3), t=st.integers(1, 6),
       bias=st.booleans(), seed=seeds)
def test_llama_block_backward(kv, group, half, t, bias, seed):
    """The whole block: input gradient and every parameter's gradient, GQA and biases included."""
    rng = np.random.default_rng(seed)
    block = random_block(rng, kv, group, 2 * half, d=6, f=7, bias=bias)
    x = rng.standard_normal((t, 6))
    out_w = rng.standard_normal((t, 6))
    tape = {}
    block(x, tape=tape)
    d_x, grads = block.backward(out_w, tape)
    params = block.parameters()
    assert set(grads) == set(params)
    names = sorted(params)

    def f(x, *values):
        saved = [params[n].copy() for n in names]
        for n, value in zip(names, values):
            params[n][...] = value
        try:
            return block(x)
        finally:
            for n, value in zip(names, saved):
                params[n][...] = value

    directional(f, [x] + [params[n] for n in names], [d_x] + [grads[n] for n in names], rng,
                out_w)


def test_block_backward_computes_only_the_trainable_gradients():
    rng = np.random.default_rng(0)
    block = random_block(rng, 1, 2, 4, d=6, f=7, bias=False)
    tape = {}
    block(rng.standard_normal((3, 6)), tape=tape)
    d_x, grads = block.backward(np.ones((3, 6)), tape, trainable={"mlp.up_proj.weight"})
    assert set(grads) == {"mlp.up_proj.weight"}
    d_x_all, _ = block.backward(np.ones((3, 6)), tape)
    np.testing.assert_array_equal(d_x, d_x_all)


def test_block_body_is_the_same_in_float32_and_float64():
    """float64 checks stand for float32: the same body, rounding apart."""
    rng = np.random.default_rng(3)
    b64 = random_block(np.random.default_rng(3), 2, 2, 4, d=8, f=10, bias=True)
    b32 = random_block(np.random.default_rng(3), 2, 2, 4, d=8, f=10, bias=True, dtype=np.float32)
    x = rng.standard_normal((5, 8))
    y64, y32 = b64(x), b32(x.astype(np.float32))
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-5)
    assert set(LINEAR_NAMES) <= {n[:-len(".weight")] for n in b64.parameters()}
