"""Sparsity patterns and the masks that realise them.

Masks are boolean ``[N, K]`` arrays (N output rows, K input columns) with **True = weight kept**.
"N:M" means N of every M consecutive input weights are *pruned* (``2:4`` keeps 2 of 4), as in the
Wanda and SparseGPT code (``prune_n``, ``prune_m``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import NpsparseError


@dataclass(frozen=True)
class Pattern:
    """Unstructured sparsity ``s`` (fraction pruned) or N:M (``n`` pruned of every ``m``).

    Parameters
    ----------
    sparsity : float
        Fraction of weights pruned, ``0 <= s < 1``. For N:M it is ``n / m``.
    n, m : int
        N:M group sizes; both 0 for unstructured sparsity.
    """

    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m or self.n:
            if not (0 < self.n < self.m):
                raise NpsparseError(
                    f"pattern {self.n}:{self.m} is impossible: it needs 0 < N < M "
                    "(N pruned of every M)")
            if self.sparsity != self.n / self.m:
                raise NpsparseError(
                    f"pattern {self.n}:{self.m} has sparsity {self.n / self.m:g}, not "
                    f"{self.sparsity:g} (use Pattern.nm({self.n}, {self.m}))")
        elif not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise NpsparseError(
                f"sparsity {self.sparsity} is out of range: it must satisfy 0 <= s < 1")

    @property
    def structured(self) -> bool:
        """True (bool) for an N:M pattern (``m > 0``), False for unstructured sparsity."""
        return self.m > 0

    @classmethod
    def nm(cls, n: int, m: int) -> "Pattern":
        """N:M pattern: ``n`` pruned of every ``m`` consecutive input weights.

        Parameters
        ----------
        n, m : int
            Weights pruned per group and group size, ``0 < n < m`` (``nm(0, 0)`` gives the
            unstructured pattern of sparsity 0).

        Returns
        -------
        Pattern
            With ``sparsity = n / m``.

        Raises
        ------
        NpsparseError
            If the pattern is impossible (not ``0 < n < m``).
        """
        return cls(n / m if m else 0.0, n, m)

    @classmethod
    def parse(cls, text: str | float) -> "Pattern":
        """Parse ``"0.5"``, ``"50%"`` or ``"2:4"``.

        Parameters
        ----------
        text : str or float
            A fraction pruned (``"0.5"`` or the number ``0.5``), a percentage (``"50%"``) or
            N:M (``"2:4"``: N pruned of every M). Surrounding whitespace is ignored.

        Returns
        -------
        Pattern

        Raises
        ------
        NpsparseError
            If ``text`` is none of these, or the pattern is out of range or impossible.
        """
        if isinstance(text, (int, float)):
            return cls(float(text))
        text = str(text).strip()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            return cls.nm(n, m)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise NpsparseError(
                f"cannot read sparsity pattern {text!r}: give a fraction like 0.5, a percentage "
                "like 50%, or N:M like 2:4") from None
        return cls(value)

    def check_width(self, k: int, name: str = "weight") -> None:
        """Raise if a matrix with ``k`` input columns cannot take this pattern.

        N:M needs ``k`` divisible by M; unstructured patterns fit any width.

        Parameters
        ----------
        k : int
            Input columns ``K`` of a weight ``[N, K]``.
        name : str
            What the error message calls the matrix (e.g. its tensor name).

        Raises
        ------
        NpsparseError
            If the pattern is N:M and ``k % m != 0``.
        """
        if self.structured and k % self.m:
            raise NpsparseError(
                f"{name} has {k} input columns, not divisible by M={self.m} of pattern {self}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:g}"


def topk_mask_per_row(score: np.ndarray, n_prune: int) -> np.ndarray:
    """Prune the ``n_prune`` lowest scores of every row (stable: ties go to lower columns first).

    Parameters
    ----------
    score : [N, K] array
    n_prune : int

    Returns
    -------
    np.ndarray
        [N, K] bool, True = kept; exactly ``K - n_prune`` True per row.
    """
    mask = np.ones(score.shape, dtype=bool)
    if n_prune > 0:
        order = np.argsort(score, axis=1, kind="stable")[:, :n_prune]  # [N, n_prune]
        np.put_along_axis(mask, order, False, axis=1)
    return mask


def lowest_mask(score: np.ndarray, n_prune: int, *, reference_ties: bool = False) -> np.ndarray:
    """Prune the ``n_prune`` lowest scores of the whole array (a matrix, or one SparseGPT block).

    Parameters
    ----------
    score : np.ndarray
        Any shape, e.g. ``[N, K]``.
    n_prune : int
    reference_ties : bool
        ``False``: exactly ``n_prune`` pruned, ties broken by flat position (stable sort).
        ``True``: the reference rule (Wanda's ``prune_magnitude``, SparseGPT's block mask): prune
        every score ``<=`` the one at sorted index ``n_prune``, i.e. at least one more, plus all
        ties with it (common in fp16 or quantized weights).

    Returns
    -------
    np.ndarray
        Bool of ``score``'s shape, True = kept.
    """
    flat = np.ravel(score)
    if reference_ties:
        if n_prune >= flat.size:
            return np.zeros(score.shape, dtype=bool)
        return (flat > np.sort(flat)[n_prune]).reshape(score.shape)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:n_prune]] = False
    return keep.reshape(score.shape)


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Prune the ``n`` lowest scores in every aligned group of ``m`` columns of every row.

    Parameters
    ----------
    score : [N, K] array, K divisible by m
    n, m : int

    Returns
    -------
    np.ndarray
        [N, K] bool, True = kept; exactly ``m - n`` True per group.
    """
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # [N, K/m, m]
    order = np.argsort(groups, axis=2, kind="stable")[:, :, :n]  # [N, K/m, n]
    mask = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(mask, order, False, axis=2)
    return mask.reshape(rows, cols)


def pattern_mask(score: np.ndarray, pattern: Pattern) -> np.ndarray:
    """The keep mask that a score gives under a sparsity pattern.

    Parameters
    ----------
    score : np.ndarray
        ``[N, K]``; higher = more important.
    pattern : Pattern
        Unstructured (per-row fraction pruned) or N:M.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool, True = kept: each row keeps its top scores (unstructured), or each
        aligned group of M columns keeps its top ``M - N``.
    """
    if pattern.structured:
        pattern.check_width(score.shape[1])
        return nm_mask(score, pattern.n, pattern.m)
    return topk_mask_per_row(score, int(score.shape[1] * pattern.sparsity))


def check_nm(mask: np.ndarray, n: int, m: int) -> bool:
    """Whether a mask follows an N:M pattern exactly.

    Parameters
    ----------
    mask : np.ndarray
        ``[N, K]`` bool, True = kept.
    n, m : int
        N pruned of every M.

    Returns
    -------
    bool
        True if ``K % m == 0`` and every aligned group of ``m`` columns keeps exactly ``m - n``.
    """
    rows, cols = mask.shape
    return cols % m == 0 and bool(np.all(mask.reshape(rows, cols // m, m).sum(axis=2) == m - n))
