"""consolidate(): the layers' arrays move into one aligned buffer; values and logits do not change."""

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparse.arena import ALIGN, consolidate
from npsparse.kernels import pack
from npsparse.kernels.panel import PANEL


def _arrays(model):
    for layer in model.linears().values():
        yield from (layer.arrays.values() if hasattr(layer, "arrays") else [layer.weight])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("fmt", [None, "bf16", "bitmask", "csr", "nm", "panel"])
def test_consolidate_keeps_values_and_shares_one_buffer(arch, fmt):
    model = tiny_model(arch, seed=3)
    for name, layer in model.linears().items():
        weight = layer.to_dense().copy()
        weight[:, np.arange(weight.shape[1]) % 4 < 2] = 0.0  # also a 2:4 pattern
        model.set_linear(name, pack(weight, format=fmt) if fmt else type(layer)(weight))
    ids = np.arange(1, 12)
    before = model.forward(ids)
    dense_before = {name: layer.to_dense().copy() for name, layer in model.linears().items()}
    moved = consolidate(model)
    arrays = list(_arrays(model))
    assert moved >= sum(a.nbytes for a in arrays)
    bases = {id(a.base if a.base is not None else a) for a in arrays}
    assert len(bases) == 1  # views of one buffer
    fused = [f for block in model.blocks for f in getattr(block, "fused", {}).values()]
    assert bool(fused) == (arch in ("llama", "qwen2"))  # LLaMA stacks q/k/v and gate/up
    in_groups = {id(part) for f in fused for part in f.parts}
    starts = [a for f in fused for a in _arrays_of(f.layer)]
    starts += [a for layer in model.linears().values() if id(layer) not in in_groups
               for a in _arrays_of(layer)]
    assert all(a.ctypes.data % ALIGN == 0 for a in starts)
    for f in fused:  # the parts are views into the stacked layer, which equals them stacked
        stacked = f.layer.to_dense()
        for part, lo, hi in zip(f.parts, f.bounds, f.bounds[1:]):
            assert all(any(np.shares_memory(a, b) for b in _arrays_of(f.layer))
                       for key, a in _named_arrays(part).items()
                       if key != getattr(part, "POINTER", ""))
            np.testing.assert_array_equal(stacked[lo:hi], part.to_dense())
    for name, layer in model.linears().items():
        np.testing.assert_array_equal(layer.to_dense(), dense_before[name])
    # Same products, but a stacked row can take another (equally exact) path through the kernel.
    np.testing.assert_allclose(model.forward(ids), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.forward(ids), model.forward(ids))


def _named_arrays(layer):
    return layer.arrays if hasattr(layer, "arrays") else {"weight": layer.weight}


def _arrays_of(layer):
    return list(_named_arrays(layer).values())


@pytest.mark.parametrize("fmt", [None, "bitmask", "nm", "panel"])
def test_stacked_group_is_dropped_when_a_layer_is_replaced(fmt):
    model = tiny_model("llama", seed=5)
    for name, layer in model.linears().items():
        weight = layer.to_dense().copy()
        weight[:, 1::2] = 0.0
        model.set_linear(name, pack(weight, format=fmt) if fmt else type(layer)(weight))
    consolidate(model)
    ids = np.arange(1, 9)
    before = model.forward(ids)
    name = "model.layers.0.self_attn.k_proj"
    replacement = model.linears()[name].to_dense() * 2
    model.set_linear(name, pack(replacement, format="bf16"))
    got = model.forward(ids)
    assert not np.allclose(got, before, rtol=1e-3, atol=1e-3)  # the new k_proj is used
    for block in model.blocks:
        block.fused = {}  # the plain path, layer by layer
    np.testing.assert_allclose(got, model.forward(ids), rtol=1e-5, atol=1e-5)


def _one_group(layers):
    """A model of one block whose layers ``a``, ``b``, ... form one fusable group."""
    names = tuple("abcdefgh"[:len(layers)])
    block = SimpleNamespace(linears=dict(zip(names, layers)), fusable_groups=(names,))
    return SimpleNamespace(blocks=[block]), block, names


@settings(max_examples=30)
@given(panels=st.lists(st.integers(1, 3), min_size=2, max_size=3), last=st.integers(1, 40),
       k_cols=st.integers(1, 70), density=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       tokens=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**32 - 1))
def test_stacked_panel_layer_equals_the_parts_exactly(panels, last, k_cols, density, tokens,
                                                      seed):
    """Parts of 16 q rows (and a last part of any size) stack into one panel layer whose product
    holds each part's product bit for bit; each part, now views into it, is unchanged."""
    rng = np.random.default_rng(seed)
    rows = [PANEL * q for q in panels[:-1]] + [last]
    weights = [rng.standard_normal((n, k_cols)).astype(np.float32) * (rng.random((n, k_cols))
                                                                      < density) for n in rows]
    layers = [pack(w, format="panel") for w in weights]
    x = rng.standard_normal((tokens, k_cols)).astype(np.float32)
    before = [layer(x) for layer in layers]
    dense = np.concatenate([layer.to_dense() for layer in layers])  # [sum(rows), K] bf16 values
    model, block, names = _one_group(layers)
    consolidate(model)
    fused = block.fused[names]
    assert fused.bounds == tuple(np.cumsum([0] + rows))
    assert fused.layer.shape == (sum(rows), k_cols) and fused.layer.FORMAT == "panel"
    stacked = fused.layer(x)
    for part, want, lo, hi in zip(fused.parts, before, fused.bounds, fused.bounds[1:]):
        np.testing.assert_array_equal(stacked[:, lo:hi], want)
        np.testing.assert_array_equal(part(x), want)
    np.testing.assert_array_equal(fused.layer.to_dense(), dense)


@pytest.mark.parametrize("rows", [(8, 16), (16, 20, 16), (17, 32)])
def test_panel_parts_with_padding_between_are_not_stacked(rows):
    """A part before the last that does not fill its last panel would put padding rows inside the
    stacked layer: the group stays unstacked and every part keeps its product."""
    rng = np.random.default_rng(sum(rows))
    weights = [rng.standard_normal((n, 24)).astype(np.float32) for n in rows]
    layers = [pack(w * (rng.random(w.shape) < 0.5), format="panel") for w in weights]
    x = rng.standard_normal((3, 24)).astype(np.float32)
    before = [layer(x) for layer in layers]
    model, block, names = _one_group(layers)
    assert consolidate(model) > 0
    assert block.fused == {}
    for name, want in zip(names, before):
        np.testing.assert_array_equal(block.linears[name](x), want)
