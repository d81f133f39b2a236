"""Compiled decode steps equal their NumPy references: attention, RMSNorm, SwiGLU, RoPE tables."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from npsparse.kernels.attention import SPLIT_MIN_KEYS, decode_attention, decode_attention_split
from npsparse.kernels.rowops import add_rms_norm, rms_norm_rows, silu_mul
from npsparse.models.layers import (RopeTables, causal_attention, rms_norm, rope_inv_freq, silu,
                                    rope_tables)


@given(kv=st.integers(1, 3), group=st.integers(1, 4), head_dim=st.sampled_from([1, 2, 8, 64]),
       n_keys=st.integers(1, 40), spare=st.integers(0, 5), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_decode_attention_equals_reference(kv, group, head_dim, n_keys, spare, seed, scale):
    rng = np.random.default_rng(seed)
    n_heads = kv * group
    q = (scale * rng.standard_normal((n_heads, 1, head_dim))).astype(np.float32)
    cache_k = rng.standard_normal((kv, n_keys + spare, head_dim)).astype(np.float32)
    cache_v = rng.standard_normal((kv, n_keys + spare, head_dim)).astype(np.float32)
    cache_k[:, n_keys:] = np.nan  # positions past n_keys must not be read
    cache_v[:, n_keys:] = np.nan
    expected = causal_attention(q, cache_k[:, :n_keys], cache_v[:, :n_keys], n_keys - 1)
    got = decode_attention(q[:, 0], cache_k, cache_v, n_keys)
    assert got.shape == (1, n_heads * head_dim) and got.dtype == np.float32
    # |v| ~ 1; float32 scores of size ~scale * sqrt(hd) summed in another order
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@given(kv=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.sampled_from([1, 8, 64]),
       n_keys=st.integers(1, 80), n_parts=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_split_attention_equals_single_pass(kv, group, head_dim, n_keys, n_parts, seed, scale):
    """Ranges attended separately and merged (flash-decoding) == one pass over all keys."""
    rng = np.random.default_rng(seed)
    q = (scale * rng.standard_normal((kv * group, head_dim))).astype(np.float32)
    cache_k = rng.standard_normal((kv, n_keys + 3, head_dim)).astype(np.float32)
    cache_v = rng.standard_normal((kv, n_keys + 3, head_dim)).astype(np.float32)
    cache_k[:, n_keys:] = np.nan  # positions past n_keys must not be read
    cache_v[:, n_keys:] = np.nan
    got = decode_attention_split(q, cache_k, cache_v, n_keys, n_parts)
    np.testing.assert_allclose(got, decode_attention(q, cache_k, cache_v, n_keys), rtol=1e-4,
                               atol=1e-5)


def test_rope_table_equals_rope_tables():
    inv_freq = rope_inv_freq(64, 10000.0, None)
    table = RopeTables(inv_freq)
    for start, n_tok in [(0, 5), (5, 1), (6, 100), (3, 2), (200, 1)]:  # grows past 64 and 128
        cos, sin = table(start, n_tok)
        ref_cos, ref_sin = rope_tables(np.arange(start, start + n_tok), inv_freq)
        np.testing.assert_array_equal(cos, ref_cos)
        np.testing.assert_array_equal(sin, ref_sin)


@given(kv=st.integers(1, 3), group=st.integers(1, 3), half=st.sampled_from([1, 4, 32]),
       position=st.one_of(st.integers(0, 30), st.integers(SPLIT_MIN_KEYS - 3, 300)),
       rotate=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decode_step_equals_prefill_path(kv, group, half, position, rotate, seed):
    """One token through decode_step == the NumPy path (RoPE, cache append, attention); from
    SPLIT_MIN_KEYS positions on, with the test's 2+ threads, through the split attention."""
    from npsparse.models.layers import multi_head_attention

    rng = np.random.default_rng(seed)
    n_heads, head_dim = kv * group, 2 * half
    q = rng.standard_normal((2, n_heads * head_dim)).astype(np.float32)  # two tokens, the
    k = rng.standard_normal((2, kv * head_dim)).astype(np.float32)  # second decoded alone
    v = rng.standard_normal((2, kv * head_dim)).astype(np.float32)
    history_k = rng.standard_normal((kv, position + 8, head_dim)).astype(np.float32)
    history_v = rng.standard_normal((kv, position + 8, head_dim)).astype(np.float32)
    rope = RopeTables(rope_inv_freq(head_dim, 10000.0, None)) if rotate else None
    # reference: NumPy path with T = 2 starting one position earlier, keep the last row
    ref_k, ref_v = history_k.copy(), history_v.copy()
    start = max(position - 1, 0)
    rows = slice(2 - (position - start) - 1, 2)
    expected = multi_head_attention(q[rows], k[rows], v[rows], n_heads, kv, start, ref_k, ref_v,
                                    rope(start, position - start + 1) if rotate else None)[-1:]
    got_k, got_v = history_k.copy(), history_v.copy()
    if position > start:  # the earlier token goes in through the NumPy path first
        multi_head_attention(q[:1], k[:1], v[:1], n_heads, kv, start, got_k, got_v,
                             rope(start, 1) if rotate else None)
    got = multi_head_attention(q[1:], k[1:], v[1:], n_heads, kv, position, got_k, got_v,
                               rope(position, 1) if rotate else None)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_k[:, :position + 1], ref_k[:, :position + 1], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(got_v, ref_v)


@given(rows=st.integers(1, 3), dim=st.integers(1, 700), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), eps=st.sampled_from([1e-6, 1e-5]))
def test_compiled_rms_norm_equals_numpy(rows, dim, seed, scale, eps):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((rows, dim))).astype(np.float32)
    weight = rng.standard_normal(dim).astype(np.float32)
    got = rms_norm_rows(x, weight, eps)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, rms_norm(x, weight, eps), rtol=1e-5, atol=1e-6)


@given(rows=st.integers(1, 3), dim=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_compiled_residual_norm_equals_numpy(rows, dim, seed):
    rng = np.random.default_rng(seed)
    x, delta = rng.standard_normal((2, rows, dim)).astype(np.float32)
    weight = rng.standard_normal(dim).astype(np.float32)
    total, normed = add_rms_norm(x, delta, weight, 1e-5)
    np.testing.assert_array_equal(total, x + delta)
    np.testing.assert_allclose(normed, rms_norm(x + delta, weight, 1e-5), rtol=1e-5, atol=1e-6)


@given(width=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 40.0, 1e4]))
def test_swiglu_equals_numpy_without_overflow_warnings(width, seed, scale):
    rng = np.random.default_rng(seed)
    gate = (scale * rng.standard_normal((1, width))).astype(np.float32)
    up = rng.standard_normal((1, width)).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # not even for g = -1e4
        got = silu_mul(gate, up)
    np.testing.assert_allclose(got, silu(gate) * up, rtol=2e-6, atol=1e-30)
