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
from npsparse.io.packed import PACKED_FILE, PackedCheckpoint
from npsparse.packing import pack_model
from npsparse.packing import apply_format
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


@pytest.mark.parametrize("fmt", ["bf16", "csr", "bitmask", "panel", "nm", "auto"])
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


def test_panel_folder_round_trip(pruned_dir, tmp_path):
    """pack --format panel through the CLI: the folder holds the layers' arrays as packed and
    loads to the logits of the dense model with the same (bf16) weights."""
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "pack", str(pruned_dir),
                          "--format", "panel", "--out", str(tmp_path / "p"), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    dense = npsparse.load(pruned_dir).model
    assert json.loads(out.stdout)["formats"] == {"panel": len(dense.linears()), "bf16": 1}
    loaded = npsparse.load(tmp_path / "p")
    for name, layer in dense.linears().items():
        got = loaded.model.linears()[name]
        assert type(got) is kernels.PanelLinear
        want = kernels.pack(layer.to_dense(), None, "panel")
        for key, array in want.arrays.items():
            np.testing.assert_array_equal(got.arrays[key], array)
        dense.set_linear(name, DenseLinear(kernels.bf16_round(layer.to_dense())))
    dense.head = DenseLinear(kernels.bf16_round(dense.head.to_dense()))  # the packed head: bf16
    ids = loaded.encode("for i in range(10):\n    print(i)")
    expected = dense.forward(ids)
    np.testing.assert_allclose(loaded.logits(ids), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


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


@pytest.fixture(scope="module")
def packed_llama(tokenizer, tmp_path_factory):
    """A tiny pruned (2:4) llama packed as csr, bitmask, panel and nm: {format: folder}."""
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64)
    for name, layer in model.linears().items():
        weight = layer.to_dense().copy()
        weight[:, (np.arange(weight.shape[1]) % 4) < 2] = 0.0
        model.set_linear(name, DenseLinear(weight))
    root = tmp_path_factory.mktemp("packed")
    write_hf_dir(root / "pruned", model.config, model.state_dict(),
                 tokenizer_json=tokenizer.to_json())
    return {fmt: pack_model(root / "pruned", root / fmt, fmt)["out"]
            for fmt in ("csr", "bitmask", "panel", "nm")}


def _corrupt(source, out, array=None, change=None, table=None):
    """Copy packed folder ``source`` to ``out`` with one stored array or layer-table entry changed."""
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    path = str(out / PACKED_FILE)
    with safe_open(path, "np") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    if array is not None:
        tensors[array] = change(tensors[array].copy())
    if table is not None:
        layers = json.loads(metadata["layers"])
        table(layers)
        metadata["layers"] = json.dumps(layers)
    save_file(tensors, path, metadata=metadata)
    return out


DOWN = "model.layers.0.mlp.down_proj.weight"


def test_out_of_range_row_pointers_are_refused_not_run(packed_llama, tmp_path):
    """They reached the kernels unchecked: generate segfaulted (so: in a subprocess)."""
    def far(row_ptr):
        row_ptr[1:] = 10**12
        return row_ptr

    folder = _corrupt(packed_llama["bitmask"], tmp_path / "bad", DOWN + "::row_ptr", far)
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "generate", str(folder), "-p",
                          "hi", "-n", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, (out.returncode, out.stderr[-500:])
    assert out.stderr.startswith(f"npsparse: error: {folder}: {DOWN}: bitmask array 'row_ptr'")
    assert len(out.stderr.splitlines()) == 1


def _set(index, value):
    def change(array):
        array[index] = value
        return array
    return change


@pytest.mark.parametrize("fmt,array,change,message", [
    ("csr", "row_ptr", _set(-1, 10**9), "'row_ptr' runs from 0 to 1000000000"),
    ("csr", "row_ptr", _set(1, 10**3), "'row_ptr' decreases"),
    ("csr", "row_ptr", lambda a: a[:5], "'row_ptr' has shape [5], expected [33]"),
    ("csr", "cols", lambda a: a + 1000, "'cols' holds columns outside [0, 64)"),
    ("csr", "cols", lambda a: a[:-1], "'cols' has shape"),
    ("bitmask", "masks", lambda a: np.full_like(a, 0xFFFFFFFF), "does not match the number of"),
    ("bitmask", "masks", lambda a: a[:3], "'masks' has shape [3, 2], expected [32, 2]"),
    ("bitmask", "row_ptr", _set(slice(1, None), -5), "'row_ptr' runs from 0 to -5"),
    ("panel", "masks", lambda a: a[:1], "'masks' has shape [1, 32], expected [2, 32]"),
    ("panel", "masks", lambda a: np.full_like(a, 0xFFFFFFFF), "does not match the number of"),
    ("panel", "panel_ptr", _set(-1, 10**9), "'panel_ptr' must rise from 0"),
    ("nm", "values", lambda a: a[:3], "'values' has shape [3, 32], expected [32, 32]"),
    ("nm", "indices", lambda a: a[:, :1], "'indices' has shape [32, 1], expected [32, 8]"),
])
def test_corrupt_packed_arrays_are_refused_in_one_line(packed_llama, tmp_path, fmt, array,
                                                       change, message):
    folder = _corrupt(packed_llama[fmt], tmp_path / "bad", f"{DOWN}::{array}", change)
    with pytest.raises(NpsparseError) as info:
        PackedCheckpoint(folder).weights.layer(DOWN)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("table,message", [
    (lambda t: t[DOWN].pop("shape"), "corrupt packed layer table entry"),
    (lambda t: t[DOWN].update(shape="abc"), "corrupt packed layer table entry"),
    (lambda t: t.update({DOWN: 3}), "corrupt packed layer table entry"),
    (lambda t: t[DOWN].update(hf_shape=[32, 65]), "must hold the same two sizes"),
    (lambda t: t["lm_head.weight"].update(shape="5,32", hf_shape=[5, 32]), "output head has 5"),
])
def test_corrupt_layer_table_is_refused_in_one_line(packed_llama, tmp_path, table, message):
    head = "lm_head.weight::bits"  # cut to 5 rows, so only the vocabulary check can see it
    folder = _corrupt(packed_llama["csr"], tmp_path / "bad", table=table,
                      **(dict(array=head, change=lambda a: a[:5]) if "head" in message else {}))
    with pytest.raises(NpsparseError) as info:
        npsparse.load(folder)
    assert message in str(info.value) and "\n" not in str(info.value)
