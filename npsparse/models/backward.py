"""Vector-Jacobian products of the leaf functions in :mod:`.layers`, one per forward, same order.

Each takes the gradient of a scalar loss with respect to the forward's output and returns the
gradients with respect to its inputs. They are dtype-generic (float64 checks float32: see
``tests/test_backward.py``, which compares each with central finite differences). A linear layer
needs no function here: for ``y = x @ W.T``, ``dx = dy @ W`` and ``dW = dy.T @ x``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit


def rms_norm_backward(d_y: np.ndarray, x: np.ndarray, weight: np.ndarray,
                      eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Backward of ``y = x * r * w`` with ``r = 1 / sqrt(mean(x^2) + eps)`` per row.

    ``dw = sum_t dy * x * r``; with ``g = dy * w``, ``dx = r * g - x * r^3 * mean(g * x)``.

    Parameters
    ----------
    d_y : np.ndarray
        ``[T, D]`` gradient with respect to the output.
    x : np.ndarray
        ``[T, D]`` the forward's input.
    weight : np.ndarray
        ``[D]`` gain.
    eps : float
        The forward's epsilon.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``dx [T, D]`` and ``dw [D]``.
    """
    dim = x.shape[-1]
    r = 1.0 / np.sqrt((x * x).sum(axis=-1, keepdims=True) / dim + eps)  # [T, 1]
    x_hat = x * r  # [T, D]
    d_w = (d_y * x_hat).sum(axis=0)  # [D]
    g = d_y * weight  # [T, D]
    d_x = r * (g - x_hat * ((g * x_hat).sum(axis=-1, keepdims=True) / dim))  # [T, D]
    return d_x.astype(x.dtype, copy=False), d_w.astype(weight.dtype, copy=False)


def rope_backward(d_y: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Backward of :func:`~.layers.apply_rope`: rotating back by the same angles.

    The forward is ``y = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) =
    [-x2, x1]``; its transpose maps ``z`` to ``[z2, -z1]``, so
    ``dx = dy * cos + [ (dy * sin)_2, -(dy * sin)_1 ]``.

    Parameters
    ----------
    d_y : np.ndarray
        ``[heads, T, hd]``.
    cos, sin : np.ndarray
        ``[T, hd]`` tables of the forward.

    Returns
    -------
    np.ndarray
        ``[heads, T, hd]``.
    """
    half = d_y.shape[-1] // 2
    z = d_y * sin
    return d_y * cos + np.concatenate([z[..., half:], -z[..., :half]], axis=-1)


def attention_backward(d_out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                       probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of causal grouped-query attention (:func:`~.layers.attention_probs` + ``attend``).

    With ``S = q k^T / sqrt(hd)``, ``P = softmax(S)`` (causal) and ``O = P v``:
    ``dP = dO v^T``, ``dv = P^T dO``, ``dS = P * (dP - sum(dP * P))`` row by row,
    ``dq = dS k / sqrt(hd)``, ``dk = dS^T q / sqrt(hd)``. Query heads that share a key/value head
    are one block of rows, so ``dk`` and ``dv`` sum over them through the products. Masked
    positions have ``P = 0`` and so no gradient.

    Parameters
    ----------
    d_out : np.ndarray
        ``[H, T, hd]`` gradient with respect to the attention output (heads split).
    q : np.ndarray
        ``[H, T, hd]`` queries (rotated).
    k, v : np.ndarray
        ``[KV, S, hd]`` keys (rotated) and values.
    probs : np.ndarray
        ``[KV, g*T, S]`` the forward's attention weights.

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        ``dq [H, T, hd]``, ``dk [KV, S, hd]``, ``dv [KV, S, hd]``.
    """
    n_heads, n_tok, head_dim = q.shape
    n_kv = k.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))  # exactly the forward's factor
    d_o = d_out.reshape(n_kv, -1, head_dim)  # [KV, g*T, hd]
    qg = q.reshape(n_kv, -1, head_dim)  # [KV, g*T, hd]
    d_v = probs.transpose(0, 2, 1) @ d_o  # [KV, S, hd]
    d_p = d_o @ v.transpose(0, 2, 1)  # [KV, g*T, S]
    d_s = probs * (d_p - (d_p * probs).sum(axis=-1, keepdims=True))  # [KV, g*T, S]
    d_s *= scale
    d_q = (d_s @ k).reshape(n_heads, n_tok, head_dim)  # [H, T, hd]
    d_k = d_s.transpose(0, 2, 1) @ qg  # [KV, S, hd]
    return d_q, d_k, d_v


def swiglu_backward(d_act: np.ndarray, gate: np.ndarray,
                    up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward of ``act = silu(gate) * up``.

    ``d_up = d_act * silu(gate)``; ``d_gate = d_act * up * s * (1 + gate * (1 - s))`` with
    ``s = sigmoid(gate)`` (the derivative of ``g * s(g)``).

    Parameters
    ----------
    d_act : np.ndarray
        ``[T, F]`` gradient with respect to ``act``.
    gate, up : np.ndarray
        ``[T, F]`` the forward's inputs.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``d_gate [T, F]`` and ``d_up [T, F]``.
    """
    s = expit(gate)  # [T, F]
    d_up = d_act * (gate * s)
    d_gate = d_act * up * (s * (1.0 + gate * (1.0 - s)))
    return d_gate, d_up


def embedding_backward(d_x: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Backward of a row lookup ``x = E[ids]``: scatter-add the rows' gradients.

    Parameters
    ----------
    d_x : np.ndarray
        ``[T, D]`` gradient with respect to the looked-up rows.
    ids : np.ndarray
        ``[T]`` token ids (repeats add up).
    vocab_size : int
        ``V``.

    Returns
    -------
    np.ndarray
        ``[V, D]`` gradient with respect to ``E``.
    """
    d_e = np.zeros((vocab_size, d_x.shape[1]), dtype=d_x.dtype)
    np.add.at(d_e, ids, d_x)
    return d_e
