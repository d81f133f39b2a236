"""SmolLM2-135M-Instruct (the embedded GGUF) against transformers float32 (tests/data).

The reference logits and perplexity were made by tests/oracle/make_golden.py: transformers loads
the same GGUF (dequantizing with gguf and undoing llama.cpp's Q/K permutation itself) and runs it
in float32 with eager attention on the llama.cpp token stream of the pydoc text.
"""

import json

import numpy as np
import pytest
from conftest import DATA

import npsparse
from npsparse.data import windows
from npsparse.evaluate import perplexity
from npsparse.generate import generate


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return npsparse.load(smollm2_path)


@pytest.fixture(scope="module")
def golden():
    return np.load(DATA / "smollm2_logits_golden.npz")


def test_logits_match_transformers(llm, golden):
    logits = llm.logits(golden["ids"])  # [32, V]
    last = golden["last_logits"]
    rel = np.abs(logits[-1] - last).max() / np.abs(last).max()
    assert rel <= 1e-4
    subset = logits[:, golden["vocab_idx"]]
    expected = golden["logits_subset"]
    assert np.abs(subset - expected).max() / np.abs(expected).max() <= 1e-4
    np.testing.assert_array_equal(logits.argmax(-1), golden["argmax"])


def test_greedy_continuation_matches_transformers(llm, golden):
    result = generate(llm.model, golden["ids"], 16)
    assert result.ids == golden["greedy16"].tolist()


def test_cached_greedy_equals_full_recompute(llm, golden):
    prompt = list(golden["ids"][:8])
    cached = generate(llm.model, prompt, 12).ids
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(np.argmax(llm.model.forward(np.array(seq))[-1])))
    assert cached == seq[8:]


@pytest.mark.slow
def test_perplexity_40_windows_within_0_1_percent(llm):
    """The headline figure: first 40 windows x 512 tokens of the pydoc text."""
    ref = json.loads((DATA / "smollm2_ppl_golden.json").read_text())
    result = llm.perplexity("pydoc", 512, 40)
    assert result.windows == 40 and result.tokens == 40 * 511
    assert abs(result.ppl / ref["ppl"] - 1) <= 1e-3
    # Window by window too: each mean NLL within 1e-4 nats.
    np.testing.assert_allclose(result.window_nll, ref["window_nll"], atol=1e-4)


def test_eval_windows_are_the_whole_texts_first_windows(llm):
    stream = np.load(DATA / "smollm2_tokens_llamacpp.npy").astype(np.int64)
    np.testing.assert_array_equal(llm.eval_windows("pydoc", 512, 40), windows(stream, 512, 40))


def test_perplexity_is_deterministic(llm):
    ids = llm.eval_windows("pydoc", 128, 2)
    first = perplexity(llm.model, ids, progress=False)
    second = perplexity(llm.model, ids, progress=False)
    assert first.nll == second.nll and first.window_nll == second.window_nll
