"""Monarch matrices (Dao et al., ICML 2022): definition, projection, backward, model conversion.

A Monarch matrix with ``b`` blocks is ``M = P L P^T R``: ``R`` and ``L`` are block-diagonal with
``b`` blocks each, and ``P`` is the "reshape to ``[b, n/b]``, transpose" permutation. The format
(storage, product, GEMV, the product's backward ``monarch_backward`` that fine-tuning calls, and
the projection as its packing step, ``project_factors``) is :mod:`npsparse.kernels.monarch`; this
module states the math, projects a weight (:func:`project`) and converts a model's layers
(:func:`monarch_model`, ``npsparse monarch``).

Sizes, square and rectangular (fly's ``MonarchLinear`` convention, HazyResearch/fly
``src/models/layers/monarch_linear.py``: ``blkdiag1 = R``, ``blkdiag2 = L``). For ``W [N, K]``::

    p = K / b          inputs of a block of R          R  [b, q, p]
    q = min(N, K) / b  outputs of a block of R = inputs of a block of L
    s = N / b          outputs of a block of L         L  [b, s, q]
    r = q / b          inner values each R block sends each L block

So the factor on the smaller side is square: ``R`` when ``K <= N`` (an MLP's up/gate, 576 ->
1536), ``L`` when ``N <= K`` (down, 1536 -> 576; k/v, 576 -> 192). Parameters:
``q (N + K) = min(N, K) (N + K) / b``; ``2 n^2 / b`` for a square ``n x n``. For SmolLM2 at
``b = 4``: 576x576 -> R, L ``[4, 144, 144]`` (r = 36, 50% of the weights); 1536x576 ->
R ``[4, 144, 144]``, L ``[4, 384, 144]`` (r = 36, 34.4%); 576x1536 -> R ``[4, 144, 384]``,
L ``[4, 144, 144]`` (34.4%); 192x576 -> R ``[4, 48, 144]``, L ``[4, 48, 48]`` (r = 12, 33.3%).
``b`` must divide ``N`` and ``K`` and ``b^2`` must divide ``min(N, K)``; ``b = 1`` (the dense
matrix) is refused.

Entry by entry, ``W[o b + l, k p + i] = sum_{j<r} L[l, o, k r + j] R[k, j b + l, i]``: read as
a 4-D tensor ``W4[o, l, k, i]`` (rows split ``(s, b)``, columns ``(b, p)``), the sub-block
``A_lk = W4[:, l, k, :]`` (``[s, p]``) is the sum of ``r`` outer products of columns of block
``l`` of ``L`` with rows of block ``k`` of ``R``, and no two sub-blocks share a parameter.
Hence the projection (the best Monarch approximation in Frobenius norm) is closed-form: the best
rank-``r`` approximation of each sub-block, a truncated SVD (Eckart-Young), split as
``U sqrt(S)`` into ``L`` and ``sqrt(S) V^T`` into ``R``. When ``b^2 = min(N, K)`` (``b = 24`` for
576) ``r = 1``: fly's ``blockdiag_butterfly_project`` (square, best rank-1 per sub-block); for
smaller ``b`` it is fly's ``blockdiag_butterfly_project_einsum_rank`` with rank ``r``, whose
factors ``blockdiag_butterfly_multiply`` multiplies in exactly this layout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .api import load
from .errors import NpsparseError
from .io.output import check_output_folder, npsparse_report
from .io.packed import save_packed
from .kernels.monarch import (MonarchLinear, MonarchSizes, check_blocks, monarch_backward,
                              monarch_dense, monarch_forward, monarch_sizes, parameter_count,
                              project_factors)
from .models import select_layers  # re-exported (npsparse monarch and prune --layers)


def project(weight: np.ndarray, blocks: int, values: str = "fp32") -> MonarchLinear:
    """Project a dense weight onto ``b``-block Monarch matrices: the layer of the closest one.

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]`` float32 (or exactly convertible), or float64, which is projected as given
        (not rounded to float32 first); the factors are stored as ``values`` says either way.
    blocks : int
        ``b >= 2`` dividing ``N`` and ``K``, with ``b^2`` dividing ``min(N, K)``.
    values : {"fp32", "bf16"}
        How the layer stores the factors (bf16: each rounded to nearest, ties to even).

    Returns
    -------
    MonarchLinear
        ``shape == W.shape``; ``to_dense()`` is the projection.

    Raises
    ------
    NpsparseError
        ``W`` not 2-D or not numeric, ``b`` that does not fit its shape, or an unknown
        ``values``.
    """
    return MonarchLinear.pack(weight, None, blocks=blocks, values=values)


def monarch_model(model: str | Path, out: str | Path, blocks: int, *,
                  layers: list[str] | None = None, values: str = "fp32") -> dict:
    """Project a model's chosen linear layers onto Monarch matrices and save a packed folder.

    The folder (:mod:`npsparse.io.packed`) stores the factors, not dense weights; the other
    layers stay as loaded (float32 for a checkpoint). ``npsparse eval`` and ``generate`` load
    it like any packed folder, ``npsparse finetune`` trains its factors against the dense model
    its ``packed.json`` names as ``teacher``. Every chosen layer is checked against ``b``
    before any work.

    Parameters
    ----------
    model : str or Path
        Anything :func:`npsparse.load` accepts.
    out : str or Path
        Output folder (written atomically; see :func:`npsparse.io.output.check_output_folder`).
    blocks : int
        ``b`` for every chosen layer.
    layers : list of str, optional
        Patterns of :func:`select_layers`; None = every block linear layer.
    values : {"fp32", "bf16"}
        Storage of the factors.

    Returns
    -------
    dict
        The ``packed.json`` report (``monarch``: blocks, values, and per layer its shape,
        parameters and relative Frobenius error ``||W - M|| / ||W||``; totals; ``teacher``, the
        dense model: ``model`` itself, or the model a pruned or fine-tuned ``model`` came from;
        ``mask_from_zeros``: whether the dense layers' zeros are a pruning mask) plus ``out``
        and ``seconds``.

    Raises
    ------
    NpsparseError
        A pattern that selects nothing, ``b`` that does not fit a chosen layer (named), an
        unknown ``values``, or an output folder that may not be written.
    """
    if values not in ("fp32", "bf16"):
        raise NpsparseError(f"monarch values must be one of ['bf16', 'fp32'], got {values!r}")
    blocks = check_blocks(blocks)  # before loading anything
    check_output_folder(out, inputs=[model])
    start = time.perf_counter()
    llm = load(model)
    linears = llm.model.linears()
    names = select_layers(linears, layers)
    for name in names:
        try:
            monarch_sizes(linears[name].shape, blocks)
        except NpsparseError as error:
            raise NpsparseError(f"{name}: {error}") from None
    report = {}
    for name in names:
        weight = linears[name].to_dense()  # [N, K] float32
        layer = MonarchLinear.pack(weight, None, blocks=blocks, values=values)
        error = np.linalg.norm(weight - layer.to_dense()) / max(np.linalg.norm(weight), 1e-30)
        report[name] = {"shape": list(layer.shape), "parameters": layer.nnz,
                        "relative_error": float(error)}
        llm.model.set_linear(name, layer)
    parameters = sum(r["parameters"] for r in report.values())
    dense = sum(r["shape"][0] * r["shape"][1] for r in report.values())
    teacher, mask_from_zeros = _lineage(model, llm.path)
    info = {"monarch": {"blocks": blocks, "values": values, "parameters": parameters,
                        "dense_parameters": dense, "layers": report},
            "teacher": teacher, "mask_from_zeros": mask_from_zeros}
    path = save_packed(llm, out, info)
    saved = json.loads((path / "packed.json").read_text())
    return {**saved, "out": str(path), "seconds": time.perf_counter() - start}


def _lineage(model, path: Path) -> tuple[str, bool]:
    """The dense model ``model`` came from (as ``finetune`` finds a pruned folder's teacher) and
    whether its zeros are a pruning mask (an npsparse pruned or fine-tuned folder's are)."""
    folder = Path(model)
    name = npsparse_report(folder) if folder.is_dir() else None
    if name is None:
        return str(path), False
    report = json.loads((folder / name).read_text())
    teacher = report.get("teacher") or report.get("source") or str(path)
    if name == "packed.json":
        return teacher, bool(report.get("mask_from_zeros"))
    return teacher, True


__all__ = ["MonarchLinear", "MonarchSizes", "monarch_backward", "monarch_dense",
           "monarch_forward", "monarch_model", "monarch_sizes", "parameter_count", "project",
           "project_factors", "select_layers"]
