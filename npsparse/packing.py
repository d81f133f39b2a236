"""Packing a model's linear layers into kernel formats (the :mod:`npsparse.kernels` seam).

:func:`apply_format` repacks a loaded model in place; :func:`pack_model` does that to a checkpoint
and saves the packed folder (``npsparse pack``; the folder format is :mod:`npsparse.io.packed`).

Every prunable linear layer of the blocks is packed from its dense weight, zeros included, into one
format (or, with ``"auto"``, each into the format that reads the fewest bytes, weighing the
bitmask layout :data:`npsparse.kernels.AUTO_ROW_MASK`); a Monarch layer
(a folder of ``npsparse monarch``) stays Monarch. The output head is
not pruned; by default (``head="auto"``) it is kept as Q8_0 blocks when the checkpoint's head
already is Q8_0 (a GGUF's own blocks, or values a pruned folder carried over from one, recognised
by re-quantizing them losslessly; :class:`~npsparse.kernels.Q8Linear`, 1.0625 bytes per weight, no
value changed) and packed as dense bf16 otherwise; ``"bf16"``, ``"q8_0"`` (for other checkpoints
a lossy int8 quantization per 32 weights, opt-in) and ``"dense"`` (float32) force one. Packing
the head matters for speed twice over: it is the largest matrix of a
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

import numpy as np

from .api import load
from .arena import consolidate
from .errors import NpsparseError
from .io.hf_dir import check_output_folder
from .io.packed import save_packed

FORMAT_CHOICES = ("dense", "auto", "bf16", "csr", "bitmask", "panel", "nm", "qpanel")
ACTIVATION_CHOICES = ("fp32", "int8")


HEAD_CHOICES = ("auto", "bf16", "q8_0", "dense")


def apply_format(model, fmt: str, *, threads: int | None = None, head: str = "auto",
                 checkpoint=None, activations: str = "fp32") -> dict:
    """Repack every block linear layer of ``model`` in place.

    Parameters
    ----------
    model : CausalLM
    fmt : str
        One of :data:`FORMAT_CHOICES`. ``"nm"`` picks 2:4 or 4:8 from each layer's zeros.
        Monarch layers (a folder of ``npsparse monarch``) stay Monarch in every format.
    threads : int, optional
        Kernel threads (see :func:`npsparse.kernels.set_threads`).
    head : str
        Format of the output head when ``fmt`` is not ``"dense"`` (see :func:`pack_head`):
        ``"auto"`` (default), ``"bf16"``, ``"q8_0"`` or ``"dense"`` (float32, NumPy BLAS).
    activations : {"fp32", "int8"}
        ``"int8"`` is the lossy fast mode: every block layer is packed as ``qpanel``
        (:mod:`npsparse.kernels.qpanel`: int8 weights with a scale per row and group of
        columns, activations quantized per 32 values in every product), whatever its density;
        ``fmt`` must then be ``"auto"``, ``"dense"`` or ``"qpanel"``.
        With ``fmt="dense"`` nothing is repacked.
    checkpoint : optional
        The checkpoint ``model`` was loaded from (``LLM.checkpoint``); a GGUF's stored Q8_0
        head blocks are read from it instead of re-quantizing.

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
    fmt = _with_activations(fmt, activations)
    if fmt != "dense" and getattr(model.config, "routed_ffn", None) is not None:
        # its blocks slice dense float32 rows of gate/up and columns of down per token
        raise NpsparseError(f"a routed-FFN model runs from dense float32 weights; --format "
                            f"{fmt} is not supported for it yet")
    if threads is not None:
        kernels.set_threads(threads)
    start = time.perf_counter()
    chosen: dict[str, int] = {}
    for name, layer in model.linears().items():
        if getattr(layer, "FORMAT", "") == "monarch":
            # kept as it is: its dense product has no zeros, so any other format would read
            # more bytes, and projecting it again could only lose
            chosen["MonarchLinear"] = chosen.get("MonarchLinear", 0) + 1
            continue
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
        model.head = pack_head(model, head, checkpoint)
    return {"format": fmt, "seconds": time.perf_counter() - start,
            "weight_bytes": model.weight_bytes(), "formats": chosen,
            "head": type(model.head).__name__}


