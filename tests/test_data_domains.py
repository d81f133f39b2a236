"""A second text domain (standard-library source), mixes of texts, and evaluation per domain."""

import hashlib
import json
import platform

import numpy as np
import pytest
from helpers import random_weights, tiny_config
from numpy.lib.stride_tricks import sliding_window_view

from npsparse import data
from npsparse.calibration import calibration_windows, shares
from npsparse.cli import main
from npsparse.data import STDLIB_FILES, domains, eval_domains, read_text, stdlib_text
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.tokenizer import Tokenizer
from npsparse.train.finetune import eval_texts, training_windows


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(open_checkpoint(smollm2_path))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random llama with SmolLM2's tokenizer: evaluating it costs next to nothing."""
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, max_position=64)
    out = tmp_path_factory.mktemp("domains") / "tiny"
    write_hf_dir(out, config, random_weights(config), tokenizer_json=tokenizer.to_json())
    return out


def contains(stream: np.ndarray, window: np.ndarray) -> bool:
    """Whether ``window`` occurs as consecutive tokens of ``stream``."""
    return bool(np.any(np.all(sliding_window_view(stream, len(window)) == window, axis=1)))


@pytest.mark.skipif(platform.python_version() != data.STDLIB_PYTHON,
                    reason="the stdlib hashes were made with another Python release")
def test_stdlib_text_is_the_pinned_one(tokenizer):
    whole = stdlib_text()
    assert hashlib.sha256(whole.encode()).hexdigest() == data.STDLIB_SHA256
    assert stdlib_text() == whole == read_text("stdlib", "all")
    headers = [line[len("# file: "):] for line in whole.splitlines()
               if line.startswith("# file: ")]
    assert headers == list(STDLIB_FILES) == sorted(STDLIB_FILES)
    # Two disjoint parts split at one file, as the pydoc text is split at one topic.
    ev, calib = stdlib_text("eval"), stdlib_text("calib")
    assert ev + "\n" + calib == whole
    assert calib.startswith(f"# file: {data.STDLIB_SPLIT_PATH}\n")
    assert f"# file: {data.STDLIB_SPLIT_PATH}\n" not in ev
    # About as long as the pydoc text (112,955 tokens), and like it 40 windows of 512 into its
    # eval part, the eval tokens are the whole text's.
    tokens = tokenizer.encode(whole)
    assert len(tokens) == 113_822
    np.testing.assert_array_equal(tokenizer.encode(ev)[:40 * 512], tokens[:40 * 512])


def test_a_changed_file_is_named_unless_unchecked(monkeypatch):
    read = data._stdlib_source

    def edited(path):
        return read(path) + ("# edited\n" if path in ("json/encoder.py", "textwrap.py") else "")

    monkeypatch.setattr(data, "_stdlib_source", edited)
    with pytest.raises(NpsparseError) as err:
        read_text("stdlib", "eval")  # the eval part is unchanged, but the text is checked whole
    message = str(err.value)
    assert "\n" not in message and "json/encoder.py differs" in message
    assert f"Python {data.STDLIB_PYTHON}" in message and "stdlib-unchecked" in message
    assert "# edited" in read_text("stdlib-unchecked", "calib")
    assert "# edited" in stdlib_text("all", check=False)


def test_a_missing_file_is_one_line(monkeypatch):
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": "/no/such/lib"})
    with pytest.raises(NpsparseError, match="cannot read /no/such/lib/abc.py") as err:
        stdlib_text(check=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source,message", [
    ("pydoc+nope", "'nope' is not a named text"),
    ("pydoc+pydoc", "named twice"),
    ("notes.txt+stdlib", "only named texts mix"),
])
def test_bad_mixes_are_refused(source, message):
    with pytest.raises(NpsparseError, match=message):
        domains(source)


def test_domains_and_eval_domains():
    assert domains("pydoc+stdlib") == ["pydoc", "stdlib"] and domains("pydoc") == ["pydoc"]
    assert eval_domains(["pydoc,stdlib", "stdlib+pydoc"]) == ["pydoc", "stdlib"]
    assert eval_texts("stdlib-unchecked") == ["pydoc", "stdlib-unchecked"]
    assert eval_texts("notes.txt") == ["pydoc"]
    assert shares(7, 2) == [4, 3] and shares(1, 2) == [1, 0]


