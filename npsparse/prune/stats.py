"""Calibration statistics of one linear layer's inputs, accumulated one sequence at a time.

Sums are kept in float64 and normalised like the references (Wanda, SparseGPT, DSnoT code): by the
number of *sequences* ``S``, not tokens. The references keep running averages in float32
(``H <- H * (n - 1) / n + ...``); summing first and dividing at the end is the same quantity with
less rounding.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError

KINDS = ("sq", "sum", "var", "hessian")


class InputStats:
    """Running statistics of the inputs ``X`` to one linear layer (K input features).

    Parameters
    ----------
    k : int
        Number of input features.
    needs : iterable of {"sq", "sum", "var", "hessian"}
        Which statistics to keep: ``"sq"`` the per-column sum of squares (Wanda), ``"sum"`` the
        per-column sum (DSnoT's mean), ``"var"`` DSnoT's variance (implies both), ``"hessian"``
        ``sum x x^T`` (SparseGPT, reconstruction errors; ``K x K`` and ``O(T K^2)`` per sequence,
        so only when asked). :func:`npsparse.prune.stats_needed` says what a method needs.

    Attributes
    ----------
    sequences : int
        ``S``, sequences added.
    tokens : int
        Tokens added (all sequences).
    """

    def __init__(self, k: int, needs=KINDS):
        unknown = set(needs) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {KINDS}")
        self.k = k
        self.needs = set(needs) | ({"sq", "sum"} if "var" in needs else set())
        self.sequences = 0
        self.tokens = 0
        self._sq = np.zeros(k)  # sum over tokens of x^2                              [K]
        self._sum = np.zeros(k)  # sum over tokens of x                               [K]
        self._centred_sq = np.zeros(k)  # sum over sequences of sum_t (x - mean_s)^2  [K]
        self._xtx = np.zeros((k, k)) if "hessian" in self.needs else None  # x x^T  [K, K]

    def add(self, x: np.ndarray) -> None:
        """Add inputs of one sequence ``[T, K]`` or of several ``[S, T, K]`` (any float dtype).

        Each sequence counts once in the ``1/S`` normalisation, as one ``add_batch`` call per
        calibration sample does in the references.

        Parameters
        ----------
        x : array-like
            ``[T, K]`` or ``[S, T, K]``; accumulated in float64.
        """
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[2] != self.k:
            raise ValueError(f"inputs of shape {x.shape}: expected [T, {self.k}] or "
                             f"[S, T, {self.k}]")
        for seq in x:
            self._add_sequence(np.asarray(seq, dtype=np.float64))  # [T, K]

    def _add_sequence(self, x: np.ndarray) -> None:
        self.sequences += 1
        self.tokens += x.shape[0]
        if "sq" in self.needs:
            self._sq += np.einsum("tk,tk->k", x, x)
        if "sum" in self.needs:
            column_sum = x.sum(axis=0)  # [K]
            self._sum += column_sum
            if "var" in self.needs and x.shape[0]:
                centred = x - column_sum / x.shape[0]  # [T, K], two-pass for accuracy
                self._centred_sq += np.einsum("tk,tk->k", centred, centred)
        if self._xtx is not None:
            self._xtx += x.T @ x

    def _need(self, kind: str) -> None:
        if kind not in self.needs:
            raise NpsparseError(f"the {kind!r} input statistic was not collected for this layer")

    @property
    def sq_norm(self) -> np.ndarray:
        """Wanda's ``a_j = (1/S) sum_tokens x_j^2`` [K] float64 (``||X_j||_2^2 / S``)."""
        self._need("sq")
        return self._sq / max(self.sequences, 1)

    @property
    def hessian(self) -> np.ndarray:
        """SparseGPT's ``H = (2/S) sum_tokens x x^T`` [K, K] float64."""
        self._need("hessian")
        return 2.0 * self._xtx / max(self.sequences, 1)

    @property
    def xtx(self) -> np.ndarray:
        """``sum_tokens x x^T`` [K, K] float64 (for reconstruction errors)."""
        self._need("hessian")
        return self._xtx

    @property
    def dsnot_sum(self) -> np.ndarray:
        """DSnoT's ``mu_j = (1/S) sum_tokens x_j`` [K] float64: the per-sequence sum, averaged
        over sequences (``T`` times the token mean for sequences of ``T`` tokens)."""
        self._need("sum")
        return self._sum / max(self.sequences, 1)

    @property
    def mean(self) -> np.ndarray:
        """Token mean of each input column [K] float64."""
        self._need("sum")
        return self._sum / max(self.tokens, 1)

    @property
    def variance(self) -> np.ndarray:
        """DSnoT's per-column variance [K] float64: the population variance within each sequence,
        averaged over sequences weighted by their token counts. Differences between the
        sequences' means do not count (that is :attr:`pooled_variance`)."""
        self._need("var")
        return self._centred_sq / max(self.tokens, 1)

    @property
    def pooled_variance(self) -> np.ndarray:
        """Population variance of each column over all tokens together [K] float64."""
        self._need("sq")
        self._need("sum")
        mean = self._sum / max(self.tokens, 1)
        return np.maximum(self._sq / max(self.tokens, 1) - mean ** 2, 0.0)
