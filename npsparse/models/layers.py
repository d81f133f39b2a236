"""Leaf functions of a transformer, float32 throughout. Shapes: T tokens, D model dim, H heads,
KV key/value heads, hd head dim, S keys attended to (cached + new)."""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy.special import expit

from ..kernels.attention import decode_step


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight``. x [T, D].

    Parameters
    ----------
    x : np.ndarray
        ``[T, D]`` float32.
    weight : np.ndarray
        ``[D]`` float32 scale.
    eps : float
        Added to the mean square before the square root.

    Returns
    -------
    np.ndarray
        ``[T, D]`` float32, a new array.
    """
    variance = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # [T, 1] (= np.mean)
    return (x / np.sqrt(variance + np.float32(eps))) * weight  # [T, D]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as PyTorch). x [T, D].

    Parameters
    ----------
    x : np.ndarray
        ``[T, D]`` float32.
    weight, bias : np.ndarray
        ``[D]`` float32 scale and shift.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    np.ndarray
        ``[T, D]`` float32, a new array.
    """
    mean = np.mean(x, axis=-1, keepdims=True)  # [T, 1]
    centered = x - mean  # [T, D]
    variance = np.mean(centered * centered, axis=-1, keepdims=True)  # [T, 1]
    return centered / np.sqrt(variance + np.float32(eps)) * weight + bias  # [T, D]


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``; ``expit`` does not overflow for large negative x.

    Parameters
    ----------
    x : np.ndarray
        float32, any shape (``[T, F]`` in the MLP).

    Returns
    -------
    np.ndarray
        float32, the shape of ``x``.
    """
    return x * expit(x)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``).

    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``, in float32 arithmetic.

    Parameters
    ----------
    x : np.ndarray
        float32, any shape (``[T, F]`` in the MLP).

    Returns
    -------
    np.ndarray
        float32, the shape of ``x``.
    """
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x * Phi(x)``.

    ``Phi`` is the standard normal CDF, computed as ``0.5 * (1 + erf(x / sqrt(2)))``.

    Parameters
    ----------
    x : np.ndarray
        float32, any shape (``[T, F]`` in the MLP).

    Returns
    -------
    np.ndarray
        float32, the shape of ``x``.
    """
    from scipy.special import erf

    return (np.float32(0.5) * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)


def relu(x: np.ndarray) -> np.ndarray:
    """``max(x, 0)`` elementwise (OPT's activation).

    Parameters
    ----------
    x : np.ndarray
        float32, any shape (``[T, F]`` in the MLP).

    Returns
    -------
    np.ndarray
        float32, the shape of ``x``, a new array.
    """
    return np.maximum(x, np.float32(0.0))


ACTIVATIONS = {"silu": silu, "gelu_new": gelu_tanh, "gelu": gelu_erf, "relu": relu}


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """RoPE inverse frequencies [hd/2], float32, with optional Llama-3 frequency scaling.

    Follows Hugging Face's ``_compute_default_rope_parameters`` (float32 arithmetic) and
    ``_compute_llama3_parameters``: long wavelengths are divided by ``factor``, short ones kept,
    and the band between is interpolated smoothly.

    Parameters
    ----------
    head_dim : int
        ``hd``; one frequency per pair of dimensions.
    theta : float
        RoPE base (``rope_theta``).
    scaling : tuple of (key, value) pairs or None
        Hugging Face ``rope_scaling`` as items (``ModelConfig.rope_scaling``). ``rope_type``
        (or ``type``) ``"linear"`` divides every frequency by ``factor``; any other type is read
        as ``"llama3"`` and needs ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
        ``original_max_position_embeddings``. None: no scaling.

    Returns
    -------
    np.ndarray
        ``[hd/2]`` float32.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)  # [hd/2]
    if scaling is None:
        return inv_freq
    params = dict(scaling)
    kind = params.get("rope_type", params.get("type"))
    if kind == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    # llama3
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RopeTables:
    """cos and sin for positions ``0 .. n-1``, computed once and shared by every block.

    :func:`rope_tables` per block and per token would recompute the same angles 30 times per
    decoded token; the table grows (doubling) when a later position is asked for. Values are
    identical to :func:`rope_tables` of the same positions.
    """

    def __init__(self, inv_freq: np.ndarray):
        self.inv_freq = inv_freq  # [hd/2]
        self.cos, self.sin = rope_tables(np.arange(0), inv_freq)  # [0, hd]

    def __call__(self, start: int, n_tok: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, hd] for positions ``start .. start+T-1``."""
        if start + n_tok > len(self.cos):
            size = max(start + n_tok, 2 * len(self.cos), 64)
            self.cos, self.sin = rope_tables(np.arange(size), self.inv_freq)
        return self.cos[start:start + n_tok], self.sin[start:start + n_tok]


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, hd] for the given positions, in the rotate-half layout.

    Column ``j`` and column ``j + hd/2`` hold the same angle ``position * inv_freq[j]``, as
    Hugging Face's ``rotate_half`` convention expects.

    Parameters
    ----------
    positions : np.ndarray
        ``[T]`` integer positions (converted to float32 before multiplying).
    inv_freq : np.ndarray
        ``[hd/2]`` float32 inverse frequencies, from :func:`rope_inv_freq`.

    Returns
    -------
    cos, sin : np.ndarray
        ``[T, hd]`` float32 each.
    """
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, hd]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (i, i + hd/2) of every head. x [heads, T, hd], cos/sin [T, hd].

    Computes ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, where
    ``x1``, ``x2`` are the first and second halves of the last axis.

    Parameters
    ----------
    x : np.ndarray
        ``[H, T, hd]`` (queries) or ``[KV, T, hd]`` (keys) float32.
    cos, sin : np.ndarray
        ``[T, hd]`` float32 tables of the tokens' positions (:func:`rope_tables`).

    Returns
    -------
    np.ndarray
        float32, the shape of ``x``, a new array.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [heads, T, hd]
    return x * cos + rotated * sin


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``, after subtracting the maximum so ``exp`` cannot overflow.

    Parameters
    ----------
    x : np.ndarray
        float32 scores, any shape (``[KV, g, T, S]`` in attention); not modified.
    axis : int
        Axis to normalise over.

    Returns
    -------
    np.ndarray
        A new array of the shape and dtype of ``x``, summing to 1 along ``axis``.
    """
    x = x - np.max(x, axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= np.sum(x, axis=axis, keepdims=True)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 for an exact sum of many NLL terms.

    Parameters
    ----------
    x : np.ndarray
        ``[T, V]`` logits (float32); not modified.

    Returns
    -------
    np.ndarray
        ``[T, V]`` float64 log-probabilities.
    """
    x = x.astype(np.float64)
    x -= np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """``[T, heads*hd]`` -> ``[heads, T, hd]`` (a strided view).

    Parameters
    ----------
    x : np.ndarray
        ``[T, heads*hd]`` projections.
    n_heads : int
        Number of heads.

    Returns
    -------
    np.ndarray
        ``[heads, T, hd]``, a view of ``x``.
    """
    n_tok = x.shape[0]
    return x.reshape(n_tok, n_heads, x.shape[1] // n_heads).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """``[heads, T, hd]`` -> ``[T, heads*hd]``, heads concatenated (the inverse of split_heads).

    Parameters
    ----------
    x : np.ndarray
        ``[heads, T, hd]``.

    Returns
    -------
    np.ndarray
        ``[T, heads*hd]``.
    """
    n_heads, n_tok, head_dim = x.shape
    return x.transpose(1, 0, 2).reshape(n_tok, n_heads * head_dim)


def attention_probs(q: np.ndarray, k: np.ndarray, start: int) -> np.ndarray:
    """Causal softmax attention weights, query heads grouped by the key/value head they read.

    Parameters
    ----------
    q : [H, T, hd]
        Queries for positions ``start .. start+T-1``.
    k : [KV, S, hd]
        Keys for positions ``0 .. S-1`` (``S = start + T``); query head ``h`` reads kv head
        ``h // (H // KV)``.
    start : int
        Position of the first query.

    Returns
    -------
    np.ndarray
        ``[KV, g*T, S]`` (``g = H // KV``; row ``i*T + t`` is query head ``kv*g + i`` at token
        ``t``), each row summing to 1, zero above the causal diagonal.
    """
    n_heads, n_tok, head_dim = q.shape
    n_kv, n_keys, _ = k.shape
    group = n_heads // n_kv
    qg = q.reshape(n_kv, group * n_tok, head_dim)  # [KV, g*T, hd]
    scores = qg @ k.transpose(0, 2, 1)  # [KV, g*T, S]
    scores *= np.float32(1.0 / math.sqrt(head_dim))
    scores = scores.reshape(n_kv, group, n_tok, n_keys)  # [KV, g, T, S]
    if n_tok > 1 or n_keys > start + 1:
        query_pos = start + np.arange(n_tok)[:, None]  # [T, 1]
        future = np.arange(n_keys)[None, :] > query_pos  # [T, S]
        scores[:, :, future] = -np.inf
    return softmax(scores).reshape(n_kv, group * n_tok, n_keys)  # [KV, g*T, S]


def attend(probs: np.ndarray, v: np.ndarray, n_heads: int) -> np.ndarray:
    """Weighted sum of values: ``probs @ v`` per key/value head, heads merged.

    Parameters
    ----------
    probs : [KV, g*T, S]
        From :func:`attention_probs`.
    v : [KV, S, hd]
        Values.
    n_heads : int
        H.

    Returns
    -------
    np.ndarray
        ``[T, H*hd]``.
    """
    out = probs @ v  # [KV, g*T, hd]
    return merge_heads(out.reshape(n_heads, -1, v.shape[-1]))  # [T, H*hd]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Scaled dot-product attention with a causal mask and grouped key/value heads.

    Parameters
    ----------
    q : [H, T, hd] float32
        Queries for positions ``start .. start+T-1``.
    k, v : [KV, S, hd] float32
        Keys/values for positions ``0 .. S-1`` (``S = start + T``); query head ``h`` reads kv head
        ``h // (H // KV)``.
    start : int
        Position of the first query.

    Returns
    -------
    np.ndarray
        [T, H*hd] float32, heads concatenated.
    """
    return attend(attention_probs(q, k, start), v, q.shape[0])  # [T, H*hd]


def append_to_cache(cache_k: np.ndarray, cache_v: np.ndarray, k: np.ndarray, v: np.ndarray,
                    start: int) -> tuple[np.ndarray, np.ndarray]:
    """Write new keys/values at positions ``start ..`` and return every cached position.

    Parameters
    ----------
    cache_k, cache_v : [KV, capacity, hd]
        One layer's cache.
    k, v : [KV, T, hd]
        The new tokens' keys (rotated) and values.
    start : int
        Position of the first new token.

    Returns
    -------
    (np.ndarray, np.ndarray)
        Views ``[KV, start+T, hd]`` of the cache.
    """
    end = start + k.shape[1]
    cache_k[:, start:end] = k
    cache_v[:, start:end] = v
    return cache_k[:, :end], cache_v[:, :end]


_NO_ROPE = np.empty((1, 0), dtype=np.float32)  # decode_step's cos/sin when there is no RoPE


def multi_head_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_heads: int, n_kv: int,
                         start: int, cache_k=None, cache_v=None, rope=None) -> np.ndarray:
    """Split projections into heads, rotate (optional), append to the cache, attend.

    Parameters
    ----------
    q : [T, H*hd]; k, v : [T, KV*hd] float32
        Projected queries, keys, values (biases already added).
    n_heads, n_kv : int
        H and KV.
    start : int
        Position of the first token.
    cache_k, cache_v : [KV, capacity, hd] float32, optional
        This layer's KV cache; positions ``start .. start+T-1`` are written.
    rope : (cos, sin) of [T, hd], optional
        Rotary embedding to apply to q and k.

    Returns
    -------
    np.ndarray
        [T, H*hd] float32.
    """
    n_tok = q.shape[0]
    head_dim = q.shape[1] // n_heads
    if n_tok == 1 and cache_k is not None:  # decode: the same arithmetic in one compiled call
        cos, sin = rope if rope is not None else (_NO_ROPE, _NO_ROPE)
        return decode_step(q.reshape(n_heads, head_dim), k.reshape(n_kv, head_dim),
                           v.reshape(n_kv, head_dim), cos[0], sin[0], cache_k, cache_v, start,
                           rope is not None, numba.config.NUMBA_NUM_THREADS)  # [1, H*hd]
    q, k, v = split_heads(q, n_heads), split_heads(k, n_kv), split_heads(v, n_kv)  # [heads, T, hd]
    if rope is not None:
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
    if cache_k is not None:
        k, v = append_to_cache(cache_k, cache_v, k, v, start)  # [KV, S, hd]
    return causal_attention(q, k, v, start)  # [T, H*hd]
