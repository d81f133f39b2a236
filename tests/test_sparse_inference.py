"""Packed formats behind the model seam: logits equal the dense model with the same (bf16) weights."""

import numpy as np
import pytest
from helpers import tiny_model

from npsparse.errors import NpsparseError
from npsparse.kernels import bf16_round
from npsparse.linear import DenseLinear
from npsparse.prune import Pattern, magnitude
from npsparse.packing import apply_format


def pruned_tiny(pattern: str, arch="llama"):
    model = tiny_model(arch, dim=64, ffn_dim=128, head_dim=16, vocab_size=101)
    for name, layer in model.linears().items():
        new, _ = magnitude(layer.to_dense(), Pattern.parse(pattern), group="row")
        model.set_linear(name, DenseLinear(bf16_round(new)))  # weights exactly bf16
    return model


CASES = [(fmt, pattern) for fmt in ["bf16", "csr", "bitmask", "auto", "nm"]
         for pattern in ["0.7", "2:4"] if fmt != "nm" or ":" in pattern]  # nm needs an N:M mask


@pytest.mark.parametrize("fmt, pattern", CASES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_packed_logits_equal_dense_with_zeros(fmt, pattern, arch):
    model = pruned_tiny(pattern, arch)
    model.head = DenseLinear(bf16_round(model.head.to_dense()))  # the packed head is bf16
    ids = np.arange(0, 90, 3)
    expected = model.forward(ids)
    info = apply_format(model, fmt)
    assert sum(info["formats"].values()) == len(model.linears())
    assert info["head"] == "BF16Linear"
    got = model.forward(ids)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # Decode through the cache with packed layers too.
    cache = model.new_cache(40)
    steps = [model.forward(ids[:5], cache)] + [model.forward(ids[i:i + 1], cache)
                                               for i in range(5, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_sparse_formats_read_fewer_bytes():
    model = pruned_tiny("0.7")
    dense_bytes = model.weight_bytes()
    assert apply_format(model, "bitmask")["weight_bytes"] < dense_bytes


def test_nm_format_refuses_unstructured_zeros():
    with pytest.raises(NpsparseError, match="2:4 or 4:8"):
        apply_format(pruned_tiny("0.5"), "nm")


def test_unknown_format():
    with pytest.raises(NpsparseError, match="unknown weight format"):
        apply_format(pruned_tiny("0.5"), "zip")


def test_head_kept_float32_on_request():
    model = pruned_tiny("0.5")
    head = model.head.to_dense()
    info = apply_format(model, "bitmask", head="dense")
    assert info["head"] == "DenseLinear"
    np.testing.assert_array_equal(model.head.to_dense(), head)
    with pytest.raises(NpsparseError, match="unknown head format"):
        apply_format(model, "bitmask", head="int4")
