"""Top-L attention keeps the keys' PQ codes between calls (``KeyCodes``): each key is encoded
once, and every result is bit for bit the one of :func:`topk_attention`, which encodes all keys
on every call. Checked on the codes themselves (writes, rewinds, other buffers) and on decode,
generation, rewinds and interleaved sequences of the tiny model."""

from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
from helpers import topk_model_and_books
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse import sparse_attention
from npsparse.generate import generate
from npsparse.kernels.topk_attention import encode_keys
from npsparse.models import llama_decode
from npsparse.sparse_attention import KeyCodes, TopkAttention, topk_attention, use_topk_attention

few = settings(deadline=None, max_examples=25)


def _keys(rng, shape, dyadic):
    if dyadic:  # exact distances with many ties
        return (rng.integers(-2, 3, size=shape) / 2).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- the codes


@few
@given(kv=st.integers(1, 3), n_keys=st.integers(1, 40), data=st.data(),
       n_sub=st.sampled_from([1, 2, 4]), n_centroids=st.integers(1, 6), dyadic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_encode_keys_is_row_independent(kv, n_keys, data, n_sub, n_centroids, dyadic, seed):
    # what makes caching codes exact: a key's code depends on that key and the codebooks only
    rng = np.random.default_rng(seed)
    k = _keys(rng, (kv, n_keys, 8), dyadic)
    books = _keys(rng, (kv, n_sub, n_centroids, 8 // n_sub), dyadic)
    lo = data.draw(st.integers(0, n_keys - 1))
    hi = data.draw(st.integers(lo + 1, n_keys))
    part = encode_keys(np.ascontiguousarray(k[:, lo:hi]), books)
    np.testing.assert_array_equal(part, encode_keys(k, books)[:, lo:hi])


@few
@given(calls=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(1, 9),
                                st.booleans()), min_size=1, max_size=12),
       dyadic=st.booleans(), seed=st.integers(0, 2**16))
def test_key_codes_equal_a_fresh_encoding_after_writes_rewinds_and_other_buffers(calls, dyadic,
                                                                                 seed):
    # each call: buffer 0 or 1 (two caches), or 2 (a fresh array, not a view); a start at or
    # before the buffer's length (smaller: a rewind); T new keys written; codes needed or not
    rng = np.random.default_rng(seed)
    books = _keys(rng, (2, 4, 3, 2), dyadic)  # [KV, M, C, d]
    buffers = [np.zeros((2, 48, 8), dtype=np.float32) for _ in range(2)]
    lengths = [0, 0]
    codes = KeyCodes()
    for which, start, n_tok, needed in calls:
        if which == 2:
            k = _keys(rng, (2, start + n_tok, 8), dyadic)
        else:
            start = min(start, lengths[which], 48 - n_tok)
            buffers[which][:, start:start + n_tok] = _keys(rng, (2, n_tok, 8), dyadic)
            lengths[which] = start + n_tok
            k = buffers[which][:, :start + n_tok]
        got = codes.update(k, start, books, needed)
        if needed:
            assert got.shape == (2, start + n_tok, 4) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, encode_keys(np.ascontiguousarray(k), books))
        else:
            assert got.shape == (2, 0, 4)


def test_a_decoded_key_is_encoded_once(monkeypatch):
    rows, encoded = [], []  # keys per encode_keys call; keys encoded per attention call
    monkeypatch.setattr(sparse_attention, "encode_keys",
                        lambda k, books: rows.append(k.shape[1]) or encode_keys(k, books))
    rng = np.random.default_rng(0)
    books = rng.standard_normal((2, 4, 3, 2)).astype(np.float32)
    att = TopkAttention(3, books)
    cache_k = np.zeros((2, 40, 8), dtype=np.float32)
    cache_v = np.zeros((2, 40, 8), dtype=np.float32)
    for start, n_tok in [(0, 2), (2, 5)] + [(s, 1) for s in range(7, 40)]:
        cache_k[:, start:start + n_tok] = rng.standard_normal((2, n_tok, 8))
        cache_v[:, start:start + n_tok] = rng.standard_normal((2, n_tok, 8))
        q = rng.standard_normal((4, n_tok, 8)).astype(np.float32)
        end = start + n_tok
        got = att(q, cache_k[:, :end], cache_v[:, :end], start)
        encoded.append(sum(rows))
        expected = topk_attention(q, cache_k[:, :end], cache_v[:, :end], start, 3, books)
        rows.clear()  # the oracle encodes every key
        np.testing.assert_array_equal(got, expected)
    # the first call needs no codes (L = 3 >= 2 keys); the second encodes all 7, then one each
    assert encoded == [0, 2 + 5] + [1] * 33
    assert att.key_codes.valid == 40


