"""consolidate(): the layers' arrays move into one aligned buffer; values and logits do not change."""

import numpy as np
import pytest
from helpers import tiny_model

from npsparse.arena import ALIGN, consolidate
from npsparse.kernels import pack


def _arrays(model):
    for layer in model.linears().values():
        yield from (layer.arrays.values() if hasattr(layer, "arrays") else [layer.weight])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("fmt", [None, "bf16", "bitmask", "csr"])
def test_consolidate_keeps_values_and_shares_one_buffer(arch, fmt):
    model = tiny_model(arch, seed=3)
    for name, layer in model.linears().items():
        weight = layer.to_dense().copy()
        weight[:, ::3] = 0.0
        model.set_linear(name, pack(weight, format=fmt) if fmt else type(layer)(weight))
    ids = np.arange(1, 12)
    before = model.forward(ids)
    dense_before = {name: layer.to_dense().copy() for name, layer in model.linears().items()}
    moved = consolidate(model)
    arrays = list(_arrays(model))
    assert moved >= sum(a.nbytes for a in arrays)
    bases = {id(a.base if a.base is not None else a) for a in arrays}
    assert len(bases) == 1  # views of one buffer
    assert all(a.ctypes.data % ALIGN == 0 for a in arrays)
    for name, layer in model.linears().items():
        np.testing.assert_array_equal(layer.to_dense(), dense_before[name])
    np.testing.assert_array_equal(model.forward(ids), before)
