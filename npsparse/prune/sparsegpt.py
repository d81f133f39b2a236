"""SparseGPT (Frantar & Alistarh, 2023): prune column by column with Optimal Brain Surgeon updates.

The remaining weights of each row are corrected so that the layer output on the calibration inputs
changes as little as possible: for a pruned weight ``w`` at column ``j`` the row is updated by
``-(w / [H^-1]_jj) * H^-1[j, :]``. Using the upper Cholesky factor ``U`` of ``H^-1`` gives every
step's inverse at once: eliminating columns left to right, ``U[j, j]**2`` is the ``[H_F^-1]_jj`` of
the remaining columns ``F = {j, ...}`` and ``U[j, j:] * U[j, j]`` its row.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..errors import NpsparseError
from .patterns import Pattern, lowest_mask


def inverse_hessian_factor(hessian: np.ndarray, weight: np.ndarray, percdamp: float):
    """Dead columns, dampening and the upper Cholesky factor of ``H^-1``.

    Parameters
    ----------
    hessian : np.ndarray
        ``[K, K]`` ``X^T X`` of the layer's calibration inputs (any float dtype).
    weight : np.ndarray
        ``[N, K]`` the layer's weight.
    percdamp : float
        Dampening: this fraction of the mean diagonal is added to the diagonal.

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        ``U`` [K, K] upper triangular with ``U^T U = H_damped^-1``, the weights with dead columns
        zeroed [N, K] float64, and the damped Hessian [K, K].

    Raises
    ------
    NpsparseError
        The damped Hessian is not positive definite.
    """
    h = np.array(hessian, dtype=np.float64)  # [K, K]
    w = np.array(weight, dtype=np.float64)  # [N, K]
    dead = np.diag(h) == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * np.mean(np.diag(h))
    h[np.diag_indices_from(h)] += damp
    try:
        lower = scipy.linalg.cholesky(h, lower=True)
        h_inv = scipy.linalg.cho_solve((lower, True), np.eye(len(h)))
        upper = scipy.linalg.cholesky(h_inv, lower=False)
    except np.linalg.LinAlgError:
        raise NpsparseError(
            "SparseGPT: the dampened Hessian is not positive definite; raise --percdamp") from None
    return upper, w, h


def sparsegpt(weight: np.ndarray, hessian: np.ndarray, pattern: Pattern, *, blocksize: int = 128,
              percdamp: float = 0.01, mask: np.ndarray | None = None,
              reference_ties: bool = False):
    """Prune ``weight`` with SparseGPT's blocked OBS sweep.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32.
    hessian : np.ndarray
        ``[K, K]``, ``H = (2/S) sum_tokens x x^T`` (:attr:`InputStats.hessian`).
    pattern : Pattern
        Unstructured: in each block of ``blocksize`` columns, the ``floor(s * N * B)`` lowest
        saliencies ``w^2 / U_jj^2`` of the whole ``N x B`` block are pruned (the reference prunes
        ``<= threshold``, one more plus ties; npsparse prunes exactly that count, stable order).
        N:M: every M columns, the N lowest saliencies of each row, from the already updated weights.
    blocksize : int
        Columns per lazy-update block (reference default 128).
    percdamp : float
        Dampening added to the diagonal, as a fraction of its mean (reference default 0.01).
    mask : np.ndarray, optional
        A fixed ``[N, K]`` bool keep-mask; when given, it replaces mask selection (then the result
        does not depend on ``blocksize``).
    reference_ties : bool
        Unstructured only: the reference's block rule, prune every saliency ``<=`` the one at
        sorted index ``floor(s * N * B)`` (:func:`~npsparse.prune.patterns.lowest_mask`); so even
        ``s = 0`` prunes each block's minimum.

    Returns
    -------
    (np.ndarray, np.ndarray)
        New weights ``[N, K]`` float32, pruned entries exactly 0, kept entries updated, and the
        mask ``[N, K]`` bool (True = kept).
    """
    n_rows, n_cols = weight.shape
    if pattern.structured:
        pattern.check_width(n_cols)
        if blocksize % pattern.m:
            raise NpsparseError(f"blocksize {blocksize} must be a multiple of M={pattern.m}")
    upper, w, _ = inverse_hessian_factor(hessian, weight, percdamp)
    keep = np.ones((n_rows, n_cols), dtype=bool)
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w1 = w[:, i1:i2].copy()  # [N, B] current weights of the block
        u1 = upper[i1:i2, i1:i2]  # [B, B]
        d1 = np.diag(u1)  # [B]
        err1 = np.zeros_like(w1)  # [N, B] scaled errors, for the lazy update
        if mask is not None:
            keep1 = mask[:, i1:i2].copy()
        elif pattern.structured:
            keep1 = np.ones_like(w1, dtype=bool)  # filled every M columns below
        else:
            saliency = w1 ** 2 / d1[None, :] ** 2  # [N, B] OBS saliency, from updated weights
            keep1 = lowest_mask(saliency, int(saliency.size * pattern.sparsity),
                                reference_ties=reference_ties)
        for i in range(i2 - i1):
            if mask is None and pattern.structured and i % pattern.m == 0:
                score = w1[:, i:i + pattern.m] ** 2 / d1[None, i:i + pattern.m] ** 2  # [N, M]
                pruned = np.argsort(score, axis=1, kind="stable")[:, :pattern.n]
                np.put_along_axis(keep1[:, i:i + pattern.m], pruned, False, axis=1)
            col = w1[:, i]  # [N]
            quantized = np.where(keep1[:, i], col, 0.0)
            err = (col - quantized) / d1[i]  # [N], nonzero only where pruned
            w1[:, i:] -= np.outer(err, u1[i, i:])  # OBS update of the rest of the block
            w1[:, i] = quantized
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]  # lazy batch update of all later columns
        keep[:, i1:i2] = keep1
    w[~keep] = 0.0
    return w.astype(np.float32), keep