@pytest.mark.parametrize("n_keep", [1, 3, 50])
def test_the_kernel_reads_a_cache_in_place_bit_identically_to_a_copy(monkeypatch, n_keep):
    # decode into a cache with capacity 64 > S: the kernel gets the cache buffers themselves
    # (no copy of the [:, :S] views), and gives what it gives on contiguous copies of them
    seen = []  # (k, v, codes) as the kernel got them
    kernel = sparse_attention.topk_attention_kernel
    monkeypatch.setattr(sparse_attention, "topk_attention_kernel",
                        lambda q, k, v, start, keep, books, codes, *rest:
                        seen.append((k, v, codes)) or kernel(q, k, v, start, keep, books, codes,
                                                             *rest))
    rng = np.random.default_rng(1)
    books = rng.standard_normal((2, 4, 3, 2)).astype(np.float32)
    att = TopkAttention(n_keep, books)
    cache_k = np.zeros((2, 64, 8), dtype=np.float32)
    cache_v = np.zeros((2, 64, 8), dtype=np.float32)
    for start, n_tok in [(0, 5)] + [(s, 1) for s in range(5, 40)]:
        end = start + n_tok
        cache_k[:, start:end] = rng.standard_normal((2, n_tok, 8))
        cache_v[:, start:end] = rng.standard_normal((2, n_tok, 8))
        q = rng.standard_normal((4, n_tok, 8)).astype(np.float32)
        got = att(q, cache_k[:, :end], cache_v[:, :end], start)
        assert seen[-1][0] is cache_k and seen[-1][1] is cache_v
        if n_keep < end:
            assert seen[-1][2] is att.key_codes.codes  # the codes' buffer too
        copies = [np.ascontiguousarray(x[:, :end]) for x in (cache_k, cache_v)]  # [KV, S, hd]
        expected = topk_attention(q, *copies, start, n_keep, books)
        assert seen[-1][0].shape[1] == end  # the copying path
        np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- in the model

@pytest.fixture(scope="module")
def model_and_books():
    return topk_model_and_books()


class Twins:
    """The model with cached top-L attention, and with the uncached function (the oracle)."""

    def __init__(self, model, books, n_keep):
        self.model = model
        use_topk_attention(model, n_keep, books)
        self.cached = [block.attention for block in model.blocks]
        self.uncached = [partial(topk_attention, n_keep=n_keep, codebooks=att.codebooks)
                         for att in self.cached]

    def run(self, cached: bool, fn, *args, **kwargs):
        for block, att in zip(self.model.blocks, self.cached if cached else self.uncached):
            block.attention = att
        return fn(*args, **kwargs)

    def both(self, fn, *args, **kwargs):
        return self.run(True, fn, *args, **kwargs), self.run(False, fn, *args, **kwargs)


@contextmanager
def twins(model_and_books, n_keep):
    model, books = model_and_books
    try:
        yield Twins(model, books, n_keep)
    finally:
        use_topk_attention(model, None)


@pytest.mark.parametrize("n_keep", [1, 3, 8])
def test_decode_with_cached_codes_is_bit_identical_for_many_steps(model_and_books, n_keep):
    with twins(model_and_books, n_keep) as pair:
        model = pair.model
        ids = np.random.default_rng(3).integers(0, 97, size=100)
        caches = model.new_cache(100), model.new_cache(100)
        prefill = [pair.run(cached, model.forward, ids[:12], cache)
                   for cached, cache in zip((True, False), caches)]
        np.testing.assert_array_equal(prefill[0], prefill[1])
        steps = []
        for t in range(12, 100):
            got, expected = (pair.run(cached, model.forward, ids[t:t + 1], cache)
                             for cached, cache in zip((True, False), caches))
            np.testing.assert_array_equal(got, expected)
            steps.append(got[0])
        # and, up to float rounding, the whole window at once
        whole = pair.run(True, model.forward, ids)  # [100, V]
        np.testing.assert_allclose(np.stack(steps), whole[12:], atol=1e-5, rtol=0)


