"""Monarch format: a weight stored as two block-diagonal factors, ``M = P L P^T R``.

The layout is fly's ``blockdiag_butterfly_multiply`` (HazyResearch/fly, ``w1_bfly = R``,
``w2_bfly = L``); :mod:`npsparse.monarch` states the definition, the rectangular sizes and the
projection. With ``b`` blocks, for ``W [N, K]``:

- ``right [b, q, p]`` (``R``, applied first): block ``k`` maps input slice ``x[k p : (k+1) p]``
  to ``q`` inner values, ``p = K / b``.
- the inner permutation ``P^T`` deals the ``b q`` inner values out to the ``b`` blocks of ``L``,
  ``r = q / b`` from each block of ``R``.
- ``left [b, s, q]`` (``L``): block ``l`` maps its ``q`` inner values to ``s = N / b`` outputs,
  which ``P`` interleaves: output ``o b + l`` is row ``o`` of block ``l``.

Entry by entry, ``W[o b + l, k p + i] = sum_{j<r} left[l, o, k r + j] * right[k, j b + l, i]``,
which is what the naive kernel computes. Several tokens go through two batched matmuls
(``np.matmul`` on ``[b, ...]`` stacks, BLAS); one token through a Numba GEMV that streams ``R``
then ``L`` once each, parallel over rows, like the dense GEMV. Its dot products are plain loops
that LLVM vectorises for the host (float32, or bf16 bits widened by a shift), so no CPU-feature
dispatch is needed here. Bytes per product: ``(b q p + b s q) * 4`` (fp32) or ``* 2`` (bf16).

Packing is the projection (:func:`project_factors`): lossy, like ``q8_0``, and never chosen by
``format="auto"``. A Monarch layer does not stack row-wise with another (``STACKABLE``): two
Monarch matrices one above the other are not one, so the arena keeps them apart.

It is the one packed format that trains (``TRAINABLE``): fine-tuning updates the two factors in
place (:meth:`MonarchLinear.parameters`) from :func:`monarch_backward` of the product
(:meth:`MonarchLinear.backward`), so a Monarch model trains at its own cost and stays Monarch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import (PackedLinear, as_float32, check_arrays, check_option, check_shapes,
                     check_weight_mask)
from ._numba import jit, pjit, row_block
from ._simd import value_at
from .bf16 import from_bf16, to_bf16

VALUE_TYPES = {"fp32": np.float32, "bf16": np.uint16}


@dataclass(frozen=True)
class MonarchSizes:
    """The block sizes of a Monarch matrix ``W [N, K]`` with ``b`` blocks (fly's convention).

    ``q = min(N, K) / b`` is the inner width of each block, so ``R`` has square blocks when
    ``K <= N`` and ``L`` has square blocks when ``N <= K``; each of the ``b x b`` sub-blocks
    ``[N/b, K/b]`` of the (permuted) matrix has rank at most ``r = q / b``.

    Parameters
    ----------
    n_rows, k_cols : int
        ``N`` outputs and ``K`` inputs.
    blocks : int
        ``b``, the number of diagonal blocks of each factor.
    """

    n_rows: int
    k_cols: int
    blocks: int

    @property
    def in_block(self) -> int:
        """int: ``p = K / b``, the inputs of each block of ``R``."""
        return self.k_cols // self.blocks

    @property
    def out_block(self) -> int:
        """int: ``s = N / b``, the outputs of each block of ``L``."""
        return self.n_rows // self.blocks

    @property
    def inner(self) -> int:
        """int: ``q = min(N, K) / b``, the outputs of a block of ``R`` = inputs of one of ``L``."""
        return min(self.n_rows, self.k_cols) // self.blocks

    @property
    def rank(self) -> int:
        """int: ``r = q / b``, the rank of each sub-block (1 when ``b^2 = min(N, K)``)."""
        return self.inner // self.blocks

    @property
    def right_shape(self) -> tuple[int, int, int]:
        """tuple: ``(b, q, p)``, the shape of ``R``."""
        return self.blocks, self.inner, self.in_block

    @property
    def left_shape(self) -> tuple[int, int, int]:
        """tuple: ``(b, s, q)``, the shape of ``L``."""
        return self.blocks, self.out_block, self.inner

    @property
    def parameters(self) -> int:
        """int: ``b q p + b s q = q (N + K)``, e.g. ``2 n^2 / b`` for a square ``n x n``."""
        return self.inner * (self.n_rows + self.k_cols)


def check_blocks(blocks) -> int:
    """``b`` as an int, refusing what no shape fits: not an integer, or below 2.

    Parameters
    ----------
    blocks : int
        The number of diagonal blocks asked for.

    Returns
    -------
    int

    Raises
    ------
    NpsparseError
        One line; ``b = 1`` is the dense matrix itself (as two full factors), never wanted.
    """
    if isinstance(blocks, (bool, np.bool_)) or not isinstance(blocks, (int, np.integer)):
        raise NpsparseError(f"Monarch blocks must be an integer, got {blocks!r}")
    if blocks < 2:
        raise NpsparseError(f"Monarch blocks must be at least 2, got {blocks} (b = 1 is the dense "
                            "matrix itself)")
    return int(blocks)


def monarch_sizes(shape: tuple[int, int], blocks: int) -> MonarchSizes:
    """The sizes of a ``b``-block Monarch matrix of ``shape``, refusing ``b`` that do not fit.

    Parameters
    ----------
    shape : tuple of int
        ``(N, K)``.
    blocks : int
        ``b >= 2``; it must divide ``N`` and ``K``, and ``b^2`` must divide ``min(N, K)`` (each
        block of ``R`` sends the same number ``r`` of inner values to each block of ``L``).

    Returns
    -------
    MonarchSizes

    Raises
    ------
    NpsparseError
        One line naming ``b`` and the dimension it does not fit.
    """
    n_rows, k_cols = (int(d) for d in shape)
    blocks = check_blocks(blocks)
    if n_rows % blocks or k_cols % blocks:
        raise NpsparseError(f"Monarch blocks b = {blocks} must divide both dimensions of the "
                            f"{n_rows}x{k_cols} weight")
    if min(n_rows, k_cols) % (blocks * blocks):
        raise NpsparseError(f"Monarch blocks b = {blocks}: b^2 = {blocks * blocks} must divide "
                            f"min(N, K) = {min(n_rows, k_cols)} of the {n_rows}x{k_cols} weight")
    return MonarchSizes(n_rows, k_cols, blocks)


def parameter_count(shape: tuple[int, int], blocks: int) -> int:
    """Values a ``b``-block Monarch matrix of ``shape`` stores: ``min(N, K) (N + K) / b``.

    Parameters
    ----------
    shape : tuple of int
        ``(N, K)``.
    blocks : int
        ``b`` (checked as in :func:`monarch_sizes`).

    Returns
    -------
    int
    """
    return monarch_sizes(shape, blocks).parameters


# ---- the product as array operations (any float dtype; float64 for gradient checks) --------

def to_middle(u: np.ndarray) -> np.ndarray:
    """The inner permutation ``P^T``: outputs of ``R`` -> inputs of ``L``, per token.

    Block ``k`` of ``R`` writes inner value ``c = j b + l``; it becomes input ``k r + j`` of
    block ``l`` of ``L``. (The flat ``[b q]`` vector, read as ``[q, b]``, transposed.)

    Parameters
    ----------
    u : np.ndarray
        ``[b, T, q]``, indexed ``[k, t, j b + l]``.

    Returns
    -------
    np.ndarray
        ``[b, T, q]``, indexed ``[l, t, k r + j]`` (a copy).
    """
    b, t, q = u.shape
    u5 = u.reshape(b, t, q // b, b)  # [k, T, j, l]
    return u5.transpose(3, 1, 0, 2).reshape(b, t, q)  # [l, T, k, j] -> [b, T, q]


def from_middle(v: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_middle` (``P``): inputs of ``L`` -> outputs of ``R``.

    Parameters
    ----------
    v : np.ndarray
        ``[b, T, q]``, indexed ``[l, t, k r + j]``.

    Returns
    -------
    np.ndarray
        ``[b, T, q]``, indexed ``[k, t, j b + l]`` (a copy).
    """
    b, t, q = v.shape
    v5 = v.reshape(b, t, b, q // b)  # [l, T, k, j]
    return v5.transpose(2, 1, 3, 0).reshape(b, t, q)  # [k, T, j, l] -> [b, T, q]


def monarch_forward(x: np.ndarray, right: np.ndarray,
                    left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``y = x @ M.T`` as two batched matmuls, and the inner values a backward needs.

    Parameters
    ----------
    x : np.ndarray
        ``[T, K]`` float (float32 or float64; the result has the factors' common dtype).
    right : np.ndarray
        ``R [b, q, p]``.
    left : np.ndarray
        ``L [b, s, q]``.

    Returns
    -------
    y : np.ndarray
        ``[T, N]``, ``N = b s``.
    middle : np.ndarray
        ``[b, T, q]``: the inputs of ``L``'s blocks (``P^T R x``), as :func:`to_middle` orders
        them.
    """
    b, q, p = right.shape
    s = left.shape[1]
    t = x.shape[0]
    xb = x.reshape(t, b, p).transpose(1, 0, 2)  # [b, T, p]
    u = np.matmul(xb, right.transpose(0, 2, 1))  # [b, T, p] @ [b, p, q] -> [b, T, q]
    middle = to_middle(u)  # [b, T, q]
    w = np.matmul(middle, left.transpose(0, 2, 1))  # [b, T, q] @ [b, q, s] -> [b, T, s]
    y = w.transpose(1, 2, 0).reshape(t, s * b)  # y[t, o b + l] = w[l, t, o]
    return y, middle


def monarch_backward(d_y: np.ndarray, x: np.ndarray, right: np.ndarray, left: np.ndarray,
                     middle: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of ``y = x @ M.T`` with ``M = P L P^T R``, through the two batched matmuls.

    Forward (:func:`~npsparse.kernels.monarch.monarch_forward`): ``u_k = x_k R_k^T`` per block,
    ``v = P^T u``, ``w_l = v_l L_l^T``, ``y = P w``. Backward: ``dw = P^T dy``,
    ``dL_l = dw_l^T v_l``, ``dv_l = dw_l L_l``, ``du = P dv``, ``dR_k = du_k^T x_k``,
    ``dx_k = du_k R_k``.

    Parameters
    ----------
    d_y : np.ndarray
        ``[T, N]`` gradient with respect to the output.
    x : np.ndarray
        ``[T, K]`` the forward's input.
    right : np.ndarray
        ``R [b, q, p]``.
    left : np.ndarray
        ``L [b, s, q]``.
    middle : np.ndarray, optional
        ``[b, T, q]``, the forward's inner values (``monarch_forward(...)[1]``); recomputed
        (one batched matmul) when not given.

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        ``dx [T, K]``, ``d_right [b, q, p]``, ``d_left [b, s, q]``, in the inputs' dtype
        (float64 in, float64 out: the finite-difference tests run so).
    """
    b, q, p = right.shape
    s = left.shape[1]
    t = x.shape[0]
    if middle is None:
        middle = to_middle(np.matmul(x.reshape(t, b, p).transpose(1, 0, 2),
                                     right.transpose(0, 2, 1)))  # [b, T, q]
    d_w = d_y.reshape(t, s, b).transpose(2, 0, 1)  # [b, T, s]: d_w[l, t, o] = d_y[t, o b + l]
    d_left = np.matmul(d_w.transpose(0, 2, 1), middle)  # [b, s, T] @ [b, T, q] -> [b, s, q]
    d_middle = np.matmul(d_w, left)  # [b, T, s] @ [b, s, q] -> [b, T, q]
    d_u = from_middle(d_middle)  # [b, T, q], R's output order
    xb = x.reshape(t, b, p).transpose(1, 0, 2)  # [b, T, p]
    d_right = np.matmul(d_u.transpose(0, 2, 1), xb)  # [b, q, T] @ [b, T, p] -> [b, q, p]
    d_x = np.matmul(d_u, right).transpose(1, 0, 2).reshape(t, b * p)  # [b, T, p] -> [T, K]
    return d_x, d_right, d_left


def monarch_dense(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """The dense matrix ``M = P L P^T R`` of two factors.

    Parameters
    ----------
    right : np.ndarray
        ``R [b, q, p]``.
    left : np.ndarray
        ``L [b, s, q]``.

    Returns
    -------
    np.ndarray
        ``M [N, K]`` (``N = b s``, ``K = b p``), the factors' dtype:
        ``M[o b + l, k p + i] = sum_j left[l, o, k r + j] * right[k, j b + l, i]``.
    """
    b, q, p = right.shape
    s = left.shape[1]
    r = q // b
    left4 = left.reshape(b, s, b, r)  # [l, o, k, j]
    right4 = right.reshape(b, r, b, p)  # [k, j, l, i]
    m4 = np.einsum("lokj,kjli->olki", left4, right4)  # [s, b, b, p]
    return m4.reshape(s * b, b * p)


def project_factors(weight: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The Monarch factors closest to ``W`` in Frobenius norm (closed form, batched SVD).

    Sub-block ``(l, k)`` of ``W`` (rows ``o b + l``, columns ``k p + i``) is a sum of ``r``
    outer products of its own parameters (see :mod:`npsparse.monarch`), so its best
    rank-``r`` approximation (truncated SVD, Eckart-Young) is the projection: ``U sqrt(S)`` goes
    to ``L``, ``sqrt(S) V^T`` to ``R``.

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]``, float32 or float64.
    blocks : int
        ``b`` (see :func:`monarch_sizes` for what fits).

    Returns
    -------
    right : np.ndarray
        ``R [b, q, p]``.
    left : np.ndarray
        ``L [b, s, q]``; both float64 for a float64 ``W``, else float32 (the SVD runs in
        float64 either way).

    Raises
    ------
    NpsparseError
        ``W`` not 2-D or not numeric, or ``b`` that does not fit its shape.
    """
    weight = np.asarray(weight)
    out_dtype = np.float64 if weight.dtype == np.float64 else np.float32
    if weight.dtype != np.float64:
        weight = as_float32(weight, "weight")
    if weight.ndim != 2:
        raise NpsparseError(f"weight must be 2-D [N, K], got shape {weight.shape}")
    sizes = monarch_sizes(weight.shape, blocks)
    b, p, s, r = sizes.blocks, sizes.in_block, sizes.out_block, sizes.rank
    w4 = weight.astype(np.float64).reshape(s, b, b, p)  # [o, l, k, i]
    sub = w4.transpose(1, 2, 0, 3)  # [l, k, s, p]: sub-block (l, k)
    u, sv, vt = np.linalg.svd(sub, full_matrices=False)  # [l,k,s,m], [l,k,m], [l,k,m,p]
    root = np.sqrt(sv[..., :r])  # [l, k, r]
    left = u[..., :r] * root[..., None, :]  # [l, k, s, r]: left[l, o, k r + j]
    right = vt[..., :r, :] * root[..., :, None]  # [l, k, r, p]: right[k, j b + l, i]
    left = left.transpose(0, 2, 1, 3).reshape(sizes.left_shape)  # [l, s, k, r] -> [b, s, q]
    right = right.transpose(1, 2, 0, 3).reshape(sizes.right_shape)  # [k, r, l, p] -> [b, q, p]
    return (np.ascontiguousarray(right, dtype=out_dtype),
            np.ascontiguousarray(left, dtype=out_dtype))


# ---- kernels: right [b, q, p], left [b, s, q] float32|uint16 (bf16), x [T, K] -> y [T, N] ----

@jit
def _matmul_naive(right, left, x):  # the definition, entry by entry
    b, q, p = right.shape
    s = left.shape[1]
    r = q // b
    y = np.zeros((x.shape[0], b * s), dtype=np.float32)
    for t in range(x.shape[0]):
        for l in range(b):
            for o in range(s):
                acc = np.float32(0.0)
                for k in range(b):
                    for j in range(r):
                        inner = np.float32(0.0)  # row j b + l of block k of R, times x
                        for i in range(p):
                            inner += value_at(right[k, j * b + l], i) * x[t, k * p + i]
                        acc += value_at(left[l, o], k * r + j) * inner
                y[t, o * b + l] = acc
    return y


@pjit
def _gemv(right, left, x):  # x [1, K] -> y [1, N]
    # Rows and input slices are taken as 1-D contiguous views of 2-D reshapes: indexing the 3-D
    # factors directly (right[k, c], x[0, k p + i]) left LLVM a strided loop it did not
    # vectorise, 5-10x slower per byte than the dense GEMV.
    b, q, p = right.shape
    s = left.shape[1]
    r = q // b
    right_rows = right.reshape(b * q, p)
    left_rows = left.reshape(b * s, q)
    x1 = x[0]
    middle = np.empty(b * q, dtype=np.float32)  # [b, q]: inputs of L's blocks, to_middle order
    rows_per = row_block(b * q)
    for task in numba.prange((b * q + rows_per - 1) // rows_per):
        for row in range(task * rows_per, min(b * q, (task + 1) * rows_per)):
            k, c = row // q, row % q  # block k of R, its output c = j b + l
            weights = right_rows[row]
            xs = x1[k * p:(k + 1) * p]
            acc = np.float32(0.0)
            for i in range(p):
                acc += value_at(weights, i) * xs[i]
            middle[(c % b) * q + k * r + c // b] = acc
    y = np.empty((1, b * s), dtype=np.float32)
    rows_per = row_block(b * s)
    for task in numba.prange((b * s + rows_per - 1) // rows_per):
        for row in range(task * rows_per, min(b * s, (task + 1) * rows_per)):
            l, o = row // s, row % s  # rows of L in memory order
            weights = left_rows[row]
            inputs = middle[l * q:(l + 1) * q]
            acc = np.float32(0.0)
            for c in range(q):
                acc += value_at(weights, c) * inputs[c]
            y[0, o * b + l] = acc
    return y


class MonarchLinear(PackedLinear):
    """A Monarch matrix ``M = P L P^T R`` behind the linear seam.

    Arrays: ``right [b, q, p]`` and ``left [b, s, q]``, both float32 or both ``uint16`` (bf16
    bits); see :class:`MonarchSizes` for the sizes. The product is two batched matmuls for
    ``T > 1`` and a Numba GEMV for ``T == 1``; ``nnz`` is the parameter count.
    """

    FORMAT = "monarch"
    STACKABLE = False
    TRAINABLE = True

    @classmethod
    def pack(cls, weight, mask=None, blocks: int = 4, values: str = "fp32"):
        """Project ``W [N, K]`` onto ``b``-block Monarch matrices (:func:`project_factors`).

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible), or float64: projected as given, not
            rounded to float32 first (the SVD runs in float64 either way); only the factors
            are rounded, to ``values``.
        mask : None
            Monarch matrices have no mask; anything but ``None`` or all-True is refused.
        blocks : int
            ``b``, see :func:`monarch_sizes`.
        values : {"fp32", "bf16"}
            Storage of the factors (bf16: nearest, ties to even).

        Returns
        -------
        MonarchLinear
            The closest Monarch matrix in Frobenius norm (lossy).

        Raises
        ------
        NpsparseError
            A mask that drops weights, ``b`` that does not fit, or an unknown ``values``.
        """
        check_option(values, VALUE_TYPES, "monarch values")  # before the SVDs
        weight = np.asarray(weight)
        if weight.dtype != np.float64:  # float64 goes to project_factors as it is
            weight = as_float32(weight, "weight")
        if mask is not None:
            _, keep = check_weight_mask(np.zeros(weight.shape, np.float32), mask)
            if not keep.all():
                raise NpsparseError("monarch format takes no mask (it projects the whole weight)")
        return cls.from_factors(*project_factors(weight, blocks), values=values)

    @classmethod
    def from_factors(cls, right, left, values: str = "fp32"):
        """A layer from the two factors (as :func:`project_factors` gives them).

        Parameters
        ----------
        right : array-like
            ``R [b, q, p]`` float32 (float64 is rounded to float32).
        left : array-like
            ``L [b, s, q]``, same dtype.
        values : {"fp32", "bf16"}
            Storage: float32 as given, or rounded to bf16 (nearest, ties to even).

        Returns
        -------
        MonarchLinear

        Raises
        ------
        NpsparseError
            Factors whose shapes do not make a ``b``-block Monarch matrix, or an unknown
            ``values``.
        """
        check_option(values, VALUE_TYPES, "monarch values")
        factors = {}
        for name, a in (("right", right), ("left", left)):
            a = np.asarray(a)
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            a = np.ascontiguousarray(as_float32(a, f"monarch {name}"))
            factors[name] = to_bf16(a) if values == "bf16" else a
        shape = _shape_of(factors)
        return cls.from_arrays(factors, {"shape": f"{shape[0]},{shape[1]}", "values": values})

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored Monarch factors as a layer, without copying them.

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``right [b, q, p]`` and ``left [b, s, q]``, float32 (``values="fp32"``) or
            ``uint16`` bf16 bits (``values="bf16"``); others are ignored.
        metadata : dict of str to str
            ``shape`` (``"N,K"``, required), ``values`` (``"fp32"``, the default, or ``"bf16"``)
            and optionally ``blocks``, which must agree with the arrays.

        Returns
        -------
        MonarchLinear

        Raises
        ------
        NpsparseError
            A missing array, a wrong dtype or rank, shapes that do not match ``shape`` and
            ``b``, or ``b`` that does not fit the shape.
        """
        values = metadata.get("values", "fp32")
        check_option(values, VALUE_TYPES, "monarch values")
        dtype = VALUE_TYPES[values]
        check_arrays(arrays, {"right": (dtype, 3), "left": (dtype, 3)}, cls.FORMAT)
        shape = tuple(int(d) for d in metadata["shape"].split(","))
        blocks = arrays["right"].shape[0]
        if "blocks" in metadata and int(metadata["blocks"]) != blocks:
            raise NpsparseError(f"monarch metadata says {metadata['blocks']} blocks, the arrays "
                                f"have {blocks}")
        sizes = monarch_sizes(shape, blocks)
        check_shapes(arrays, {"right": sizes.right_shape, "left": sizes.left_shape}, cls.FORMAT)
        return cls({"right": arrays["right"], "left": arrays["left"]}, shape)

    @property
    def blocks(self) -> int:
        """int: ``b``, the number of diagonal blocks of each factor."""
        return int(self.arrays["right"].shape[0])

    @property
    def values_type(self) -> str:
        """str: ``"fp32"`` or ``"bf16"``, how the factors are stored."""
        return "bf16" if self.arrays["right"].dtype == np.uint16 else "fp32"

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(R [b, q, p], L [b, s, q])`` as float32 (bf16 values widened exactly).

        Returns
        -------
        tuple of np.ndarray
            The stored arrays themselves when they are float32 (or float64: a copy made by
            :meth:`trainable_copy` for gradient checks).
        """
        right, left = self.arrays["right"], self.arrays["left"]
        if right.dtype == np.uint16:
            return from_bf16(right), from_bf16(left)
        return right, left

    def trainable_copy(self, dtype=np.float32) -> "MonarchLinear":
        """The same matrix over writable copies of its factors, for fine-tuning.

        Parameters
        ----------
        dtype : numpy dtype
            float32 (training; bf16 factors are widened exactly) or float64 (gradient checks:
            the product, :meth:`backward` and :meth:`to_dense` then run in float64).

        Returns
        -------
        MonarchLinear
            A new layer; this one (often over a read-only memory map) is not changed.
        """
        right, left = self.factors()
        return MonarchLinear({"right": np.array(right, dtype=dtype),
                              "left": np.array(left, dtype=dtype)}, self.shape)

    def parameters(self) -> dict[str, np.ndarray]:
        """The factors an optimizer updates in place: ``{"right": R, "left": L}``.

        Returns
        -------
        dict of str -> np.ndarray
            The live float arrays (``right [b, q, p]``, ``left [b, s, q]``), not copies.

        Raises
        ------
        NpsparseError
            For bf16 factors, which cannot take small updates: train a :meth:`trainable_copy`.
        """
        if self.values_type == "bf16":
            raise NpsparseError("bf16 Monarch factors cannot train in place; train a float32 "
                                "copy (trainable_copy)")
        return {"right": self.arrays["right"], "left": self.arrays["left"]}

    def backward(self, d_y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, dict]:
        """Gradients of ``y = x @ M.T`` for the input and both factors (:func:`monarch_backward`).

        Parameters
        ----------
        d_y : np.ndarray
            ``[T, N]`` gradient with respect to the output.
        x : np.ndarray
            ``[T, K]`` the product's input.

        Returns
        -------
        (np.ndarray, dict)
            ``d_x [T, K]`` and ``{"right": [b, q, p], "left": [b, s, q]}``, named as
            :meth:`parameters` names the factors.
        """
        d_x, d_right, d_left = monarch_backward(d_y, x, *self.factors())
        return d_x, {"right": d_right, "left": d_left}

    def __call__(self, x):
        if self.arrays["right"].dtype == np.float64:  # a float64 copy, for gradient checks
            return monarch_forward(np.asarray(x, dtype=np.float64), *self.factors())[0]
        return super().__call__(x)

    def _options(self):
        return {"values": self.values_type, "blocks": str(self.blocks)}

    def _matmul(self, x):
        if x.shape[0] == 1:
            return _gemv(self.arrays["right"], self.arrays["left"], x)
        y, _ = monarch_forward(x, *self.factors())
        return y

    def matmul_naive(self, x):
        """``x @ M.T`` entry by entry from the definition (a scalar loop over both factors)."""
        return _matmul_naive(self.arrays["right"], self.arrays["left"],
                             np.ascontiguousarray(x, dtype=np.float32))

    def to_dense(self):
        """``M = P L P^T R`` as a dense float32 ``[N, K]`` (float64 for a float64 copy)."""
        dense = monarch_dense(*self.factors())
        return dense if dense.dtype == np.float64 else dense.astype(np.float32, copy=False)

    @property
    def nnz(self) -> int:
        """int: the parameter count, ``b q p + b s q`` (every stored value)."""
        return int(self.arrays["right"].size + self.arrays["left"].size)


def _shape_of(factors: dict) -> tuple[int, int]:
    """``(N, K)`` implied by ``right [b, q, p]`` and ``left [b, s, q]``."""
    right, left = factors["right"], factors["left"]
    if right.ndim != 3 or left.ndim != 3:
        raise NpsparseError(f"monarch factors must be 3-D [b, q, p] and [b, s, q], got shapes "
                            f"{list(right.shape)} and {list(left.shape)}")
    return left.shape[0] * left.shape[1], right.shape[0] * right.shape[2]