def _with_activations(fmt: str, activations: str) -> str:
    """The block format that ``activations`` implies: qpanel for int8, else ``fmt``."""
    if activations not in ACTIVATION_CHOICES:
        raise NpsparseError(f"unknown activations {activations!r}; choose from "
                            f"{', '.join(ACTIVATION_CHOICES)}")
    if activations == "fp32":
        return fmt
    if fmt not in ("auto", "dense", "qpanel"):
        raise NpsparseError(f"--activations int8 packs every block layer as qpanel (int8 "
                            f"weights and activations); it cannot be combined with --format {fmt}")
    return "qpanel"


def pack_head(model, head: str = "auto", checkpoint=None):
    """The output head of ``model`` in format ``head`` (the model is not changed).

    Parameters
    ----------
    model : CausalLM
    head : {"auto", "bf16", "q8_0", "dense"}
        ``"auto"``: Q8_0 if the head is stored as Q8_0 already (a packed Q8_0 head, the GGUF's
        own blocks, or float32 values that re-quantize to themselves exactly), else bf16.
        ``"q8_0"``: as auto where that is lossless, else quantized per 32 (lossy, opt-in).
        ``"dense"``: the head as it is (float32 unless a packed folder stored it packed).
    checkpoint : optional
        ``model``'s checkpoint; a :class:`~npsparse.io.GGUFCheckpoint` supplies its stored
        Q8_0 blocks (:meth:`~npsparse.io.GGUFCheckpoint.q8_0_blocks`).

    Returns
    -------
    Linear
        ``[V, D]`` seam object.
    """
    from . import kernels

    if head not in HEAD_CHOICES:
        raise NpsparseError(f"unknown head format {head!r}; choose from {', '.join(HEAD_CHOICES)}")
    if head == "dense" or (head in ("auto", "q8_0") and isinstance(model.head, kernels.Q8Linear)):
        return model.head
    if head == "bf16":
        return kernels.pack(model.head.to_dense(), None, "bf16")
    stored = _stored_q8_0_head(model, checkpoint)
    if stored is not None:
        return stored
    if head == "q8_0":
        return kernels.pack(model.head.to_dense(), None, "q8_0")
    return kernels.pack(model.head.to_dense(), None, "bf16")


def _stored_q8_0_head(model, checkpoint):
    """The head as a Q8Linear holding exactly its values, or None if Q8_0 cannot hold them."""
    from .kernels import Q8Linear, dequantize_q8_0, quantize_q8_0

    tied = model.config.tie_embeddings
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    blocks = getattr(checkpoint, "q8_0_blocks", lambda _: None)(name)
    if blocks is not None and blocks[0].shape == tuple(model.head.shape):
        return Q8Linear.from_q8_0(*blocks)
    weight = model.head.to_dense()  # [V, D]
    if weight.shape[1] % 32 or not np.all(np.isfinite(weight[:64])):
        return None
    for rows in (slice(0, 64), slice(None)):  # a cheap first look rejects most heads
        values, scales = quantize_q8_0(weight[rows])
        if not np.array_equal(dequantize_q8_0(values, scales), weight[rows]):
            return None
    return Q8Linear.from_q8_0(values, scales)


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


def pack_model(model: str | Path, out: str | Path, fmt: str = "auto", *, head: str = "auto",
               activations: str = "fp32"):
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
    head : {"auto", "bf16", "q8_0", "dense"}
        See :func:`pack_head`.
    activations : {"fp32", "int8"}
        ``"int8"``: pack as ``qpanel``, the lossy fast mode (see :func:`apply_format`).

    Returns
    -------
    dict
        The ``packed.json`` report plus ``out`` and ``seconds`` (packing and writing).
    """
    fmt = _with_activations(fmt, activations)
    if fmt == "dense":
        choices = ", ".join(f for f in FORMAT_CHOICES if f != "dense")
        raise NpsparseError(f"--format dense would save nothing packed; choose one of {choices}")
    check_output_folder(out, inputs=[model])
    start = time.perf_counter()
    llm = load(model)
    info = apply_format(llm.model, fmt, head=head, checkpoint=llm.checkpoint)
    path = save_packed(llm, out, {"format": fmt, "head": info["head"]})
    report = json.loads((path / "packed.json").read_text())
    return {**report, "out": str(path), "seconds": time.perf_counter() - start}
