"""Magnitude pruning: drop the weights of smallest absolute value."""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError
from .patterns import Pattern, lowest_mask, pattern_mask


def magnitude(weight: np.ndarray, pattern: Pattern, *, group: str = "matrix",
              reference_ties: bool = False):
    """Prune by ``|W|``.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32.
    pattern : Pattern
        Unstructured sparsity or N:M (N:M is always per row and aligned group).
    group : {"matrix", "row"}
        Comparison group for unstructured sparsity. ``"matrix"`` is the reference baseline
        (Wanda's ``prune_magnitude``): the ``floor(s * N * K)`` smallest weights of the whole
        matrix.
        The reference prunes ``|W| <= threshold``, i.e. one weight more plus every tie; with
        4-bit-dequantized weights ties are common, so npsparse prunes exactly that count, ties
        broken by position (stable order). ``"row"``: the ``floor(s * K)`` smallest of each row
        (DSnoT's magnitude base).
    reference_ties : bool
        ``"matrix"`` only: prune ``|W| <=`` the threshold as the reference does
        (:func:`lowest_mask`).

    Returns
    -------
    (np.ndarray, np.ndarray)
        New weights ``[N, K]`` float32 (zeros where pruned) and the mask ``[N, K]`` bool (True =
        kept).
    """
    score = np.abs(weight)
    if pattern.structured or group == "row":
        mask = pattern_mask(score, pattern)
    elif group == "matrix":
        n_prune = int(weight.size * pattern.sparsity)
        mask = lowest_mask(score, n_prune, reference_ties=reference_ties)
    else:
        raise NpsparseError(f"unknown magnitude comparison group {group!r} (matrix or row)")
    return np.where(mask, weight, 0).astype(np.float32), mask
