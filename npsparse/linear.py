"""The one seam every linear layer of every model goes through.

A model holds, for each projection, an object with ``shape == (N, K)`` that is called as
``layer(x)`` with ``x`` of shape ``[T, K]`` (float32, C-contiguous) and returns ``y = x @ W.T`` of
shape ``[T, N]`` (float32). Bias is *not* part of the seam: models add it themselves, so that sparse
kernels only ever see the weight matrix. Swapping dense for a packed sparse format (see
``npsparse.kernels``) therefore never touches model code.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Linear(Protocol):
    """What a model needs from a linear layer: a shape, a product, and the dense weight back."""

    shape: tuple[int, int]  # (N, K): N outputs, K inputs

    def __call__(self, x: np.ndarray) -> np.ndarray:  # x [T, K] float32 -> [T, N] float32
        ...

    def to_dense(self) -> np.ndarray:
        """The weight ``W [N, K]`` float32 this layer multiplies by."""
        ...


class DenseLinear:
    """A dense float32 weight ``W [N, K]``.

    The product is one BLAS call (``x @ W.T``) for several tokens, and a Numba row-parallel GEMV
    (:func:`npsparse.kernels.dense.gemv_dense`) for one token, where BLAS threading costs more
    than the arithmetic on small matrices.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32. May be read-only (memory-mapped); it is not copied if already float32
        and C-contiguous. A float64 weight stays float64 (gradient checks run in float64).
    """

    def __init__(self, weight: np.ndarray):
        if weight.ndim != 2:
            raise ValueError(f"DenseLinear needs a 2-D weight, got shape {weight.shape}")
        dtype = np.float64 if weight.dtype == np.float64 else np.float32  # float64: grad checks
        self.weight = np.ascontiguousarray(weight, dtype=dtype)  # [N, K]
        self.shape = self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1 and x.dtype == self.weight.dtype == np.float32 and x.flags.c_contiguous:
            return _gemv_dense(self.weight, x)  # [1, N]
        return x @ self.weight.T  # [T, K] @ [K, N] -> [T, N]

    def to_dense(self) -> np.ndarray:
        """The weight ``W [N, K]`` float32 itself (not a copy)."""
        return self.weight

    @property
    def nbytes(self) -> int:
        """Bytes of weight data read per product."""
        return self.weight.nbytes

    def __repr__(self) -> str:
        return f"DenseLinear(shape={self.shape}, dtype=float32)"


def as_linear(weight, *, transpose: bool = False):
    """The seam object for a checkpoint tensor.

    Parameters
    ----------
    weight : np.ndarray or layer
        ``[N, K]`` float32 array, or a layer object already (a packed folder's layers, see
        :mod:`npsparse.io.packed`, are stored as ``[N, K]``), returned as it is.
    transpose : bool
        The array is stored ``[K, N]`` (GPT-2's Conv1D): wrap ``weight.T``.

    Returns
    -------
    DenseLinear or layer
        Callable ``x [T, K] -> [T, N]`` float32.
    """
    if isinstance(weight, np.ndarray):
        return DenseLinear(weight.T if transpose else weight)
    return weight


from .kernels.dense import gemv_dense as _gemv_dense  # noqa: E402  (kernels import this module)
