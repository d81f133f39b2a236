"""`npsparse finetune --method lora|pst|sara` on a tiny model with SmolLM2's tokenizer."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_weights, tiny_config

import npsparse
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.prune.patterns import check_nm
from npsparse.sequential import PruneSettings, prune_model
from npsparse.tokenizer import Tokenizer
from npsparse.train import FinetuneSettings, finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("methods")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64,
                         max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    prune_model(root / "dense", root / "p50",
                PruneSettings(method="magnitude", pattern="0.5", nsamples=4, seqlen=64),
                progress=False)
    return root


def small(**changes):
    values = dict(loss="ce", steps=4, seqlen=64, batch=2, lr=1e-2, eval_windows=0,
                  val_windows=2)
    values.update(changes)
    return FinetuneSettings(**values)


def block_weights(path):
    return {name: layer.to_dense() for name, layer in npsparse.load(path).model.linears().items()
            if name != "lm_head"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npsparse.cli", "finetune", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_pst_prunes_a_dense_model_exactly_and_is_deterministic(tiny, tmp_path):
    a = finetune(tiny / "dense", tmp_path / "a", small(method="pst", pattern="0.5", rank=2),
                 progress=False)
    b = finetune(tiny / "dense", tmp_path / "b", small(method="pst", pattern="0.5", rank=2),
                 progress=False)
    assert a["weights_sha256"] == b["weights_sha256"]
    weights = block_weights(tmp_path / "a")
    for name, w in weights.items():
        assert int((w == 0).sum()) == int(0.5 * w.size), name  # exact per matrix
    shapes = [w.shape for w in weights.values()]
    assert a["trainable_parameters"] == sum(5 * (n + k) for n, k in shapes)
    assert a["optimizer_state_bytes"] == 8 * a["trainable_parameters"]  # two float32 moments
    saved = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert saved["method"] == "pst" and saved["pattern"] == "0.5"
    assert saved["mean_layer_sparsity"] == pytest.approx(0.5, abs=0.01)
    # a later fine-tuning of the folder keeps its zeros as the mask
    again = finetune(tmp_path / "a", tmp_path / "again", small(steps=2), progress=False)
    assert again["masked_parameters"] == sum(int(0.5 * w.size) for w in weights.values())


def test_pst_to_2of4_packs_as_nm(tiny, tmp_path):
    from npsparse.packing import pack_model

    finetune(tiny / "dense", tmp_path / "ft", small(method="pst", pattern="2:4", rank=2),
             progress=False)
    for name, w in block_weights(tmp_path / "ft").items():
        assert check_nm(w != 0, 2, 4), name
    pack_model(tmp_path / "ft", tmp_path / "packed", "nm")
    packed = npsparse.load(tmp_path / "packed")
    assert {type(layer).__name__ for name, layer in packed.model.linears().items()
            if name != "lm_head"} == {"NMLinear"}


def test_sara_on_a_pruned_model_keeps_its_zeros_and_trains_few_entries(tiny, tmp_path):
    report = finetune(tiny / "p50", tmp_path / "out", small(method="sara", fraction=0.1),
                      progress=False)
    before, after = block_weights(tiny / "p50"), block_weights(tmp_path / "out")
    changed = 0
    for name, w in after.items():
        np.testing.assert_array_equal(w == 0, before[name] == 0)
        changed += int(np.sum(w != before[name]))
    assert 0 < changed <= report["trainable_parameters"]
    assert report["trainable_parameters"] == sum(int(0.1 * int((w != 0).sum()))
                                                 for w in before.values())
    assert report["optimizer_state_bytes"] == 8 * report["trainable_parameters"]
    assert report["adapter"]["reselected"]["step"] == 2
    assert all("nuclear" in r for r in report["train"])


def test_cli_lora_merges_into_every_weight(tiny, tmp_path):
    result = run_cli(tiny / "dense", "--method", "lora", "--rank", 2, "--loss", "ce", "--steps",
                     3, "--lr", "1e-2", "--seqlen", 64, "--eval-windows", 0, "--val-windows", 1,
                     "--json", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    before, after = block_weights(tiny / "dense"), block_weights(tmp_path / "out")
    assert all(np.any(after[n] != before[n]) for n in before)
    assert summary["method"] == "lora"
    assert summary["trainable_parameters"] == sum(2 * sum(w.shape) for w in before.values())


@pytest.mark.parametrize("extra,message", [
    (["--method", "pst", "--sparsity", "1.5"], "out of range"),
    (["--method", "pst", "--pattern", "3:2"], "impossible"),
    (["--method", "pst"], "needs --sparsity S or --pattern N:M"),
    (["--method", "lora", "--rank", "0"], "--rank must be at least 1"),
    (["--method", "sara", "--fraction", "1.5"], "0 < F < 1"),
    (["--method", "sara", "--fraction", "0"], "0 < F < 1"),
    (["--fraction", "0.1"], "only it takes it"),
    (["--method", "lora", "--rank", "2", "--resume"], "nothing to resume"),
    (["--method", "pst", "--sparsity", "0.5"], "longer than the run: 2 steps never train"),
    (["--warmup", "3"], "--warmup 3 is longer than the run (2 steps)"),
])
def test_bad_method_settings_are_one_line_before_any_model_loads(tmp_path, extra, message):
    result = run_cli(tmp_path / "no-such-model", "--steps", 2, "--out", tmp_path / "out", *extra)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "error:" in last and "Traceback" not in result.stderr
    assert "no-such-model" not in last  # refused before the model was looked at
    assert not (tmp_path / "out").exists()


def test_pst_refuses_a_pruned_folder(tiny, tmp_path):
    result = run_cli(tiny / "p50", "--method", "pst", "--sparsity", 0.5, "--loss", "ce",
                     "--steps", 4, "--seqlen", 64, "--eval-windows", 0, "--out", tmp_path / "o")
    assert result.returncode == 2 and "dense model" in result.stderr
    assert "Traceback" not in result.stderr


RESUMABLE = {
    "lora": ("dense", dict(method="lora", rank=2)),
    "pst": ("dense", dict(method="pst", pattern="2:4", rank=2)),
    "sara": ("p50", dict(method="sara", fraction=0.1)),  # re-selects before step 3 (0-based)
}
TIMINGS = ("seconds", "train_seconds", "train_tokens_per_s", "matmul_gflops", "matmul_fraction",
           "peak_rss_mib")


def without_timings(value):
    """A report with every wall-clock figure removed (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def stop_after(*steps):
    def on_step(record):
        if record["step"] in steps:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_adapter_run_interrupted_twice_and_resumed_equals_uninterrupted(tiny, tmp_path, method):
    """Cut after steps 2 and 4 of 6: before and after SaRA's re-selection, mid-way through PST's
    sparsity ramp."""
    source, changes = RESUMABLE[method]
    settings = small(steps=6, **changes)
    whole = finetune(tiny / source, tmp_path / "whole", settings, progress=False)
    notes = []
    first = finetune(tiny / source, tmp_path / "cut", settings, progress=False,
                     on_step=stop_after(2), log=notes.append)
    assert first == {"interrupted": 2, "resume": str(tmp_path / "cut.resume")}
    assert "--resume" in notes[-1] and not (tmp_path / "cut").exists()
    second = finetune(tiny / source, tmp_path / "cut", settings, resume=True, progress=False,
                      on_step=stop_after(4), log=notes.append)
    assert second["interrupted"] == 4
    done = finetune(tiny / source, tmp_path / "cut", settings, resume=True, progress=False,
                    log=notes.append)
    assert done["weights_sha256"] == whole["weights_sha256"]
    saved = json.loads((tmp_path / "cut" / "finetune.json").read_text())
    expected = json.loads((tmp_path / "whole" / "finetune.json").read_text())
    assert without_timings(saved) == without_timings(expected)
    assert not (tmp_path / "cut.resume").exists()


@pytest.mark.parametrize("changed,name", [(["--method", "sara", "--fraction", "0.1"], "method"),
                                          (["--method", "lora", "--rank", "3"], "rank")])
def test_resuming_with_other_adapter_settings_is_one_line(tiny, tmp_path, changed, name):
    settings = small(steps=4, method="lora", rank=2)
    part = finetune(tiny / "dense", tmp_path / "cut", settings, progress=False,
                    on_step=stop_after(1), log=lambda text: None)
    assert part["interrupted"] == 1
    result = run_cli(tiny / "dense", "--loss", "ce", "--steps", 4, "--seqlen", 64, "--lr", "1e-2",
                     "--eval-windows", 0, "--val-windows", 2, "--out", tmp_path / "cut",
                     "--resume", *changed)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "other settings" in lines[0] and name in lines[0]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "cut.resume").is_dir() and not (tmp_path / "cut").exists()
