"""Packing a model's linear layers into kernel formats (the :mod:`npsparse.kernels` seam).

:func:`apply_format` repacks a loaded model in place; :func:`pack_model` does that to a checkpoint
and saves the packed folder (``npsparse pack``; the folder format is :mod:`npsparse.io.packed`).

Every prunable linear layer of the blocks is packed from its dense weight, zeros included, into one
format (or, with ``"auto"``, each into the format that reads the fewest bytes). The output head is
not pruned; it is packed as dense bf16 (``head="bf16"``, the default) or kept float32
(``head="dense"``). Packing the head matters for speed twice over: it is the largest matrix of a
small model (SmolLM2: 49152 x 576, 113 MB in float32) and, left to NumPy, its BLAS product wakes
OpenBLAS's thread pool, whose spinning threads then compete with Numba's for the same cores on every
token (measured: bf16 decode at 41 tok/s with a float32 head, 92 tok/s with BLAS single-threaded).
The embedding table stays float32 (one row is read per token). The logits equal the
dense-with-zeros model's up to the value rounding of the format (bf16 values: about 3 significant
digits per weight).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .api import load
from .arena import consolidate
from .errors import NpsparseError
from .io.hf_dir import check_output_folder
from .io.packed import save_packed

FORMAT_CHOICES = ("dense", "auto", "bf16", "csr", "bitmask", "nm")


HEAD_CHOICES = ("bf16", "dense")


def apply_format(model, fmt: str, *, threads: int | None = None, head: str = "bf16") -> dict:
    """Repack every block linear layer of ``model`` in place.

    Parameters
    ----------
    model : CausalLM
    fmt : str
        One of :data:`FORMAT_CHOICES`. ``"nm"`` picks 2:4 or 4:8 from each layer's zeros.
    threads : int, optional
        Kernel threads (see :func:`npsparse.kernels.set_threads`).
    head : str
        Format of the output head when ``fmt`` is not ``"dense"``: ``"bf16"`` (default) or
        ``"dense"`` (float32, NumPy BLAS). With ``fmt="dense"`` nothing is repacked.

    Returns
    -------
    dict
        ``{"format", "seconds" (packing time), "weight_bytes" (bytes read per token), "formats"
        (count of block layers per chosen format), "head" (the head's class name)}``.
    """
    from . import kernels

    if fmt not in FORMAT_CHOICES:
        raise NpsparseError(f"unknown weight format {fmt!r}; choose from {', '.join(FORMAT_CHOICES)}")
    if head not in HEAD_CHOICES:
        raise NpsparseError(f"unknown head format {head!r}; choose from {', '.join(HEAD_CHOICES)}")
    if threads is not None:
        kernels.set_threads(threads)
    start = time.perf_counter()
    chosen: dict[str, int] = {}
    for name, layer in model.linears().items():
        weight = layer.to_dense()
        if fmt == "nm":
            packed = _pack_nm(weight, name)
        else:
            packed = kernels.pack(weight, None, fmt)
        label = type(packed).__name__
        chosen[label] = chosen.get(label, 0) + 1
        model.set_linear(name, packed)
    if fmt != "dense":
        consolidate(model)  # the packed arrays onto huge pages, as npsparse.load does (arena)
        if head == "bf16":
            model.head = kernels.pack(model.head.to_dense(), None, "bf16")
    return {"format": fmt, "seconds": time.perf_counter() - start,
            "weight_bytes": model.weight_bytes(), "formats": chosen,
            "head": type(model.head).__name__}


def layer_formats(model) -> str:
    """The formats a model's block layers are in now (a packed folder loads in its own).

    Parameters
    ----------
    model : CausalLM

    Returns
    -------
    str
        One format name when all layers share it (``"dense"``, ``"bitmask"`` ...), else each
        with its count, most common first (``"nm 120 + bitmask 90"``).
    """
    counts: dict[str, int] = {}
    for layer in model.linears().values():
        name = getattr(layer, "FORMAT", "") or "dense"
        counts[name] = counts.get(name, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _pack_nm(weight, name: str):
    from . import kernels

    for pattern in kernels.NM_PATTERNS:
        try:
            return kernels.pack(weight, None, "nm", pattern=pattern)
        except NpsparseError:
            continue
    raise NpsparseError(f"{name}: the zeros do not form a 2:4 or 4:8 pattern; use another format")


def pack_model(model: str | Path, out: str | Path, fmt: str = "auto", *, head: str = "bf16"):
    """Load ``model``, pack its layers as ``fmt`` and save the packed folder ``out``.

    Parameters
    ----------
    model : str or Path
        Anything :func:`npsparse.load` accepts (usually a pruned folder).
    out : str or Path
        Output folder: refused before any work if it is ``model`` or inside it, or exists and
        npsparse did not write it (:func:`npsparse.io.hf_dir.check_output_folder`).
    fmt : str
        A format of :data:`FORMAT_CHOICES` other than ``"dense"``.
    head : {"bf16", "dense"}

    Returns
    -------
    dict
        The ``packed.json`` report plus ``out`` and ``seconds`` (packing and writing).
    """
    if fmt == "dense":
        raise NpsparseError("--format dense would save nothing packed; choose auto, bf16, csr, "
                            "bitmask or nm")
    check_output_folder(out, inputs=[model])
    start = time.perf_counter()
    llm = load(model)
    info = apply_format(llm.model, fmt, head=head)
    path = save_packed(llm, out, {"format": fmt, "head": info["head"]})
    report = json.loads((path / "packed.json").read_text())
    return {**report, "out": str(path), "seconds": time.perf_counter() - start}
