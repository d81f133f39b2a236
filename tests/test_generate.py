"""Generation: KV-cache decode equals full recomputation; sampling obeys its settings."""

import numpy as np
import pytest
from helpers import tiny_model
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.generate import check_sampling, generate, sample_token


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {}), ("gpt2", {}), ("opt", {}),
                                        ("opt", {"norm_before": False})])
def test_cached_decode_matches_full_forward(arch, extra):
    model = tiny_model(arch, **extra)
    ids = (np.arange(40) * 7) % model.config.vocab_size
    full = model.forward(ids)  # [40, V]
    cache = model.new_cache(48)
    pieces = [model.forward(ids[:9], cache)]
    pieces += [model.forward(ids[i:i + 1], cache) for i in range(9, 40)]
    incremental = np.concatenate(pieces)
    assert cache.length == 40
    np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_greedy_with_cache_equals_recomputing_everything(arch):
    model = tiny_model(arch, seed=3)
    prompt = np.array([5, 17, 3, 42])
    result = generate(model, prompt, max_new_tokens=20)
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(np.argmax(model.forward(np.array(seq))[-1])))
    assert result.ids == seq[len(prompt):]


def test_sampling_is_deterministic_per_seed():
    model = tiny_model("llama")
    runs = [generate(model, [1, 2, 3], 16, temperature=1.0, top_p=0.95, seed=s).ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # 16 tokens from a flat random model: seeds differ somewhere


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    first = generate(model, [1, 2, 3], 10).ids[0]
    result = generate(model, [1, 2, 3], 10, eos_token_id=first)
    assert result.ids == [first] and result.stopped_at_eos


logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=60)


@given(logit_rows, st.integers(0, 2**32 - 1))
def test_top_k_one_and_tiny_top_p_are_greedy(row, seed):
    logits = np.asarray(row, dtype=np.float32)
    greedy = sample_token(logits, np.random.default_rng(seed))
    assert greedy == int(np.argmax(logits))
    assert sample_token(logits, np.random.default_rng(seed), 1.3, top_k=1) == greedy
    assert sample_token(logits, np.random.default_rng(seed), 1.3, top_p=1e-9) == greedy


@given(logit_rows, st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_sampled_token_is_in_the_top_k(row, k, seed):
    logits = np.asarray(row, dtype=np.float32)
    token = sample_token(logits, np.random.default_rng(seed), 0.7, top_k=k)
    # Among the k largest (ties at the boundary allowed).
    assert logits[token] >= np.sort(logits)[::-1][min(k, len(row)) - 1]


@given(logit_rows, st.floats(0.05, 1.0), st.integers(0, 2**32 - 1))
def test_sampled_token_is_in_the_nucleus(row, p, seed):
    logits = np.asarray(row, dtype=np.float32)
    token = sample_token(logits, np.random.default_rng(seed), 1.0, top_p=p)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    # Everything strictly more likely than the chosen token is in the nucleus too; so the mass of
    # those must be below p.
    assert probs[probs > probs[token]].sum() < p + 1e-9


@pytest.mark.parametrize("temp,k,p", [(-1, 0, 1.0), (float("nan"), 0, 1.0), (1, -2, 1.0),
                                      (1, 0, 0.0), (1, 0, 1.5)])
def test_bad_sampling_settings_are_refused(temp, k, p):
    with pytest.raises(NpsparseError):
        check_sampling(temp, k, p)


def test_empty_prompt_is_refused():
    with pytest.raises(NpsparseError, match="empty"):
        generate(tiny_model("llama"), [], 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
@given(length=st.integers(1, 70), chunk=st.integers(1, 80), cached=st.integers(0, 20))
def test_chunked_prefill_equals_one_forward(arch, length, chunk, cached):
    """Prefill in chunks gives the last position's logits and the cache of one big forward."""
    model = tiny_model(arch)
    ids = (np.arange(cached + length) * 11 + 3) % model.config.vocab_size
    whole, parts = model.new_cache(96), model.new_cache(96)
    if cached:  # continuing after positions already in the cache
        model.forward(ids[:cached], whole), model.forward(ids[:cached], parts)
    expected = model.forward(ids[cached:], whole)[-1]
    logits = model.prefill(ids[cached:], parts, chunk=chunk)
    assert logits.shape == expected.shape and parts.length == whole.length == cached + length
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=2e-5)
    for a, b in zip(parts.k + parts.v, whole.k + whole.v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_context_length_is_a_clear_error():
    model = tiny_model("llama")  # max_position 128
    with pytest.raises(NpsparseError, match="prompt of 100 tokens plus 29 new ones exceeds the "
                                            "model's context of 128"):
        generate(model, np.ones(100, dtype=np.int64), 29)
    assert len(generate(model, np.ones(100, dtype=np.int64), 28).ids) == 28
    from npsparse.evaluate import perplexity

    with pytest.raises(NpsparseError, match="windows of 129 tokens exceed the model's context"):
        perplexity(model, np.ones((1, 129), dtype=np.int64), progress=False)


def test_perplexity_keeps_each_predictions_argmax_on_request():
    """keep_argmax: the most likely token of every predicted position (for paired top-1
    agreement in bench decode), left out of the JSON dict; without it, nothing is kept."""
    from npsparse.evaluate import perplexity

    model = tiny_model("llama", 2)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 9))
    result = perplexity(model, windows, progress=False, keep_argmax=True)
    expected = np.stack([np.argmax(model.forward(w)[:-1], axis=1) for w in windows])
    np.testing.assert_array_equal(result.argmax, expected)
    assert result.argmax.shape == (3, 8) and "argmax" not in result.to_dict()
    plain = perplexity(model, windows, progress=False)
    assert plain.argmax is None and plain.ppl == result.ppl
