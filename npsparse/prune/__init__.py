"""Post-training pruning as pure functions over arrays.

Each method maps ``(weight [N, K], calibration statistics, pattern)`` to ``(new weight, mask)``
with mask True = kept:

- :func:`magnitude`: ``|W|``, per matrix (reference) or per row;
- :func:`wanda`: ``|W| * ||X_j||``, per row;
- :func:`sparsegpt`: OBS updates with a blocked inverse-Hessian sweep;
- :func:`dsnot`: grow/prune swaps on top of any of them.

:data:`METHODS` is the registry the pruner and the command line read (name -> the statistics
the method needs and the function that runs it); :func:`register_method` adds one.
:func:`prune_layer` runs one by name and measures the layer's reconstruction error; the
block-by-block calibration driver is :mod:`npsparse.sequential`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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



@dataclass(frozen=True)
class LayerOptions:
    """Every method option :func:`prune_layer` passes on; each method reads the ones it has."""

    base: str | None = None  # DSnoT's initial method
    magnitude_group: str = "matrix"
    blocksize: int = 128
    percdamp: float = 0.01
    dsnot: DSnoTOptions = DSnoTOptions()
    reference_ties: bool = False


@dataclass(frozen=True)
class Method:
    """A pruning method as the pruner and the command line see it.

    ``run(weight, stats, pattern, options) -> (new weight, mask, info)``; ``needs`` are the
    :class:`InputStats` statistics it reads (empty: it needs no calibration data); ``is_base``:
    it may start DSnoT; ``takes_base``: it needs an initial method (``--base``).
    """

    run: Callable
    needs: frozenset = frozenset()
    is_base: bool = False
    takes_base: bool = False


METHODS: dict[str, Method] = {}  # name -> Method, in the order the CLI lists them


def register_method(name: str, needs=(), *, is_base: bool = False, takes_base: bool = False):
    """Decorator adding ``run`` to :data:`METHODS` (the one line a new method needs).

    Parameters
    ----------
    name : str
        The method's name (``--method NAME``).
    needs : iterable of str
        :class:`InputStats` statistics ``run`` reads (``"sq"``, ``"hessian"``, ``"sum"``,
        ``"var"``); none means the method needs no calibration data.
    is_base : bool
        DSnoT may start from it (``--base NAME``).
    takes_base : bool
        It needs an initial method (``--base``).

    Returns
    -------
    callable
        The decorator, which returns ``run`` unchanged.
    """
    def add(run):
        METHODS[name] = Method(run, frozenset(needs), is_base, takes_base)
        return run
    return add


@register_method("magnitude", is_base=True)
def _magnitude(weight, stats, pattern, options):
    new, mask = magnitude(weight, pattern, group=options.magnitude_group,
                          reference_ties=options.reference_ties)
    return new, mask, {}


@register_method("wanda", ("sq",), is_base=True)
def _wanda(weight, stats, pattern, options):
    return (*wanda(weight, stats.sq_norm, pattern), {})


@register_method("sparsegpt", ("hessian",), is_base=True)
def _sparsegpt(weight, stats, pattern, options):
    new, mask = sparsegpt(weight, stats.hessian, pattern, blocksize=options.blocksize,
                          percdamp=options.percdamp, reference_ties=options.reference_ties)
    return new, mask, {}


@register_method("dsnot", ("sq", "sum", "var"), takes_base=True)
def _dsnot(weight, stats, pattern, options):
    base = check_base(options.base)
    init_score = None
    if base == "magnitude":  # per row, as the DSnoT reference
        new, mask = magnitude(weight, pattern, group="row")
        init_score = np.abs(weight)
    else:
        new, mask, _ = METHODS[base].run(weight, stats, pattern, options)
    xtx = stats.xtx if "hessian" in stats.needs else None
    if options.dsnot.guard == "recon" and xtx is None:
        raise NpsparseError("DSnoT's reconstruction guard needs the inputs' x x^T: collect "
                            "the 'hessian' statistic (stats_needed does by default)")
    return dsnot(weight, new, mask, stats.sq_norm, stats.dsnot_sum, stats.variance, pattern,
                 options.dsnot, init_score, xtx=xtx)


def bases() -> tuple[str, ...]:
    """The methods DSnoT can start from."""
    return tuple(name for name, method in METHODS.items() if method.is_base)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Parameters
    ----------
    name : str

    Returns
    -------
    Method

    Raises
    ------
    NpsparseError
        If no method has that name (the message lists them).
    """
    if name not in METHODS:
        raise NpsparseError(f"unknown pruning method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


def stats_needed(method: str, base: str | None = None, *, error: bool = True) -> tuple[str, ...]:
    """Statistics :class:`InputStats` must collect for ``method`` (and DSnoT's ``base``).

    ``error=True`` adds ``"hessian"`` (``sum x x^T``, ``K x K``) so that :func:`prune_layer` can
    report the reconstruction error; magnitude and Wanda need it for nothing else.

    Parameters
    ----------
    method : {"magnitude", "wanda", "sparsegpt", "dsnot"}
    base : str, optional
        DSnoT's initial method (one of :func:`bases`); required for ``"dsnot"``, else ignored.
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
    out = set(get_method(method).needs)
    if get_method(method).takes_base:
        out |= METHODS[check_base(base)].needs
    if error:
        out.add("hessian")
    return tuple(sorted(out))


def check_base(base: str | None) -> str:
    """Check DSnoT's initial method.

    Parameters
    ----------
    base : str or None
        One of :func:`bases`: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.

    Returns
    -------
    str
        ``base``, unchanged.

    Raises
    ------
    NpsparseError
        If ``base`` is None or not in :func:`bases` (the message names the ``--base`` option).
    """
    if base not in bases():
        raise NpsparseError(f"DSnoT needs --base, one of {', '.join(bases())}; got {base!r}")
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
    options = LayerOptions(base, magnitude_group, blocksize, percdamp, dsnot_options,
                           reference_ties)
    new, mask, info = get_method(method).run(weight, stats, pattern, options)
    info["sparsity"] = float(np.mean(new == 0))
    if stats is not None and "hessian" in stats.needs:
        xtx = stats.xtx
        total = reconstruction_error(weight, np.zeros_like(weight), xtx)  # ||W X||^2
        error = reconstruction_error(weight, new, xtx)
        info.update(recon_error=error, recon_rel=error / total if total > 0 else 0.0)
    return new, mask, info


__all__ = [
    "DSnoTOptions", "InputStats", "LayerOptions", "METHODS", "Method", "Pattern", "bases",
    "check_nm", "dsnot", "lowest_mask", "magnitude", "get_method", "register_method",
    "nm_mask", "outlier_ratio", "owl_sparsities", "pattern_mask", "prune_layer",
    "reconstruction_error", "sparsegpt", "stats_needed", "topk_mask_per_row", "wanda",
    "wanda_score",
]
