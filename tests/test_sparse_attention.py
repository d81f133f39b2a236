"""SPT sparse attention (issue 16): PQ codebooks, ADC scores, top-L choice, sparse softmax."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.kernels.topk_attention import BUCKETS, encode_keys, select_keys
from npsparse.models.layers import causal_attention
from npsparse.sparse_attention import (approximate_scores, attention_error, encode,
                                       fit_codebooks, fit_head_codebooks, select_topk,
                                       topk_attention, topk_attention_reference)

few = settings(deadline=None, max_examples=25)


def _dyadic(rng, shape, low=-3, high=3):
    """Small multiples of 1/2: every dot product and sum below is exact in float32."""
    return (rng.integers(low, high + 1, size=shape) / 2).astype(np.float32)


# ----------------------------------------------------------------------------- codebooks


@few
@given(n=st.integers(1, 40), n_sub=st.sampled_from([1, 2, 4]), n_centroids=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_fit_codebooks_structure_and_determinism(n, n_sub, n_centroids, seed):
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((n, 8)).astype(np.float32)
    books = fit_codebooks(samples, n_sub, n_centroids, seed=3, iters=5)
    assert books.shape == (n_sub, n_centroids, 8 // n_sub) and books.dtype == np.float32
    assert np.all(np.isfinite(books))
    np.testing.assert_array_equal(books, fit_codebooks(samples, n_sub, n_centroids, 3, 5))
    codes = encode(samples, books)
    assert codes.shape == (n, n_sub) and codes.dtype == np.uint8
    assert codes.max() < n_centroids


def test_kmeans_lowers_the_quantization_error():
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((300, 8)).astype(np.float32)

    def error(books):
        codes = encode(samples, books)  # [N, M]
        rebuilt = np.concatenate([books[m][codes[:, m]] for m in range(books.shape[0])], axis=1)
        return float(np.sum((rebuilt - samples) ** 2))

    assert error(fit_codebooks(samples, 2, 16, seed=0, iters=10)) < error(
        fit_codebooks(samples, 2, 16, seed=0, iters=0))


@few
@given(n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_codebooks_represent_few_distinct_subvectors_exactly(n, seed):
    # d = 2 entries from {-1, 0, 1}: at most 9 distinct sub-vectors, C = 9 holds them all
    rng = np.random.default_rng(seed)
    keys = rng.integers(-1, 2, size=(n, 8)).astype(np.float32)
    books = fit_codebooks(keys, 4, 9, seed=seed, iters=4)
    codes = encode(keys, books)
    rebuilt = np.concatenate([books[m][codes[:, m]] for m in range(4)], axis=1)
    np.testing.assert_array_equal(rebuilt, keys)


# ----------------------------------------------------------------------------- scores and choice


@few
@given(n_q=st.integers(1, 6), n_keys=st.integers(1, 12), n_sub=st.sampled_from([1, 2, 4]),
       n_centroids=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_approximate_scores_are_dot_products_with_rebuilt_keys(n_q, n_keys, n_sub, n_centroids,
                                                               seed):
    rng = np.random.default_rng(seed)
    books = _dyadic(rng, (n_sub, n_centroids, 8 // n_sub))
    codes = rng.integers(0, n_centroids, size=(n_keys, n_sub)).astype(np.uint8)
    q = _dyadic(rng, (n_q, 8))
    rebuilt = np.stack([np.concatenate([books[m, c] for m, c in enumerate(row)]) for row in codes])
    got = approximate_scores(q, codes, books)
    assert got.shape == (n_q, n_keys) and got.dtype == np.float32
    np.testing.assert_array_equal(got, q @ rebuilt.T)


@few
@given(n_keys=st.integers(1, 12), n_keep=st.integers(1, 14), seed=st.integers(0, 2**16),
       data=st.data())
def test_select_topk_is_a_brute_force_sort_of_the_visible_keys(n_keys, n_keep, seed, data):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, size=(5, n_keys)).astype(np.float32)  # many ties
    pos = np.array(data.draw(st.lists(st.integers(0, n_keys - 1), min_size=5, max_size=5)))
    keys, valid = select_topk(scores, pos, n_keep)
    width = min(n_keep, n_keys)
    assert keys.shape == valid.shape == (5, width) and keys.dtype == np.int64
    for r in range(5):
        expected = sorted(range(pos[r] + 1), key=lambda s: (-scores[r, s], s))[:n_keep]
        assert valid[r].sum() == len(expected)
        assert keys[r][valid[r]].tolist() == expected
        assert np.all(keys[r][valid[r]] <= pos[r])  # causal
        assert np.all(keys[r][~valid[r]] > pos[r])  # padding is only future positions


@few
@given(n_keys=st.integers(1, 16), n_keep=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_exact_codebooks_choose_the_exact_top_keys(n_keys, n_keep, seed):
    rng = np.random.default_rng(seed)
    k = rng.integers(-1, 2, size=(n_keys, 8)).astype(np.float32)
    q = rng.integers(-2, 3, size=(4, 8)).astype(np.float32)
    books = fit_codebooks(k, 4, 9, seed=seed, iters=3)
    approx = approximate_scores(q, encode(k, books), books)
    np.testing.assert_array_equal(approx, q @ k.T)  # integers: exact in float32
    pos = np.full(4, n_keys - 1)
    by_pq, _ = select_topk(approx, pos, n_keep)
    by_exact, _ = select_topk(q @ k.T, pos, n_keep)
    np.testing.assert_array_equal(by_pq, by_exact)


# ----------------------------------------------------------------------------- attention


def _case(rng, kv, group, n_tok, start, head_dim, n_sub, n_centroids):
    q = rng.standard_normal((kv * group, n_tok, head_dim)).astype(np.float32)
    k = rng.standard_normal((kv, start + n_tok, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv, start + n_tok, head_dim)).astype(np.float32)
    books = fit_head_codebooks(k, n_sub, n_centroids, seed=1, iters=3)
    return q, k, v, books


@few
@given(kv=st.integers(1, 2), group=st.integers(1, 3), n_tok=st.integers(1, 6),
       start=st.integers(0, 5), n_sub=st.sampled_from([1, 2, 4]), extra=st.integers(0, 3),
       seed=st.integers(0, 2**16), path=st.sampled_from(["numba", "numpy"]))
def test_keeping_every_visible_key_is_exact_causal_attention(kv, group, n_tok, start, n_sub,
                                                             extra, seed, path):
    q, k, v, books = _case(np.random.default_rng(seed), kv, group, n_tok, start, 8, n_sub, 4)
    got = topk_attention(q, k, v, start, start + n_tok + extra, books, path=path)
    expected = causal_attention(q, k, v, start)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert attention_error(expected, got) < 1e-5


@few
@given(kv=st.integers(1, 2), group=st.integers(1, 3), n_tok=st.integers(1, 6),
       start=st.integers(0, 5), n_keep=st.integers(1, 5), n_sub=st.sampled_from([1, 2, 4]),
       clamp=st.sampled_from([None, 1.0]), seed=st.integers(0, 2**16),
       path=st.sampled_from(["numba", "numpy"]))
def test_topk_attention_equals_the_naive_loop(kv, group, n_tok, start, n_keep, n_sub, clamp,
                                              seed, path):
    rng = np.random.default_rng(seed)
    n_keys = start + n_tok
    q = _dyadic(rng, (kv * group, n_tok, 8))
    k, v = _dyadic(rng, (kv, n_keys, 8)), _dyadic(rng, (kv, n_keys, 8))
    books = _dyadic(rng, (kv, n_sub, 3, 8 // n_sub))  # dyadic: the same ranking in both
    got = topk_attention(q, k, v, start, n_keep, books, clamp=clamp, path=path)
    expected = topk_attention_reference(q, k, v, start, n_keep, books, clamp=clamp)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Numba kernel


def _select_keys(scores, n_visible, n_keep, buckets=BUCKETS):
    """The kernel's choice for one query, through scratch buffers sized as the kernel's."""
    keys = np.full(max(1, min(n_keep, n_visible)), -1, dtype=np.int64)
    count = select_keys(scores, n_visible, n_keep, keys, np.empty(2 * len(scores), np.int64),
                        np.empty(len(scores), np.float32), np.empty(buckets, np.int64))
    return keys[:count]


@few
@given(n_keys=st.integers(1, 300), n_keep=st.integers(1, 40), buckets=st.sampled_from([1, 3, 256]),
       kind=st.sampled_from(["ties", "normal", "outlier", "constant", "huge"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_select_keys_picks_the_set_select_topk_picks(n_keys, n_keep, buckets, kind, seed, data):
    rng = np.random.default_rng(seed)
    if kind == "ties":
        scores = rng.integers(-3, 4, size=(4, n_keys)).astype(np.float32)
    elif kind == "normal":
        scores = rng.standard_normal((4, n_keys)).astype(np.float32)
    elif kind == "outlier":  # one far score squeezes the others into a single bucket
        scores = rng.integers(-3, 4, size=(4, n_keys)).astype(np.float32)
        scores[:, rng.integers(n_keys)] = 1e6
    elif kind == "constant":
        scores = np.full((4, n_keys), 0.5, dtype=np.float32)
    else:  # a range that overflows float32
        scores = rng.choice(np.array([-3e38, 0.0, 1.0, 3e38], dtype=np.float32), size=(4, n_keys))
    pos = np.array(data.draw(st.lists(st.integers(0, n_keys - 1), min_size=4, max_size=4)))
    keys, valid = select_topk(scores, pos, n_keep)
    for r in range(4):
        got = _select_keys(scores[r], pos[r] + 1, n_keep, buckets)
        assert len(got) == min(n_keep, pos[r] + 1)
        assert sorted(got.tolist()) == sorted(keys[r][valid[r]].tolist())  # the same set


@few
@given(kv=st.integers(1, 3), n_keys=st.integers(1, 40), n_sub=st.sampled_from([1, 2, 4]),
       n_centroids=st.integers(1, 6), dyadic=st.booleans(), seed=st.integers(0, 2**16))
def test_numba_encode_keys_is_encode_per_head(kv, n_keys, n_sub, n_centroids, dyadic, seed):
    rng = np.random.default_rng(seed)
    if dyadic:  # exact distances with many ties, and a duplicate centroid: lower index wins
        k = _dyadic(rng, (kv, n_keys, 8), -2, 2)
        books = _dyadic(rng, (kv, n_sub, n_centroids, 8 // n_sub), -2, 2)
        books[:, :, -1] = books[:, :, 0]
    else:
        k = rng.standard_normal((kv, n_keys, 8)).astype(np.float32)
        books = rng.standard_normal((kv, n_sub, n_centroids, 8 // n_sub)).astype(np.float32)
    got = encode_keys(k, books)
    assert got.shape == (kv, n_keys, n_sub) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([encode(k[h], books[h]) for h in range(kv)]))


def _tied_case(rng, kv, group, n_tok, start, n_sub, n_centroids, tie):
    """Dyadic inputs (exact float32 sums, so the ranking is the same in every implementation)
    with ties in the approximate scores: duplicate centroids, equal keys, or both."""
    n_keys = start + n_tok
    q = _dyadic(rng, (kv * group, n_tok, 8))
    k, v = _dyadic(rng, (kv, n_keys, 8)), _dyadic(rng, (kv, n_keys, 8))
    books = _dyadic(rng, (kv, n_sub, n_centroids, 8 // n_sub))
    if tie in ("centroids", "both") and n_centroids > 1:
        books[:, :, 1] = books[:, :, 0]  # two centroids with the same value: codes tie too
    if tie in ("keys", "both") and n_keys > 1:
        k[:, 1::2] = k[:, :-1:2]  # each odd key repeats the even key before it
    return q, k, v, books


@few
@given(kv=st.integers(1, 3), group=st.integers(1, 3), n_tok=st.integers(1, 9),
       start=st.integers(0, 7), n_keep=st.integers(1, 18), n_sub=st.sampled_from([1, 2, 4]),
       n_centroids=st.integers(1, 5), tie=st.sampled_from(["none", "centroids", "keys", "both"]),
       clamp=st.sampled_from([None, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_numba_kernel_equals_the_naive_loop(kv, group, n_tok, start, n_keep, n_sub, n_centroids,
                                            tie, clamp, seed):
    q, k, v, books = _tied_case(np.random.default_rng(seed), kv, group, n_tok, start, n_sub,
                                n_centroids, tie)
    got = topk_attention(q, k, v, start, n_keep, books, clamp=clamp, path="numba")
    assert got.shape == (n_tok, kv * group * 8) and got.dtype == np.float32
    expected = topk_attention_reference(q, k, v, start, n_keep, books, clamp=clamp)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, topk_attention(q, k, v, start, n_keep, books, clamp=clamp,
                                                   path="numpy"), rtol=1e-5, atol=1e-5)


@settings(deadline=None, max_examples=5)
@given(n_keep=st.sampled_from([1, 7, 64, 299]), start=st.sampled_from([0, 37]),
       tie=st.sampled_from(["none", "both"]), seed=st.integers(0, 2**16))
def test_numba_kernel_equals_the_numpy_path_on_long_sequences(n_keep, start, tie, seed):
    # more visible keys than histogram buckets, more tokens than tasks per head, GQA 3:1
    q, k, v, books = _tied_case(np.random.default_rng(seed), 2, 3, 300, start, 4, 8, tie)
    got = topk_attention(q, k, v, start, n_keep, books, clamp=10.0)
    np.testing.assert_allclose(got, topk_attention(q, k, v, start, n_keep, books, clamp=10.0,
                                                   path="numpy"), rtol=1e-5, atol=1e-5)


@settings(deadline=None, max_examples=10)
@given(n_keep=st.integers(1, 12), n_tok=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_numba_kernel_one_token_at_a_time_equals_the_whole_window(n_keep, n_tok, seed):
    # decode calls it with T = 1 and the keys so far: each query's result must not depend on
    # the call it is in (same ADC sums, same keys, same bits), even on float data
    q, k, v, books = _case(np.random.default_rng(seed), 2, 3, n_tok, 0, 16, 4, 16)
    whole = topk_attention(q, k, v, 0, n_keep, books)
    steps = [topk_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], t, n_keep, books)
             for t in range(n_tok)]
    np.testing.assert_array_equal(np.concatenate(steps), whole)


def test_unknown_path_is_refused():
    q, k, v, books = _case(np.random.default_rng(0), 1, 1, 2, 0, 8, 2, 2)
    with pytest.raises(NpsparseError, match="path"):
        topk_attention(q, k, v, 0, 1, books, path="torch")


def test_gqa_with_few_keys_differs_from_exact_by_a_measured_error():
    rng = np.random.default_rng(7)
    q, k, v, books = _case(rng, kv=2, group=2, n_tok=24, start=8, head_dim=8, n_sub=2,
                           n_centroids=8)
    sparse = topk_attention(q, k, v, 8, 4, books)
    np.testing.assert_allclose(sparse, topk_attention_reference(q, k, v, 8, 4, books),
                               rtol=1e-5, atol=1e-5)
    error = attention_error(causal_attention(q, k, v, 8), sparse)
    assert 0.0 < error < 1.5
    # determinism: the same call gives the same bits
    np.testing.assert_array_equal(sparse, topk_attention(q, k, v, 8, 4, books))


def test_clamp_limits_the_scaled_scores():
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 100.0
    k = np.array([[[1, 0, 0, 0], [0.5, 0, 0, 0]]], dtype=np.float32)  # scores 50 and 25
    v = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]]], dtype=np.float32)
    books = fit_head_codebooks(k, 1, 2, seed=0)
    clamped = topk_attention(q, k, v, 1, 2, books, clamp=10.0)
    np.testing.assert_allclose(clamped[0, :2], [0.5, 0.5])  # both clipped to 10
    assert topk_attention(q, k, v, 1, 2, books)[0, 0] > 0.99


def test_attention_error_is_relative_frobenius():
    exact = np.array([[3.0, 4.0]], dtype=np.float32)
    assert attention_error(exact, exact) == 0.0
    assert attention_error(exact, np.array([[3.0, 4.5]], dtype=np.float32)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- errors


def test_bad_parameters_are_one_line_errors():
    rng = np.random.default_rng(0)
    q, k, v, books = _case(rng, kv=1, group=2, n_tok=3, start=0, head_dim=8, n_sub=2,
                           n_centroids=2)
    calls = [
        lambda: topk_attention(q, k, v, 0, 0, books),
        lambda: topk_attention_reference(q, k, v, 0, -1, books),
        lambda: fit_codebooks(k[0], 3, 2, seed=0),
        lambda: fit_codebooks(k[0], 0, 2, seed=0),
        lambda: fit_codebooks(k[0], 2, 300, seed=0),
        lambda: topk_attention(q, k, v, 1, 2, books),  # S != start + T
        lambda: topk_attention(q, k, v, 0, 2, books[0]),  # codebooks not per head
        lambda: encode(k[0], np.zeros((3, 2, 2), dtype=np.float32)),  # 3 * 2 != hd
    ]
    for call in calls:
        with pytest.raises(NpsparseError) as info:
            call()
        assert "\n" not in str(info.value)


def test_query_rows_past_one_block_are_exact_with_every_key():
    # 2 query heads per kv head x 140 tokens = 280 rows: more than one block of 256 rows
    q, k, v, books = _case(np.random.default_rng(3), kv=1, group=2, n_tok=140, start=0,
                           head_dim=4, n_sub=2, n_centroids=4)
    np.testing.assert_allclose(topk_attention(q, k, v, 0, 140, books),
                               causal_attention(q, k, v, 0), rtol=1e-5, atol=1e-5)
