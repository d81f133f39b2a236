"""The block-by-block pruning driver and `npsparse prune` on small models."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_model

import npsparse
import npsparse.sequential as seq
from npsparse.calibration import calibration_shape, calibration_windows
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.prune import check_nm
from npsparse.sequential import PruneSettings, prune_model
from npsparse.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(open_checkpoint(smollm2_path))


def _tiny_dir(arch, tmp_path_factory, tokenizer):
    model = tiny_model(arch, vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64,
                       max_position=256)
    out = tmp_path_factory.mktemp(arch) / "model"
    write_hf_dir(out, model.config, model.state_dict(), tokenizer_json=tokenizer.to_json())
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt"])
def any_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model of each architecture with SmolLM2's tokenizer."""
    return _tiny_dir(request.param, tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return _tiny_dir("llama", tmp_path_factory, tokenizer)


def small(method, pattern, **extra):
    return PruneSettings(method=method, pattern=pattern, nsamples=4, seqlen=64, **extra)


@pytest.mark.parametrize("method,base,pattern", [
    ("magnitude", None, "0.5"), ("wanda", None, "0.6"), ("sparsegpt", None, "2:4"),
    ("dsnot", "wanda", "0.5"), ("dsnot", "sparsegpt", "4:8"),
])
def test_prune_writes_a_loadable_sparse_model(any_dir, tmp_path, method, base, pattern):
    tiny_dir = any_dir
    report = prune_model(tiny_dir, tmp_path / "out",
                         small(method, pattern, base=base, error_report=True), progress=False)
    llm = npsparse.load(tmp_path / "out")
    original = npsparse.load(tiny_dir)
    # Exactly the linear layers of the blocks are pruned, to the requested pattern.
    for name, layer in llm.model.linears().items():
        weight = layer.to_dense()
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            assert check_nm(weight != 0, n, m), name
        else:
            per_row = (weight == 0).sum(axis=1)
            if method == "magnitude":
                assert (weight == 0).sum() == int(weight.size * float(pattern))
            elif method != "sparsegpt":
                assert np.all(per_row == int(weight.shape[1] * float(pattern))), name
        assert report["layers"][name]["recon_error"] >= 0
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        if name in original.model.outer_state():
            np.testing.assert_array_equal(llm.model.outer_state()[name],
                                          original.model.outer_state()[name])
    saved = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert saved["settings"]["method"] == method and saved["calibration"]["windows"] == 4
    assert np.isfinite(llm.perplexity(windows=1, seqlen=64).ppl)


def test_magnitude_reads_no_calibration_unless_asked(tiny_dir, tmp_path, monkeypatch):
    """Magnitude pruning needs no data: by default it runs no calibration forward at all."""
    measured = prune_model(tiny_dir, tmp_path / "a", small("magnitude", "0.5", error_report=True),
                           progress=False)
    monkeypatch.setattr(seq, "calibration_windows", lambda *a, **k: pytest.fail("calibrated"))
    monkeypatch.setattr(seq, "collect_block_stats", lambda *a, **k: pytest.fail("calibrated"))
    quick = prune_model(tiny_dir, tmp_path / "b", small("magnitude", "0.5"), progress=False)
    assert quick["weights_sha256"] == measured["weights_sha256"]
    assert quick["calibration"] is None and quick["settings"]["error_report"] is False
    assert all("recon_rel" not in v for v in quick["layers"].values())
    assert all(v["recon_rel"] > 0 for v in measured["layers"].values())
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "prune", str(tiny_dir), "--method",
                          "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "no reconstruction error measured" in out.stdout, out.stderr


def test_pruning_is_deterministic(any_dir, tmp_path):
    tiny_dir = any_dir
    first = prune_model(tiny_dir, tmp_path / "a", small("sparsegpt", "0.5"), progress=False)
    second = prune_model(tiny_dir, tmp_path / "b", small("sparsegpt", "0.5"), progress=False)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["calibration"]["token_sha256"] == second["calibration"]["token_sha256"]
    a = npsparse.open_checkpoint(tmp_path / "a").weights
    b = npsparse.open_checkpoint(tmp_path / "b").weights
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_interrupted_prune_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import npsparse.sequential as seq

    calls = {"n": 0}
    real = seq.prune_layer

    def fail_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(seq, "prune_layer", fail_later)
    with pytest.raises(KeyboardInterrupt):
        prune_model(tiny_dir, tmp_path / "out", small("wanda", "0.5"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pinned_calibration_tokens(tiny_dir, tmp_path, tokenizer):
    ids = calibration_windows("pydoc", tokenizer, tokenizer.vocab_size, nsamples=4, seqlen=64)
    np.save(tmp_path / "calib.npy", ids)
    pinned = prune_model(tiny_dir, tmp_path / "p", small("wanda", "0.5", calib=str(tmp_path / "calib.npy")),
                         progress=False)
    drawn = prune_model(tiny_dir, tmp_path / "d", small("wanda", "0.5"), progress=False)
    assert pinned["weights_sha256"] == drawn["weights_sha256"]


def test_cli_records_the_pinned_windows_shape(tiny_dir, tmp_path):
    """Without --nsamples/--seqlen, a .npy file's own shape is what runs and what is recorded."""
    np.save(tmp_path / "calib.npy", np.arange(3 * 24, dtype=np.int64).reshape(3, 24) % 100)
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "prune", str(tiny_dir), "--method",
                          "wanda", "--sparsity", "0.5", "--calib", str(tmp_path / "calib.npy"),
                          "--out", str(tmp_path / "o"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "o" / "pruning.json").read_text())
    assert (report["settings"]["nsamples"], report["settings"]["seqlen"]) == (3, 24)
    assert (report["calibration"]["windows"], report["calibration"]["seqlen"]) == (3, 24)


def test_a_pinned_file_shape_is_checked_by_the_library(tiny_dir, tmp_path, tokenizer):
    """The library, not only the CLI, refuses an explicit shape that a .npy file contradicts,
    before any model loads, and fills in the file's own shape when none is given."""
    path = tmp_path / "calib.npy"
    np.save(path, np.ones((3, 24), dtype=np.int64))
    assert calibration_shape(path) == (3, 24)
    assert calibration_shape(path, 3, 24) == (3, 24)
    assert calibration_shape("pydoc") == (32, 512)
    with pytest.raises(NpsparseError, match="holds 3 windows of 24 tokens, so nsamples 4"):
        calibration_windows(path, tokenizer, tokenizer.vocab_size, nsamples=4)
    with pytest.raises(NpsparseError, match="so seqlen 64 cannot apply"):
        prune_model(tmp_path / "no-model-needed", tmp_path / "o",
                    PruneSettings(method="wanda", pattern="0.5", calib=str(path), seqlen=64),
                    progress=False)
    assert calibration_windows(path, tokenizer, tokenizer.vocab_size).shape == (3, 24)


def test_calibration_text_is_disjoint_from_eval_text(tokenizer):
    ids = calibration_windows("pydoc", tokenizer, tokenizer.vocab_size, nsamples=8, seqlen=128)
    text = npsparse.pydoc_text("eval")
    for window in ids[:3]:
        snippet = tokenizer.decode(window[10:40])
        assert snippet not in text


@pytest.mark.parametrize("args,message", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity 1.5 is out of range"),
    (["--method", "wanda", "--pattern", "3:2"], "pattern 3:2 is impossible"),
    (["--method", "wanda", "--pattern", "2:5"], "not divisible by M=5"),
    (["--method", "dsnot", "--sparsity", "0.5"], "DSnoT needs --base"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "{empty}"], "the file is empty"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "{bad_npy}"], "token ids must lie in"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "{short_npy}"],
     "holds 2 windows of 16 tokens, so seqlen 32 cannot apply"),
    (["--method", "wanda"], "give exactly one of --sparsity"),
])
def test_prune_user_errors(tiny_dir, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    np.save(tmp_path / "bad.npy", np.full((2, 32), 10**9))
    np.save(tmp_path / "short.npy", np.ones((2, 16), dtype=np.int64))
    args = [a.replace("{empty}", str(tmp_path / "empty.txt"))
            .replace("{bad_npy}", str(tmp_path / "bad.npy"))
            .replace("{short_npy}", str(tmp_path / "short.npy")) for a in args]
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "prune", str(tiny_dir), *args,
                          "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_owl_spreads_sparsity_around_the_target(tiny_dir, tmp_path):
    report = prune_model(tiny_dir, tmp_path / "o", small("wanda", "0.5", owl=True), progress=False)
    targets = [b["target_sparsity"] for b in report["blocks"]]
    assert abs(np.mean(targets) - 0.5) < 1e-9
    assert report["owl_outlier_ratios"] is not None


def test_owl_with_nm_is_refused(tiny_dir, tmp_path):
    with pytest.raises(NpsparseError, match="OWL"):
        prune_model(tiny_dir, tmp_path / "o", small("wanda", "2:4", owl=True), progress=False)


def test_a_new_method_is_one_registry_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """A toy method (prune the first columns), registered by one decorator line, runs through
    the pruner and the command line with the statistic it asks for."""
    from npsparse import prune
    from npsparse.cli import main

    monkeypatch.setattr(prune, "METHODS", dict(prune.METHODS))  # undone after the test

    @prune.register_method("lastcols", ("sq",))
    def lastcols(weight, stats, pattern, options):
        mask = np.zeros(weight.shape, dtype=bool)
        mask[:, int(round(weight.shape[1] * pattern.sparsity)):] = True
        assert stats.sq_norm.shape == (weight.shape[1],)  # the statistic it asked for
        return np.where(mask, weight, 0).astype(np.float32), mask, {}

    assert main(["prune", str(tiny_dir), "--method", "lastcols", "--sparsity", "0.25",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o")]) == 0
    assert "pruned" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "pruning.json").read_text())
    assert report["settings"]["method"] == "lastcols"
    assert all(v["sparsity"] == 0.25 and v["recon_rel"] > 0 for v in report["layers"].values())
    with pytest.raises(SystemExit):  # and --base is refused for it, like for any non-DSnoT method
        main(["prune", str(tiny_dir), "--method", "lastcols", "--base", "lastcols",
              "--sparsity", "0.5", "--out", str(tmp_path / "p")])


def test_layers_prunes_only_the_chosen_ones(tiny_dir, tmp_path):
    """--layers: the chosen layers are pruned to the pattern, every other tensor is the loaded
    one, bit for bit; choosing every layer is the same run as choosing none."""
    report = prune_model(tiny_dir, tmp_path / "mlp1",
                         small("sparsegpt", "0.5", layers=["model.layers.1.mlp.*"]),
                         progress=False)
    chosen = {f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(report["layers"]) == chosen
    pruned, original = npsparse.load(tmp_path / "mlp1"), npsparse.load(tiny_dir)
    for name, layer in pruned.model.linears().items():
        weight, before = layer.to_dense(), original.model.linears()[name].to_dense()
        if name in chosen:
            assert (weight == 0).mean() >= 0.5, name  # SparseGPT's mask is per 128 columns
        else:
            np.testing.assert_array_equal(weight, before)
    every = prune_model(tiny_dir, tmp_path / "all", small("sparsegpt", "0.5", layers=["*"]),
                        progress=False)
    default = prune_model(tiny_dir, tmp_path / "none", small("sparsegpt", "0.5"), progress=False)
    assert every["weights_sha256"] == default["weights_sha256"]
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "prune", str(tiny_dir), "--method",
                          "magnitude", "--sparsity", "0.5", "--layers", "model.layers.1",
                          "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "(7 layers)" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "prune", str(tiny_dir), "--method",
                          "wanda", "--sparsity", "0.5", "--layers", "model.layers.9.mlp.*",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "no linear layer matches 'model.layers.9.mlp.*'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
