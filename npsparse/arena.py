"""Gather every weight array a decode step reads into one large buffer (huge pages).

Decode streams all weights once per token. Linux backs memory with 2 MiB pages only where the
program asks for them (transparent huge pages in ``madvise`` mode, the usual default), and NumPy
asks only for allocations of 4 MiB and more. SmolLM2's layer matrices are 0.4-3.5 MiB in float32
(half that in bf16, less when packed), so each one sat on 4 KiB pages and streaming it missed the
TLB every 4 KiB. Copied into one buffer, they share huge pages. Measured on SmolLM2 (same process,
best of 5 interleaved greedy runs of 64 tokens): dense float32 decode 63.3 -> 68.6 tok/s.

The copy happens layer by layer and each original is released when its layer is replaced, so peak
memory grows by about one layer. Arrays start on 64-byte boundaries.
"""

from __future__ import annotations

import numpy as np

ALIGN = 64  # bytes


def _layer_arrays(layer) -> dict[str, np.ndarray] | None:
    """The arrays of a seam object that :func:`consolidate` can move, by name."""
    if hasattr(layer, "arrays"):  # packed formats
        return layer.arrays
    if hasattr(layer, "weight"):  # DenseLinear
        return {"weight": layer.weight}
    return None


def consolidate(model) -> int:
    """Move the arrays of every block linear layer into one buffer.

    The output head is left alone: it is one large array, already on huge pages (and, when tied,
    shared with the embedding table, which a copy would duplicate).

    Parameters
    ----------
    model : CausalLM
        Its layers are updated in place (values unchanged).

    Returns
    -------
    int
        Bytes moved.
    """
    from .linear import DenseLinear

    sizes = []
    for layer in model.linears().values():
        arrays = _layer_arrays(layer) or {}
        sizes += [-(-a.nbytes // ALIGN) * ALIGN for a in arrays.values()]
    total = sum(sizes)
    if total == 0:
        return 0
    buffer = np.empty(total + ALIGN, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % ALIGN
    # One layer at a time, holding no other: each original is freed as soon as it is replaced.
    for name in list(model.linears()):
        layer = model.linears()[name]
        arrays = _layer_arrays(layer)
        if arrays is None:
            continue
        moved = {}
        for key, array in arrays.items():
            view = buffer[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
            view[...] = array
            moved[key] = view
            offset += -(-array.nbytes // ALIGN) * ALIGN
        if isinstance(layer, DenseLinear):
            model.set_linear(name, DenseLinear(moved["weight"]))
        else:
            layer.arrays.update(moved)
        del layer, arrays, moved
    return total
