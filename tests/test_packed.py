"""Packed folders (npsparse pack): saved layers load without repacking and give the same logits."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_model

import npsparse
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.linear import DenseLinear
from npsparse import kernels
from npsparse.packed import PACKED_FILE, PackedCheckpoint, pack_model
from npsparse.sparse import apply_format
from npsparse.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(open_checkpoint(smollm2_path))


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "opt"])
def pruned_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model of each architecture, every block linear pruned 2:4 (so every format,
    N:M included, can hold it), written as a Hugging Face folder."""
    model = tiny_model(request.param, vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64)
    for name, layer in model.linears().items():
        weight = layer.to_dense().copy()
        weight[:, (np.arange(weight.shape[1]) % 4) < 2] = 0.0
        model.set_linear(name, DenseLinear(weight))
    out = tmp_path_factory.mktemp(request.param) / "pruned"
    write_hf_dir(out, model.config, model.state_dict(), tokenizer_json=tokenizer.to_json())
    return out


@pytest.mark.parametrize("fmt", ["bf16", "csr", "bitmask", "nm", "auto"])
def test_packed_folder_equals_packing_in_memory(pruned_dir, tmp_path, fmt, monkeypatch):
    report = pack_model(pruned_dir, tmp_path / "packed", fmt)
    assert report["formats"] and report["head"] == "BF16Linear"
    expected = npsparse.load(pruned_dir)
    apply_format(expected.model, fmt)
    stored = PackedCheckpoint(tmp_path / "packed").weights
    for cls in kernels.FORMATS.values():  # loading must not repack anything
        if hasattr(cls, "pack"):
            monkeypatch.setattr(cls, "pack", classmethod(lambda *a, **k: pytest.fail("repacked")))
    loaded = npsparse.load(tmp_path / "packed")
    for (name, got), want in zip(loaded.model.linears().items(),
                                 expected.model.linears().values()):
        assert type(got) is type(want), name
        file_layer = stored.layer(name + ".weight")  # the arrays as the file holds them
        for key, array in got.arrays.items():
            np.testing.assert_array_equal(array, file_layer.arrays[key])
    assert type(loaded.model.head) is type(expected.model.head)
    assert loaded.model.weight_bytes() == expected.model.weight_bytes()
    ids = loaded.encode("def area(r):\n    return 3.14159 * r ** 2")
    np.testing.assert_array_equal(loaded.logits(ids), expected.logits(ids))


def test_float32_head_is_kept(pruned_dir, tmp_path):
    pack_model(pruned_dir, tmp_path / "packed", "bitmask", head="dense")
    loaded = npsparse.load(tmp_path / "packed")
    expected = npsparse.load(pruned_dir)
    apply_format(expected.model, "bitmask", head="dense")
    assert isinstance(loaded.model.head, DenseLinear)
    ids = loaded.encode("x = [1, 2, 3]")
    np.testing.assert_array_equal(loaded.logits(ids), expected.logits(ids))


def test_bad_packed_folders_fail_clearly(pruned_dir, tmp_path):
    folder = tmp_path / "packed"
    pack_model(pruned_dir, folder, "csr")
    data = (folder / PACKED_FILE).read_bytes()
    (folder / PACKED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(NpsparseError, match="truncated"):
        npsparse.load(folder)

    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(folder / PACKED_FILE),
              metadata={"npsparse_packed": "99"})
    with pytest.raises(NpsparseError, match="schema '99'"):
        npsparse.load(folder)


def test_pack_cli_json_and_one_line_errors(pruned_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "npsparse.cli", "pack", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    out = run(pruned_dir, "--format", "bitmask", "--out", tmp_path / "p", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["formats"]["bitmask"] == len(npsparse.load(pruned_dir).model.linears())
    assert json.loads((tmp_path / "p" / "packed.json").read_text())["format"] == "bitmask"

    dense_dir = tmp_path / "dense"  # no N:M zeros: packing as nm must fail, leaving nothing
    model = npsparse.load(pruned_dir)
    for name, layer in model.model.linears().items():
        model.model.set_linear(name, DenseLinear(layer.to_dense() + 1.0))
    write_hf_dir(dense_dir, model.config, model.model.state_dict(),
                 tokenizer_json=model.tokenizer.to_json())
    out = run(dense_dir, "--format", "nm", "--out", tmp_path / "nm")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "2:4 or 4:8" in lines[0], out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "p"]
