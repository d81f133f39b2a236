"""Checkpoint readers and writers: round trips, the Q/K un-permutation, and clear errors."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_weights, tiny_config, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.io.gguf_file import hf_name, unpermute_qk
from npsparse.io.hf_dir import bf16_to_f32
from npsparse.models import build_model


def llamacpp_permute(w, n_heads):
    """The forward permutation as llama.cpp's converter describes it: each head's rows, viewed as
    [2, hd/2] (rotate-half halves), are interleaved into pairs."""
    rows = w.shape[0]
    hd = rows // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


@given(st.integers(1, 4), st.sampled_from([2, 4, 8]), st.integers(1, 5))
def test_unpermute_inverts_llamacpp_permutation(n_heads, hd, cols):
    w = np.arange(n_heads * hd * cols, dtype=np.float32).reshape(n_heads * hd, cols)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, n_heads), n_heads), w)


def test_gguf_names_map_to_hf_names():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None


def test_bf16_widening_is_exact():
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 1e-40], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32) >> 16, bits)
    np.testing.assert_array_equal(bf16_to_f32(bits)[:6], values[:6])


def _write_tiny(path, arch="llama", **changes):
    config = tiny_config(arch, **changes)
    weights = random_weights(config)
    model = build_model(config, weights)
    write_hf_dir(path, config, model.state_dict(), tokenizer_json=None)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_hf_directory_round_trip(tmp_path, arch):
    model = _write_tiny(tmp_path / "m", arch)
    loaded = open_checkpoint(tmp_path / "m")
    assert loaded.config == model.config
    again = build_model(loaded.config, loaded.weights)
    ids = np.arange(12)
    np.testing.assert_array_equal(again.forward(ids), model.forward(ids))


def test_bf16_safetensors_load(tmp_path):
    """A hand-written bf16 safetensors file (header + raw uint16) loads as the widened values."""
    model = _write_tiny(tmp_path / "m", "llama")
    state = model.state_dict()
    header, blobs, offset = {}, [], 0
    for name, array in state.items():
        bits = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype("<u2")
        header[name] = {"dtype": "BF16", "shape": list(array.shape),
                        "data_offsets": [offset, offset + bits.nbytes]}
        blobs.append(bits.tobytes())
        offset += bits.nbytes
    raw = json.dumps(header).encode()
    (tmp_path / "m" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    loaded = open_checkpoint(tmp_path / "m").weights
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (state[name].view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(loaded[name], expected)


def test_writer_is_atomic(tmp_path, monkeypatch):
    """An interrupted write leaves neither the output folder nor a temporary folder behind."""
    config = tiny_config("llama")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        write_hf_dir(tmp_path / "out", config, random_weights(config), tokenizer_json=None)
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_existing_output(tmp_path):
    config = tiny_config("llama")
    report = {"pruning.json": json.dumps({"npsparse_pruning": 1})}
    write_hf_dir(tmp_path / "m", config, random_weights(config), tokenizer_json=None,
                 extra_files=report)
    model = _write_tiny(tmp_path / "m", "gpt2")
    assert open_checkpoint(tmp_path / "m").config == model.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("report", [
    None,  # a user's own Hugging Face folder: the same file names npsparse writes
    ("pruning.json", "not json"),
    ("pruning.json", '["npsparse_pruning"]'),
    ("packed.json", '{"npsparse_pruning": 1}'),  # another report's marker
    ("finetune.json", '{"source": "x"}'),
])
def test_a_folder_npsparse_did_not_write_is_never_replaced(tmp_path, report):
    """File names prove nothing: replacing needs the report file with its own npsparse marker."""
    from npsparse.io.hf_dir import check_output_folder

    config = tiny_config("llama")
    mine = tmp_path / "mine"
    extra = dict([report]) if report else {}
    write_hf_dir(mine, config, random_weights(config), tokenizer_json="{}", extra_files=extra)
    before = sorted((p.name, p.read_bytes()) for p in mine.iterdir())
    with pytest.raises(NpsparseError, match="npsparse did not write it") as info:
        write_hf_dir(mine, config, random_weights(config), tokenizer_json=None)
    assert "\n" not in str(info.value)
    with pytest.raises(NpsparseError, match="npsparse did not write it"):
        check_output_folder(mine)
    assert sorted((p.name, p.read_bytes()) for p in mine.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("name,marker", [("pruning.json", "npsparse_pruning"),
                                         ("packed.json", "npsparse_packed"),
                                         ("finetune.json", "npsparse_finetune")])
def test_each_npsparse_report_makes_a_folder_replaceable(tmp_path, name, marker):
    from npsparse.io.hf_dir import check_output_folder

    config = tiny_config("llama")
    write_hf_dir(tmp_path / "m", config, random_weights(config), tokenizer_json=None,
                 extra_files={name: json.dumps({marker: 1})})
    assert check_output_folder(tmp_path / "m") == tmp_path / "m"


def test_output_inside_or_equal_to_the_input_is_refused(tmp_path):
    """The input's own pruning.json would make it replaceable: the input check comes first."""
    from npsparse.io.hf_dir import check_output_folder

    config = tiny_config("llama")
    model = tmp_path / "model"
    write_hf_dir(model, config, random_weights(config), tokenizer_json=None,
                 extra_files={"pruning.json": json.dumps({"npsparse_pruning": 1})})
    for out in (model, model / "sub", tmp_path / "." / "model", tmp_path):
        with pytest.raises(NpsparseError, match="input") as info:
            check_output_folder(out, inputs=["smollm2", model])
        assert "\n" not in str(info.value)
    assert check_output_folder(tmp_path / "other", inputs=[model]) == tmp_path / "other"