def test_mixed_calibration_takes_turns_and_follows_the_seed(tokenizer):
    vocab = tokenizer.vocab_size
    mixed = calibration_windows("pydoc+stdlib", tokenizer, vocab, nsamples=5, seqlen=24, seed=3)
    again = calibration_windows("pydoc+stdlib", tokenizer, vocab, nsamples=5, seqlen=24, seed=3)
    other = calibration_windows("pydoc+stdlib", tokenizer, vocab, nsamples=5, seqlen=24, seed=4)
    np.testing.assert_array_equal(mixed, again)
    assert mixed.shape == (5, 24) and mixed.dtype == np.int64 and np.any(mixed != other)
    pydoc = tokenizer.encode(read_text("pydoc", "calib"))
    stdlib = tokenizer.encode(read_text("stdlib", "calib"))
    assert [contains(pydoc, row) for row in mixed] == [True, False, True, False, True]
    assert [contains(stdlib, row) for row in mixed] == [False, True, False, True, False]
    # One text alone draws as it always has: one generator, nsamples starts.
    starts = np.random.default_rng(3).integers(0, len(pydoc) - 24 + 1, size=5)
    expected = np.stack([pydoc[s:s + 24] for s in starts])
    np.testing.assert_array_equal(
        calibration_windows("pydoc", tokenizer, vocab, nsamples=5, seqlen=24, seed=3), expected)


def test_mixed_training_windows_are_an_equal_share(tokenizer):
    mixed = training_windows("pydoc+stdlib", tokenizer, tokenizer.vocab_size, 512)
    pydoc = training_windows("pydoc", tokenizer, tokenizer.vocab_size, 512)
    stdlib = training_windows("stdlib", tokenizer, tokenizer.vocab_size, 512)
    share = min(len(pydoc), len(stdlib))
    assert mixed.shape == (2 * share, 512)
    np.testing.assert_array_equal(mixed[0::2], pydoc[:share])
    np.testing.assert_array_equal(mixed[1::2], stdlib[:share])


def test_eval_prints_one_line_per_domain(tiny_dir, capsys):
    common = ["--seqlen", "32", "--windows", "2"]
    assert main(["eval", str(tiny_dir), "--data", "pydoc", "stdlib", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tiny on pydoc", "tiny on stdlib"]
    assert all("over 2 windows of 32 tokens = 62 predictions" in line for line in lines)
    assert main(["eval", str(tiny_dir), "--data", "pydoc,stdlib", "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [d["data"] for d in result["domains"]] == ["pydoc", "stdlib"]
    assert all(d["windows"] == 2 and d["tokens"] == 62 for d in result["domains"])
    assert result["domains"][0]["ppl"] != result["domains"][1]["ppl"]
    # One text keeps the output it always had.
    assert main(["eval", str(tiny_dir), "--data", "stdlib", "--json", *common]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["data"] == "stdlib" and single["ppl"] == result["domains"][1]["ppl"]


@pytest.mark.parametrize("args,message", [
    (["eval", "{tiny}", "--data", "pydoc+nope"], "'nope' is not a named text"),
    (["eval", "{tiny}", "--data", "pydoc,nope"], "nope: no such file, nor a named text"),
    (["prune", "{tiny}", "--method", "wanda", "--sparsity", "0.5", "--calib", "stdlib+x",
      "--out", "{tmp}/o"], "'x' is not a named text"),
    (["finetune", "{tiny}", "--steps", "1", "--data", "stdlib+stdlib", "--out", "{tmp}/o"],
     "named twice"),
])
def test_bad_text_names_are_one_line_and_exit_2(tiny_dir, tmp_path, capsys, args, message):
    args = [a.replace("{tiny}", str(tiny_dir)).replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_finetune_reports_perplexity_per_domain(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", str(tiny_dir), "--loss", "ce", "--steps", "1", "--batch", "1",
                 "--seqlen", "32", "--eval-windows", "1", "--val-windows", "1",
                 "--data", "pydoc+stdlib", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "finetune.json").read_text())
    by_domain = report["ppl_by_domain"]
    assert list(by_domain) == ["pydoc", "stdlib"] and report["data"]["source"] == "pydoc+stdlib"
    # pydoc's figures stay where they always were.
    assert by_domain["pydoc"] == {"before": report["ppl_before"], "after": report["ppl_after"]}
    assert all(r[when]["windows"] == 1 and r[when]["seqlen"] == 32
               for r in by_domain.values() for when in ("before", "after"))
    assert by_domain["stdlib"]["before"]["ppl"] != by_domain["pydoc"]["before"]["ppl"]
    assert summary["ppl_by_domain"]["stdlib"] == {"before": by_domain["stdlib"]["before"]["ppl"],
                                                  "after": by_domain["stdlib"]["after"]["ppl"]}
