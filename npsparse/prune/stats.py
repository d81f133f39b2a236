"""Calibration statistics of one linear layer's inputs, accumulated one sequence at a time.

Everything is summed in float64 and normalised like the references (Wanda, SparseGPT, DSnoT code):
by the number of *sequences* ``S``, not tokens.
"""

from __future__ import annotations

import numpy as np

# What each method needs: squared column norms, the Hessian, DSnoT's sum and variance.
NEEDS = {
    "magnitude": (),
    "wanda": ("sq",),
    "sparsegpt": ("hessian",),
    "dsnot": ("sq", "sum", "var"),
}


class InputStats:
    """Running statistics of inputs ``X`` to one linear layer (K input features).

    Parameters
    ----------
    k : int
        Number of input features.
    needs : iterable of {"sq", "hessian", "sum", "var"}
        Which statistics to keep (the Hessian is ``K x K``, so only if needed).

    Attributes (after :meth:`add`)
    ------------------------------
    sequences : int
        ``S``, sequences added.
    tokens : int
        Tokens added.
    """

    def __init__(self, k: int, needs=("sq", "hessian", "sum", "var")):
        self.k = k
        self.needs = set(needs)
        self.sequences = 0
        self.tokens = 0
        self._sq = np.zeros(k)  # sum over tokens of x^2            [K]
        self._sum = np.zeros(k)  # sum over tokens of x              [K]
        self._var_sum = np.zeros(k)  # sum over sequences of T * var  [K]
        self._xtx = np.zeros((k, k)) if "hessian" in self.needs else None  # sum of x x^T  [K, K]

    def add(self, x: np.ndarray) -> None:
        """Add one sequence of inputs ``x`` [T, K] (any float dtype)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.k)  # [T, K]
        self.sequences += 1
        self.tokens += x.shape[0]
        if self.needs & {"sq", "var"}:
            self._sq += np.einsum("tk,tk->k", x, x)
        if self.needs & {"sum", "var"}:
            column_sum = x.sum(axis=0)
            self._sum += column_sum
            if "var" in self.needs:
                # DSnoT: population variance within the sequence, weighted by its token count.
                mean = column_sum / x.shape[0]
                self._var_sum += ((x - mean) ** 2).sum(axis=0)
        if self._xtx is not None:
            self._xtx += x.T @ x

    @property
    def sq_norm(self) -> np.ndarray:
        """Wanda's ``a_j = (1/S) sum_tokens x_j^2`` [K] float64."""
        return self._sq / max(self.sequences, 1)

    @property
    def hessian(self) -> np.ndarray:
        """SparseGPT's ``H = (2/S) sum_tokens x x^T`` [K, K] float64."""
        if self._xtx is None:
            raise ValueError("the Hessian was not collected for this layer")
        return 2.0 * self._xtx / max(self.sequences, 1)

    @property
    def xtx(self) -> np.ndarray:
        """``sum_tokens x x^T`` [K, K] float64 (for reconstruction errors)."""
        if self._xtx is None:
            raise ValueError("X^T X was not collected for this layer")
        return self._xtx

    @property
    def dsnot_sum(self) -> np.ndarray:
        """DSnoT's ``mu_j = (1/S) sum_tokens x_j`` [K] (sum per sequence, averaged)."""
        return self._sum / max(self.sequences, 1)

    @property
    def variance(self) -> np.ndarray:
        """DSnoT's per-column variance: within-sequence, token-weighted average [K]."""
        return self._var_sum / max(self.tokens, 1)
