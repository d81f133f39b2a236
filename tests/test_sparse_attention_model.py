"""SPT top-L attention inside a model (issue 16): switching blocks, codebooks fitted on
calibration windows, decode against prefill, and ``--attention topk:L`` on the command line."""

import json

import numpy as np
import pytest
from helpers import random_weights, tiny_config, tiny_model, topk_model_and_books

from npsparse.cli import main
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.sparse_attention import (TopkAttention, fit_attention_codebooks, parse_attention,
                                       use_topk_attention)
from npsparse.tokenizer import Tokenizer

T = 24  # window length of the tiny model's tests


@pytest.fixture(scope="module")
def model_and_books():
    return topk_model_and_books()


@pytest.fixture
def ids():
    return np.random.default_rng(7).integers(0, 97, size=T)


def test_codebooks_have_one_per_layer_and_follow_the_seed(model_and_books):
    model, books = model_and_books
    cfg = model.config
    assert len(books) == cfg.n_layers
    assert all(b.shape == (cfg.n_kv_heads, 2, 4, cfg.head_dim // 2) for b in books)
    assert all(b.dtype == np.float32 and np.all(np.isfinite(b)) for b in books)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, T))
    again = fit_attention_codebooks(model, windows, n_sub=2, n_centroids=4, seed=5, iters=5)
    other = fit_attention_codebooks(model, windows, n_sub=2, n_centroids=4, seed=6, iters=5)
    for a, b in zip(books, again):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(books, other))
    # Sub-sampling the rows is seeded too.
    few = fit_attention_codebooks(model, windows, 2, 4, seed=5, iters=5, max_rows=10)
    few_again = fit_attention_codebooks(model, windows, 2, 4, seed=5, iters=5, max_rows=10)
    for a, b in zip(few, few_again):
        np.testing.assert_array_equal(a, b)


def test_top_l_at_the_window_length_is_exact_and_a_small_l_is_not(model_and_books, ids):
    model, books = model_and_books
    exact = model.forward(ids)  # [T, V]
    try:
        use_topk_attention(model, T, books)
        assert all(isinstance(b.attention, TopkAttention) for b in model.blocks)
        np.testing.assert_allclose(model.forward(ids), exact, atol=1e-4, rtol=0)
        use_topk_attention(model, 2, books)
        sparse = model.forward(ids)
        # the first two positions see at most 2 keys: still exact there
        np.testing.assert_allclose(sparse[:2], exact[:2], atol=1e-4, rtol=0)
        assert np.abs(sparse[2:] - exact[2:]).max() > 1e-3
    finally:
        use_topk_attention(model, None)
    assert all(b.attention is None for b in model.blocks)
    np.testing.assert_array_equal(model.forward(ids), exact)


def test_decode_and_chunked_prefill_equal_the_whole_window_under_top_l(model_and_books, ids):
    model, books = model_and_books
    try:
        use_topk_attention(model, 3, books)
        whole = model.forward(ids)  # [T, V]
        cache = model.new_cache(T)
        first = model.forward(ids[:10], cache)  # prefill, then one-token steps
        steps = [model.forward(ids[t:t + 1], cache)[0] for t in range(10, T)]
        np.testing.assert_allclose(first, whole[:10], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.stack(steps), whole[10:], atol=1e-5, rtol=0)
        cache = model.new_cache(T)
        last = model.prefill(ids, cache, chunk=7)
        np.testing.assert_allclose(last, whole[-1], atol=1e-5, rtol=0)
    finally:
        use_topk_attention(model, None)


def test_misuse_is_refused(model_and_books, ids):
    model, books = model_and_books
    with pytest.raises(NpsparseError, match="one codebook per layer"):
        use_topk_attention(model, 4, books[:1])
    with pytest.raises(NpsparseError, match="LLaMA-family"):
        use_topk_attention(tiny_model("gpt2"), 4, books)
    try:  # training through top-L attention: no backward
        use_topk_attention(model, 4, books)
        tape = {}
        x = model.embed(ids, 0)
        out = model.blocks[0](x, 0, tape=tape)
        with pytest.raises(NpsparseError, match="no backward"):
            model.blocks[0].backward(np.ones_like(out), tape)
    finally:
        use_topk_attention(model, None)


def test_parse_attention():
    assert parse_attention("exact") is None and parse_attention("topk:16") == 16
    for bad in ("topk:0", "topk:x", "topk:", "sparse", "topk:-1", "topk:1.5"):
        with pytest.raises(NpsparseError, match="'exact' or 'topk:L'"):
            parse_attention(bad)


@pytest.mark.parametrize("args,message", [
    (["eval", "smollm2", "--attention", "topk:0"], "'exact' or 'topk:L'"),
    (["eval", "smollm2", "--attention", "topk:x"], "'exact' or 'topk:L'"),
    (["generate", "smollm2", "-p", "hi", "--attention", "sparse"], "'exact' or 'topk:L'"),
    (["eval", "smollm2", "--attention", "topk:4", "--pq", "8"], "must be M,C"),
    (["eval", "smollm2", "--pq", "8,16"], "only with --attention topk:L"),
])
def test_cli_attention_errors_are_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npsparse: error:") and message in err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_path):
    """A tiny random llama with SmolLM2's tokenizer: evaluating it costs next to nothing."""
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, max_position=64)
    out = tmp_path_factory.mktemp("topk") / "tiny"
    write_hf_dir(out, config, random_weights(config), tokenizer_json=tokenizer.to_json())
    return out


def test_eval_and_generate_with_top_l_through_the_cli(tiny_dir, capsys):
    common = ["--seqlen", "32", "--windows", "2", "--json"]
    assert main(["eval", str(tiny_dir), *common]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact["attention"] == "exact"
    assert main(["eval", str(tiny_dir), "--attention", "topk:4", "--pq", "4,8", *common]) == 0
    sparse = json.loads(capsys.readouterr().out)
    used = sparse["attention"]
    assert used["kind"] == "topk" and used["keep"] == 4
    assert (used["pq_subspaces"], used["pq_centroids"]) == (4, 8)
    # calibration windows are cut to the model's 64 positions
    assert used["calibration"] == {"data": "pydoc", "windows": 4, "seqlen": 64, "seed": 0}
    assert sparse["tokens"] == exact["tokens"] == 62 and sparse["ppl"] != exact["ppl"]
    assert main(["eval", str(tiny_dir), "--attention", "topk:32", "--seqlen", "32",
                 "--windows", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attention: top-32 keys per query by PQ (M=8, C=16) fitted on 4 "
                               "pydoc calibration windows of 64 tokens (seed 0)")
    printed = float(lines[1].split("perplexity ")[1].split()[0])
    assert printed == pytest.approx(exact["ppl"], rel=1e-6)  # L >= window: the exact perplexity
    assert main(["generate", str(tiny_dir), "-p", "def f", "-n", "3", "--attention", "topk:2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attention"]["keep"] == 2 and len(result["ids"]) >= 3
