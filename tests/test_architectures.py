"""Every architecture against transformers' float32 logits on small random checkpoints.

The checkpoints and logits in tests/data/tiny were made by tests/oracle/make_golden.py
(transformers, eager attention, float32); see tests/data/README.md.
"""

import numpy as np
import pytest
from conftest import DATA

import npsparse
from npsparse import architectures
from npsparse.config import ModelConfig
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint
from npsparse.io.hf_dir import write_hf_dir
from npsparse.packing import apply_format, layer_formats
from npsparse.sequential import PruneSettings, prune_model
from npsparse.tokenizer import Tokenizer

TINY = DATA / "tiny"
NAMES = sorted(p.name for p in TINY.iterdir()) if TINY.is_dir() else []


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    golden = np.load(TINY / name / "golden.npz")
    checkpoint = npsparse.open_checkpoint(TINY / name)
    model = npsparse.build_model(checkpoint.config, checkpoint.weights)
    for ids, expected in zip(golden["ids"], golden["logits"]):
        logits = model.forward(ids)  # [T, V]
        scale = np.abs(expected).max()
        assert np.abs(logits - expected).max() <= 1e-5 * max(scale, 1.0), name
        np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_every_architecture_is_covered():
    archs = {npsparse.open_checkpoint(TINY / n).config.arch for n in NAMES}
    assert archs == {"llama", "mistral", "qwen2", "gpt2", "opt"}


@pytest.fixture
def toy_registered(monkeypatch):
    """The toy architecture of tests/toy_arch.py, registered for this test only."""
    monkeypatch.setattr(architectures, "_MODULES", dict(architectures._MODULES))
    architectures.register_architecture("toy", "toy_arch")  # the one registry line
    return architectures.architecture("toy")


def test_a_new_architecture_is_one_module_and_one_registry_line(toy_registered, smollm2_path,
                                                                 tmp_path):
    toy = toy_registered
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    config = ModelConfig.from_hf({"model_type": "toy", "vocab_size": tokenizer.vocab_size,
                                  "hidden_size": 16, "num_hidden_layers": 2,
                                  "intermediate_size": 32})
    assert config.family == "toy"
    rng = np.random.default_rng(0)
    weights = {name: (1.0 if name.endswith("norm.weight") else 0.0)
               + rng.normal(0, 0.3, shape).astype(np.float32)
               for name, shape in toy.expected_shapes(config).items()}
    write_hf_dir(tmp_path / "toy", config, weights, tokenizer_json=tokenizer.to_json())

    # Loaded through the generic path, it computes what the equations say.
    llm = npsparse.load(tmp_path / "toy")
    assert isinstance(llm.model, toy.ToyModel) and llm.config == config
    ids = np.array([5, 17, 300, 2])
    x = weights["embed.weight"][ids]
    for i in range(2):
        p = f"blocks.{i}."
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weights[p + "norm.weight"]
        x = x + np.maximum(h @ weights[p + "mlp.fc_in.weight"].T, 0) @ weights[
            p + "mlp.fc_out.weight"].T
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weights["norm.weight"]
    np.testing.assert_allclose(llm.logits(ids), h @ weights["embed.weight"].T,
                               rtol=1e-4, atol=1e-4)

    # Pruning, evaluation and the packed kernels need nothing more from it.
    report = prune_model(tmp_path / "toy", tmp_path / "pruned",
                         PruneSettings(method="wanda", pattern="0.5", nsamples=2, seqlen=16),
                         progress=False)
    assert set(report["layers"]) == {f"blocks.{i}.mlp.{n}" for i in range(2)
                                     for n in ("fc_in", "fc_out")}
    pruned = npsparse.load(tmp_path / "pruned")
    for layer in pruned.model.linears().values():
        assert (layer.to_dense() == 0).mean() == 0.5
    ppl = pruned.perplexity(seqlen=16, windows=2)
    assert np.isfinite(ppl.ppl)
    apply_format(pruned.model, "csr")
    assert layer_formats(pruned.model) == "csr"
    assert len(pruned.generate("Hello", max_new_tokens=3).ids) >= 1


def test_unregistered_architectures_are_refused_by_name():
    with pytest.raises(NpsparseError, match="model_type 'toy' is not supported"):
        ModelConfig.from_hf({"model_type": "toy", "vocab_size": 10})
