"""Post-training pruning as pure functions over arrays.

Each method maps ``(weight [N, K], calibration statistics, pattern)`` to ``(new weight, mask)``
with mask True = kept:

- :func:`magnitude`: ``|W|``, per matrix (reference) or per row;
- :func:`wanda`: ``|W| * ||X_j||``, per row;
- :func:`sparsegpt`: OBS updates with a blocked inverse-Hessian sweep;
- :func:`dsnot`: grow/prune swaps on top of any of them.

:func:`prune_layer` runs one of them by name and measures the layer's reconstruction error; the
block-by-block calibration driver is :mod:`npsparse.sequential`.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError
from .dsnot import DSnoTOptions, dsnot
from .magnitude import magnitude
from .owl import outlier_ratio, owl_sparsities
from .patterns import (Pattern, check_nm, lowest_mask, nm_mask, pattern_mask,
                       topk_mask_per_row)
from .sparsegpt import sparsegpt
from .stats import InputStats
from .wanda import wanda, wanda_score

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
BASES = ("wanda", "sparsegpt", "magnitude")


def stats_needed(method: str, base: str | None = None, *, error: bool = True) -> tuple[str, ...]:
    """Statistics :class:`InputStats` must collect for ``method`` (and DSnoT's ``base``).

    ``error=True`` adds ``"hessian"`` (``sum x x^T``, ``K x K``) so that :func:`prune_layer` can
    report the reconstruction error; magnitude and Wanda need it for nothing else.

    Parameters
    ----------
    method : {"magnitude", "wanda", "sparsegpt", "dsnot"}
    base : str, optional
        DSnoT's initial method (one of :data:`BASES`); required for ``"dsnot"``, else ignored.
    error : bool
        Also collect ``"hessian"`` for the reconstruction error.

    Returns
    -------
    tuple of str
        Sorted statistic names among ``"hessian"``, ``"sq"``, ``"sum"`` and ``"var"``.

    Raises
    ------
    NpsparseError
        If ``method`` is unknown, or it is ``"dsnot"`` without a valid ``base``.
    """
    needs = {"magnitude": set(), "wanda": {"sq"}, "sparsegpt": {"hessian"},
             "dsnot": {"sq", "sum", "var"}}
    if method not in needs:
        raise NpsparseError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    out = set(needs[method])
    if method == "dsnot":
        out |= needs[check_base(base)]
    if error:
        out.add("hessian")
    return tuple(sorted(out))


def check_base(base: str | None) -> str:
    """Check DSnoT's initial method.

    Parameters
    ----------
    base : str or None
        One of :data:`BASES`: ``"wanda"``, ``"sparsegpt"`` or ``"magnitude"``.

    Returns
    -------
    str
        ``base``, unchanged.

    Raises
    ------
    NpsparseError
        If ``base`` is None or not in :data:`BASES` (the message names the ``--base`` option).
    """
    if base not in BASES:
        raise NpsparseError(f"DSnoT needs --base, one of {', '.join(BASES)}; got {base!r}")
    return base


def reconstruction_error(weight: np.ndarray, new_weight: np.ndarray, xtx: np.ndarray | None = None,
                         *, x: np.ndarray | None = None) -> float:
    """``||W X - W' X||_F^2`` summed (not averaged) over all calibration tokens.

    Parameters
    ----------
    weight, new_weight : np.ndarray
        ``[N, K]`` dense and pruned weights (any float dtype; computed in float64).
    xtx : np.ndarray, optional
        ``[K, K]`` ``sum_tokens x x^T`` (:attr:`InputStats.xtx`); then the error is
        ``tr(dW (X^T X) dW^T)``. Passing SparseGPT's ``H = (2/S) X^T X`` instead gives the error
        times ``2/S``.
    x : np.ndarray, optional
        ``[T, K]`` the calibration inputs themselves, instead of ``xtx``.

    Returns
    -------
    float
    """
    delta = weight.astype(np.float64) - new_weight.astype(np.float64)  # [N, K]
    if x is not None:
        out = np.asarray(x, dtype=np.float64).reshape(-1, delta.shape[1]) @ delta.T  # [T, N]
        return float(np.einsum("tn,tn->", out, out))
    if xtx is None:
        raise ValueError("reconstruction_error needs xtx or x")
    return float(np.einsum("nk,nk->", delta @ xtx, delta))


def prune_layer(method: str, weight: np.ndarray, stats: InputStats, pattern: Pattern, *,
                base: str | None = None, magnitude_group: str = "matrix", blocksize: int = 128,
                percdamp: float = 0.01, dsnot_options: DSnoTOptions = DSnoTOptions(),
                reference_ties: bool = False):
    """Prune one linear layer.

    Parameters
    ----------
    method : {"magnitude", "wanda", "sparsegpt", "dsnot"}
    weight : np.ndarray
        ``[N, K]`` float32 dense weights.
    stats : InputStats or None
        Statistics of the layer's inputs, collected with :func:`stats_needed`; None for
        magnitude pruning without a reconstruction error.
    pattern : Pattern
    base : str, optional
        DSnoT's initial method: ``"wanda"``, ``"sparsegpt"`` or ``"magnitude"`` (per row, as the
        DSnoT reference).
    magnitude_group, blocksize, percdamp, dsnot_options, reference_ties
        Method options (see each method). ``reference_ties`` applies to per-matrix magnitude
        and SparseGPT's unstructured block mask (and SparseGPT as DSnoT's base).

    Returns
    -------
    (np.ndarray, np.ndarray, dict)
        New weights ``[N, K]`` float32, mask ``[N, K]`` bool (True = kept), and ``info`` with
        ``sparsity`` (fraction of zeros), DSnoT's swap counts, and, when ``stats`` holds
        ``"hessian"``, ``recon_error`` (:func:`reconstruction_error`, summed over tokens) and
        ``recon_rel`` (that divided by ``||W X||^2``).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if pattern.structured:
        pattern.check_width(weight.shape[1])
    info = {}
    if method == "magnitude":
        new, mask = magnitude(weight, pattern, group=magnitude_group,
                              reference_ties=reference_ties)
    elif method == "wanda":
        new, mask = wanda(weight, stats.sq_norm, pattern)
    elif method == "sparsegpt":
        new, mask = sparsegpt(weight, stats.hessian, pattern, blocksize=blocksize,
                              percdamp=percdamp, reference_ties=reference_ties)
    elif method == "dsnot":
        base = check_base(base)
        init_score = None
        if base == "magnitude":
            new, mask = magnitude(weight, pattern, group="row")
            init_score = np.abs(weight)
        elif base == "wanda":
            new, mask = wanda(weight, stats.sq_norm, pattern)
        else:
            new, mask = sparsegpt(weight, stats.hessian, pattern, blocksize=blocksize,
                                  percdamp=percdamp, reference_ties=reference_ties)
        xtx = stats.xtx if "hessian" in stats.needs else None
        if dsnot_options.guard == "recon" and xtx is None:
            raise NpsparseError("DSnoT's reconstruction guard needs the inputs' x x^T: collect "
                                "the 'hessian' statistic (stats_needed does by default)")
        new, mask, info = dsnot(weight, new, mask, stats.sq_norm, stats.dsnot_sum,
                                stats.variance, pattern, dsnot_options, init_score, xtx=xtx)
    else:
        raise NpsparseError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    info["sparsity"] = float(np.mean(new == 0))
    if stats is not None and "hessian" in stats.needs:
        xtx = stats.xtx
        total = reconstruction_error(weight, np.zeros_like(weight), xtx)  # ||W X||^2
        error = reconstruction_error(weight, new, xtx)
        info.update(recon_error=error, recon_rel=error / total if total > 0 else 0.0)
    return new, mask, info


__all__ = [
    "BASES", "DSnoTOptions", "InputStats", "METHODS", "Pattern", "check_nm", "dsnot", "lowest_mask",
    "magnitude",
    "nm_mask", "outlier_ratio", "owl_sparsities", "pattern_mask", "prune_layer",
    "reconstruction_error", "sparsegpt", "stats_needed", "topk_mask_per_row", "wanda",
    "wanda_score",
]
