"""Monarch matrices (Dao et al., ICML 2022): projection of a dense weight, and the backward.

A Monarch matrix with ``b`` blocks is ``M = P L P^T R``: ``R`` and ``L`` are block-diagonal with
``b`` blocks each, and ``P`` is the "reshape to ``[b, n/b]``, transpose" permutation. The format
(storage, product, GEMV) is :mod:`npsparse.kernels.monarch`; this module holds what is computed
*onto* it: the closed-form projection of a dense ``W`` and the gradients of the product.

Sizes, square and rectangular (fly's ``MonarchLinear`` convention, HazyResearch/fly
``src/models/layers/monarch_linear.py``: ``blkdiag1 = R``, ``blkdiag2 = L``). For ``W [N, K]``::

    p = K / b          inputs of a block of R          R  [b, q, p]
    q = min(N, K) / b  outputs of a block of R = inputs of a block of L
    s = N / b          outputs of a block of L         L  [b, s, q]
    r = q / b          inner values each R block sends each L block

So the factor on the smaller side is square: ``R`` when ``K <= N`` (an MLP's up/gate, 576 ->
1536), ``L`` when ``N <= K`` (down, 1536 -> 576; k/v, 576 -> 192). Parameters:
``q (N + K) = min(N, K) (N + K) / b``; ``2 n^2 / b`` for a square ``n x n``. For SmolLM2 at
``b = 4``: 576x576 -> R, L ``[4, 144, 144]`` (r = 36, 50% of the weights); 1536x576 ->
R ``[4, 144, 144]``, L ``[4, 384, 144]`` (r = 36, 34.4%); 576x1536 -> R ``[4, 144, 384]``,
L ``[4, 144, 144]`` (34.4%); 192x576 -> R ``[4, 48, 144]``, L ``[4, 48, 48]`` (r = 12, 33.3%).
``b`` must divide ``N`` and ``K`` and ``b^2`` must divide ``min(N, K)``; ``b = 1`` (the dense
matrix) is refused.

Entry by entry, ``W[o b + l, k p + i] = sum_{j<r} L[l, o, k r + j] R[k, j b + l, i]``: read as
a 4-D tensor ``W4[o, l, k, i]`` (rows split ``(s, b)``, columns ``(b, p)``), the sub-block
``A_lk = W4[:, l, k, :]`` (``[s, p]``) is the sum of ``r`` outer products of columns of block
``l`` of ``L`` with rows of block ``k`` of ``R``, and no two sub-blocks share a parameter.
Hence the projection (the best Monarch approximation in Frobenius norm) is closed-form: the best
rank-``r`` approximation of each sub-block, a truncated SVD (Eckart-Young), split as
``U sqrt(S)`` into ``L`` and ``sqrt(S) V^T`` into ``R``. When ``b^2 = min(N, K)`` (``b = 24`` for
576) ``r = 1``: fly's ``blockdiag_butterfly_project`` (square, best rank-1 per sub-block); for
smaller ``b`` it is fly's ``blockdiag_butterfly_project_einsum_rank`` with rank ``r``, whose
factors ``blockdiag_butterfly_multiply`` multiplies in exactly this layout.
"""

from __future__ import annotations

import numpy as np

from .errors import NpsparseError
from .kernels._layer import as_float32
from .kernels.monarch import (MonarchLinear, MonarchSizes, from_middle, monarch_dense,
                              monarch_forward, monarch_sizes, parameter_count, to_middle)


def project_factors(weight: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The Monarch factors closest to ``W`` in Frobenius norm (closed form, batched SVD).

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]``, float32 or float64.
    blocks : int
        ``b`` (see :func:`~npsparse.kernels.monarch.monarch_sizes` for what fits).

    Returns
    -------
    right : np.ndarray
        ``R [b, q, p]``.
    left : np.ndarray
        ``L [b, s, q]``; both float64 for a float64 ``W``, else float32 (the SVD runs in
        float64 either way). The split of each singular value between the two factors is
        symmetric (``sqrt(S)`` to each).

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


def project(weight: np.ndarray, blocks: int, values: str = "fp32") -> MonarchLinear:
    """Project a dense weight onto ``b``-block Monarch matrices: the layer of the closest one.

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]`` float32 (or float64).
    blocks : int
        ``b >= 2`` dividing ``N`` and ``K``, with ``b^2`` dividing ``min(N, K)``.
    values : {"fp32", "bf16"}
        How the layer stores the factors (bf16: each rounded to nearest, ties to even).

    Returns
    -------
    MonarchLinear
        ``shape == W.shape``; ``to_dense()`` is the projection.

    Raises
    ------
    NpsparseError
        As :func:`project_factors`, or an unknown ``values``.
    """
    right, left = project_factors(weight, blocks)
    return MonarchLinear.from_factors(right, left, values=values)


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


__all__ = ["MonarchLinear", "MonarchSizes", "monarch_backward", "monarch_dense",
           "monarch_forward", "monarch_sizes", "parameter_count", "project", "project_factors"]
