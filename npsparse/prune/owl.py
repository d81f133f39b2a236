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
    """Fraction of all entries of ``scores`` (one block's Wanda scores) above ``m`` x their mean."""
    flat = np.concatenate([np.ravel(s) for s in scores])
    return float(np.mean(flat > m * flat.mean()))


def owl_sparsities(ratios, sparsity: float, lam: float = 0.08) -> np.ndarray:
    """Per-block sparsities from outlier ratios; their mean is ``sparsity``.

    Parameters
    ----------
    ratios : array-like
        ``[L]`` outlier ratio per block (:func:`outlier_ratio`).
    sparsity : float
        Target mean sparsity.
    lam : float
        Half-width of the range the sparsities may span around the target.

    Returns
    -------
    np.ndarray
        ``[L]`` float64 sparsities in ``[sparsity - lam, sparsity + lam]`` (clipped to [0, 0.99]).
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * (2 * lam) if spread > 0 else np.zeros_like(ratios)
    density = scaled - scaled.mean() + (1 - sparsity)
    return np.clip(1 - density, 0.0, 0.99)
