"""Every architecture against transformers' float32 logits on small random checkpoints.

The checkpoints and logits in tests/data/tiny were made by tests/oracle/make_golden.py
(transformers, eager attention, float32); see tests/data/README.md.
"""

import numpy as np
import pytest
from conftest import DATA

import npsparse

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