def test_a_second_generation_on_the_same_model_is_bit_identical(model_and_books):
    with twins(model_and_books, 4) as pair:
        for seed, prompt_len in [(0, 30), (1, 9), (2, 17)]:  # longer, then shorter prompts
            prompt = np.random.default_rng(seed).integers(0, 97, size=prompt_len)
            got, expected = pair.both(generate, pair.model, prompt, 60, temperature=0.8,
                                      seed=seed, adapt_threads=False)
            assert got.ids == expected.ids and len(got.ids) == 60


def test_a_rewound_cache_is_bit_identical(model_and_books):
    # decode 40 tokens, cut the cache back to 25 positions (keep a shared prefix), then decode
    # other tokens over the cut ones: their old codes must not be used
    with twins(model_and_books, 3) as pair:
        model = pair.model
        rng = np.random.default_rng(4)
        first, second = rng.integers(0, 97, size=50), rng.integers(0, 97, size=50)
        for cached in (True, False):
            cache = model.new_cache(64)
            pair.run(cached, model.prefill, first[:10], cache)
            for t in range(10, 50):
                pair.run(cached, model.forward, first[t:t + 1], cache)
            cache.length = 25
            out = [pair.run(cached, model.forward, second[25:30], cache)]  # a prefill chunk
            out += [pair.run(cached, model.forward, second[t:t + 1], cache) for t in range(30, 50)]
            if cached:
                got = np.concatenate(out)
        np.testing.assert_array_equal(got, np.concatenate(out))


@few
@given(script=st.lists(st.tuples(st.sampled_from(["step", "rewind", "prefill", "window"]),
                                 st.integers(0, 1), st.integers(1, 20)), min_size=1,
                       max_size=10),
       n_keep=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_rewinds_and_interleaved_sequences_are_bit_identical(model_and_books, script, n_keep,
                                                             seed):
    # two caches (sessions) on one model, taken in turns; "rewind" cuts one back to fewer
    # positions (a shared prefix) and writes new ones; "window" is a forward without a cache
    # (as perplexity runs)
    with twins(model_and_books, n_keep) as pair:
        model = pair.model
        rng = np.random.default_rng(seed)
        caches = {cached: [model.new_cache(128), model.new_cache(128)]
                  for cached in (True, False)}
        for op, which, n in script:
            length = caches[True][which].length
            if op == "rewind":  # fewer positions, then n new ones over the cut ones
                length = length * n // 21
                for cached in (True, False):
                    caches[cached][which].length = length
            if op == "window":
                ids = rng.integers(0, 97, size=n)
                got, expected = pair.both(model.forward, ids)
            else:
                n = 1 if op == "step" else n
                if length + n > 128:
                    continue
                ids = rng.integers(0, 97, size=n)
                got, expected = (pair.run(cached, model.forward, ids, caches[cached][which])
                                 for cached in (True, False))
            np.testing.assert_array_equal(got, expected)


def test_one_token_decode_runs_the_compiled_steps_around_top_l_attention(model_and_books,
                                                                        monkeypatch):
    # forward with one token and a cache takes llama_decode's path (compiled norms, stacked
    # products) also with top-L attention; it agrees with the block's body to float rounding
    model, books = model_and_books
    calls = []
    other = llama_decode._other_attention
    monkeypatch.setattr(llama_decode, "_other_attention",
                        lambda *args: calls.append(1) or other(*args))
    with twins(model_and_books, 3) as pair:
        ids = np.random.default_rng(6).integers(0, 97, size=40)
        caches = model.new_cache(64), model.new_cache(64)
        steps = {True: [], False: []}
        for compiled, cache in zip((True, False), caches):
            if not compiled:
                model.decode_block = None  # on the instance: forward runs the blocks' body
            try:
                pair.run(True, model.forward, ids[:10], cache)
                steps[compiled] = [pair.run(True, model.forward, ids[t:t + 1], cache)
                                   for t in range(10, 40)]
            finally:
                vars(model).pop("decode_block", None)
        assert len(calls) == 30 * model.config.n_layers
        np.testing.assert_allclose(np.concatenate(steps[True]), np.concatenate(steps[False]),
                                   atol=1e-5, rtol=0)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
