"""Packed formats behind the model seam: logits equal the dense model with the same (bf16) weights."""

from unittest import mock

import numpy as np
import pytest
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse import kernels
from npsparse.errors import NpsparseError
from npsparse.kernels import bf16_round
from npsparse.linear import DenseLinear
from npsparse.prune import Pattern, magnitude
from npsparse.packing import apply_format


def pruned_tiny(pattern: str, arch="llama", seed=0):
    model = tiny_model(arch, seed=seed, dim=64, ffn_dim=128, head_dim=16, vocab_size=101)
    for name, layer in model.linears().items():
        new, _ = magnitude(layer.to_dense(), Pattern.parse(pattern), group="row")
        model.set_linear(name, DenseLinear(bf16_round(new)))  # weights exactly bf16
    return model


CASES = [(fmt, pattern) for fmt in ["bf16", "csr", "bitmask", "panel", "auto", "nm"]
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


@settings(max_examples=12)
@given(arch=st.sampled_from(["llama", "qwen2", "gpt2", "opt"]),
       pattern=st.sampled_from(["0.5", "0.7", "0.9", "2:4"]),
       fmt=st.sampled_from(["panel", "auto"]),
       row_mask=st.sampled_from(kernels.ROW_MASKS), seed=st.integers(0, 2**16))
def test_panel_and_auto_logits_equal_dense(arch, pattern, fmt, row_mask, seed):
    """--format panel, and auto with either bitmask layout (AUTO_ROW_MASK), give the dense
    model's logits (same bf16 weights) up to float32 summation order, in prefill and decode;
    auto packs unstructured zeros in the layout the switch names."""
    model = pruned_tiny(pattern, arch, seed)
    model.head = DenseLinear(bf16_round(model.head.to_dense()))  # the packed head is bf16
    ids = np.random.default_rng(seed).integers(0, 101, size=12)
    expected = model.forward(ids)
    with mock.patch.object(kernels, "AUTO_ROW_MASK", row_mask):
        info = apply_format(model, fmt)
    if fmt == "panel":
        assert info["formats"] == {"PanelLinear": len(model.linears())}
    elif ":" not in pattern:  # unstructured: bitmask bytes beat csr and bf16 at these densities
        chosen = {"panel": "PanelLinear", "bitmask": "BitmaskLinear"}[row_mask]
        assert set(info["formats"]) == {chosen}
    tolerance = dict(rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(model.forward(ids), expected, **tolerance)
    cache = model.new_cache(len(ids))
    steps = [model.forward(ids[:4], cache)] + [model.forward(ids[i:i + 1], cache)
                                               for i in range(4, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), expected, **tolerance)


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
