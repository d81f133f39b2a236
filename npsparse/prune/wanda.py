"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2`` within each output row."""

from __future__ import annotations

import numpy as np

from .patterns import Pattern, pattern_mask


def wanda_score(weight: np.ndarray, sq_norm: np.ndarray) -> np.ndarray:
    """Wanda's importance score ``|W_ij| * ||X_j||``.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32.
    sq_norm : np.ndarray
        ``[K]`` float64: the mean squared calibration input of each column (the norm's scale
        does not change any per-row ranking).

    Returns
    -------
    np.ndarray
        ``[N, K]`` float64, ``|W_ij| * sqrt(sq_norm_j)``.
    """
    return np.abs(weight.astype(np.float64)) * np.sqrt(sq_norm)[None, :]


def wanda(weight: np.ndarray, sq_norm: np.ndarray, pattern: Pattern):
    """Prune the lowest Wanda scores of every row (unstructured) or every aligned M-group (N:M).

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32.
    sq_norm : np.ndarray
        ``[K]`` mean over calibration sequences of each input column's sum of squares
        (:attr:`InputStats.sq_norm`); any positive rescaling gives the same mask.
    pattern : Pattern

    Returns
    -------
    (np.ndarray, np.ndarray)
        New weights ``[N, K]`` float32 and mask ``[N, K]`` bool (True = kept). Unstructured:
        exactly ``floor(K * s)`` pruned per row, ties broken by column (stable sort, as the
        reference). No weight is updated.
    """
    mask = pattern_mask(wanda_score(weight, sq_norm), pattern)
    return np.where(mask, weight, 0).astype(np.float32), mask
