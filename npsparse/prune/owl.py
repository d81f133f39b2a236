"""OWL (Yin et al., 2024): outlier-weighted, non-uniform sparsity per decoder block.

Blocks with more activation outliers keep more weights. A block's outlier ratio is the fraction of
its Wanda scores (all its linear layers together) above ``m`` times their mean, measured on the
dense model. Ratios are min-max scaled to ``[0, 2 * lam]``, shifted so the densities average
``1 - s``, and each block is pruned at ``s_l = 1 - density_l`` (reference ``lib/prune_all.py``:
``Hyper_m = 5``, ``Lamda = 0.08``).
"""

from __future__ import annotations

import numpy as np


def outlier_ratio(scores: list[np.ndarray], m: float = 5.0) -> float:
    """OWL's layerwise outlier ratio.

    Parameters
    ----------
    scores : list of np.ndarray
        One block's Wanda scores ``|W| * ||X||``, one array per linear layer.
    m : float
        Outlier threshold, as a multiple of the mean score (OWL's M, default 5).

    Returns
    -------
    float
        Fraction of all entries above ``m`` times their mean, in ``[0, 1]``.
    """
    flat = np.concatenate([np.ravel(s) for s in scores])
    return float(np.mean(flat > m * flat.mean()))


def owl_sparsities(ratios, sparsity: float, lam: float = 0.08, *, max_sparsity: float = 0.99,
                   reference_clamp: bool = False) -> np.ndarray:
    """Per-block sparsities from outlier ratios; their mean is exactly ``sparsity``.

    Ratios are min-max scaled to ``[0, 2 * lam]``; block ``l`` gets
    ``s_l = sparsity + mean(scaled) - scaled_l``, so more outliers means a lower sparsity and the
    values span a range of width ``2 * lam`` (not centred on ``sparsity`` unless the ratios are
    symmetric). Equal ratios give uniform sparsity.

    Parameters
    ----------
    ratios : array-like
        ``[L]`` outlier ratio per block (:func:`outlier_ratio`; fractions or percentages alike).
    sparsity : float
        Target mean sparsity, ``0 <= s < 1``.
    lam : float
        OWL's lambda (``Lamda``, 0.08 in the reference README).
    max_sparsity : float
        Upper limit of any block's sparsity.
    reference_clamp : bool
        ``False`` (npsparse): if some ``s_l`` would leave ``[0, max_sparsity]``, the spread around
        the target is shrunk just enough, so the mean stays exactly ``sparsity``. ``True``: the
        reference's rule, a block at ``s_l <= 0`` gets 0.01 (the mean then drifts), and values
        above ``max_sparsity`` are clipped.

    Returns
    -------
    np.ndarray
        ``[L]`` float64 sparsities.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * (2 * lam) if spread > 0 else np.zeros_like(ratios)
    offset = scaled.mean() - scaled  # [L], mean 0; s_l = sparsity + offset_l
    if reference_clamp:
        out = sparsity + offset
        return np.minimum(np.where(out <= 0, 0.01, out), max_sparsity)
    shrink = 1.0
    if offset.min() < 0:
        shrink = min(shrink, sparsity / -offset.min())
    if offset.max() > 0:
        shrink = min(shrink, max(max_sparsity - sparsity, 0.0) / offset.max())
    return np.maximum(sparsity + shrink * offset, 0.0)  # only rounding can go below 0