def test_prune_and_pack_refuse_their_input_folder_as_output(tmp_path, monkeypatch):
    from npsparse import packing, sequential

    config = tiny_config("llama")
    model = tmp_path / "model"
    write_hf_dir(model, config, random_weights(config), tokenizer_json=None)
    before = sorted(p.name for p in model.iterdir())

    def no_work(*args, **kwargs):
        raise AssertionError("the output should have been refused before loading anything")

    monkeypatch.setattr(sequential, "open_checkpoint", no_work)
    monkeypatch.setattr(packing, "load", no_work)
    for out in (model, model / "pruned"):
        with pytest.raises(NpsparseError, match="would delete the input"):
            sequential.prune_model(model, out,
                                   sequential.PruneSettings(method="magnitude", pattern="0.5"))
        with pytest.raises(NpsparseError, match="would delete the input"):
            packing.pack_model(model, out, "bitmask")
    assert sorted(p.name for p in model.iterdir()) == before


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path):
    """A killed run's temporary folder goes at the next write; a live process's stays."""
    from npsparse.io.output import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    stale = [tmp_path / f".out.partial-{host}-{dead.pid}-abc_1234",
             tmp_path / f".out.old-{host}-{dead.pid}"]
    kept = [tmp_path / f".out.partial-{host}-{os.getpid()}-xyz",  # alive (this process)
            tmp_path / f".out.partial-otherhost-{dead.pid}-abc",  # another machine's
            tmp_path / f".other.partial-{host}-{dead.pid}-abc"]  # another output's
    for folder in stale + kept:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    config = tiny_config("llama")
    write_hf_dir(tmp_path / "out", config, random_weights(config), tokenizer_json=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [p.name for p in kept])


def test_writer_refuses_to_replace_what_it_did_not_write(tmp_path):
    """Replacing an output deletes it: a folder with anything else in it is refused, untouched."""
    config = tiny_config("llama")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("keep me")
    (project / "config.json").write_text("{}")
    for target in (project, tmp_path / "project" / "notes.txt"):
        with pytest.raises(NpsparseError) as info:
            write_hf_dir(target, config, random_weights(config), tokenizer_json=None)
        assert "\n" not in str(info.value) and "choose another output path" in str(info.value)
    assert (project / "notes.txt").read_text() == "keep me" and (project / "src").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    write_hf_dir(empty, config, random_weights(config), tokenizer_json=None)
    assert (empty / "model.safetensors").is_file()


def test_prune_and_pack_refuse_a_foreign_output_before_working(tmp_path, monkeypatch):
    from npsparse import packing, sequential

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")

    def no_work(*args, **kwargs):
        raise AssertionError("the output should have been refused before loading anything")

    monkeypatch.setattr(sequential, "open_checkpoint", no_work)
    monkeypatch.setattr(packing, "load", no_work)
    with pytest.raises(NpsparseError, match="thesis.tex"):
        sequential.prune_model("smollm2", folder,
                               sequential.PruneSettings(method="magnitude", pattern="0.5"))
    with pytest.raises(NpsparseError, match="thesis.tex"):
        packing.pack_model("smollm2", folder, "bitmask")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def _error(path) -> str:
    with pytest.raises(NpsparseError) as info:
        ck = open_checkpoint(path)
        build_model(ck.config, ck.weights)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file():
    assert "no such file" in _error("/nonexistent/model.gguf")


def test_not_a_model(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello world")
    assert "neither a GGUF file" in _error(tmp_path / "x.bin")


def test_truncated_gguf(tmp_path, smollm2_path):
    data = smollm2_path.read_bytes()
    for cut in (100, 2_000_000, len(data) - 1000):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        assert str(tmp_path / "t.gguf") in _error(tmp_path / "t.gguf")


def test_missing_tensor_and_bad_shape(tmp_path):
    model = _write_tiny(tmp_path / "m", "llama")
    state = model.state_dict()
    from safetensors.numpy import save_file

    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight is missing" in _error(tmp_path / "m")
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert "has shape [3, 3], expected" in _error(tmp_path / "m")


def test_nan_weights_are_refused(tmp_path):
    model = _write_tiny(tmp_path / "m", "llama")
    state = model.state_dict()
    state["model.norm.weight"] = state["model.norm.weight"].copy()
    state["model.norm.weight"][3] = np.nan
    from safetensors.numpy import save_file

    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert "NaN" in _error(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
    _write_tiny(tmp_path / "m", "llama")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in _error(tmp_path / "m")


@pytest.mark.parametrize("change,expected", [
    ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
])
def test_unsupported_configs(tmp_path, change, expected):
    _write_tiny(tmp_path / "m", "llama")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(change)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert expected in _error(tmp_path / "m")


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("llama")
    from safetensors.numpy import save_file

    state = model.state_dict()
    names = sorted(state)
    folder = tmp_path / "m"
    write_hf_dir(folder, model.config, state, tokenizer_json=None)
    (folder / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = open_checkpoint(folder)
    np.testing.assert_array_equal(build_model(ck.config, ck.weights).forward([1, 2]),
                                  model.forward([1, 2]))
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert "shard model-00002-of-00002.safetensors is missing" in _error(folder)
