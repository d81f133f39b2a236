"""Attention of one new token over the KV cache, in one Numba call (the decode step).

:func:`npsparse.models.layers.causal_attention` is the NumPy reference and handles every case;
for a single query position it costs about ten small NumPy calls per layer (batched matmuls,
softmax, reshapes), which at 30 layers per token is a visible share of decode time for a small
model. :func:`decode_step` does the whole step in one compiled call: rotate the new query and key
(RoPE, rotate-half layout, as :func:`npsparse.models.layers.apply_rope`), append key and value to
the cache, then :func:`decode_attention`: for every query head, scores against the cached keys of
its key/value group, a max-subtracted softmax, and the weighted sum of the cached values
(:func:`decode_attention_split` splits long contexts across the threads: 1.7x at 500 positions,
1.9x at 2000, on 2 threads). Each
cached key is read once per key/value group rather than once per query head, and the values are
summed into a small accumulator before the softmax normalisation: SmolLM2's attention (9 query
heads over 3 key/value heads) took 4.3 µs instead of 9.8 µs at 40 cached positions and 45 µs
instead of 111 µs at 500 (per layer and token, measured against the previous loop order).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._numba import jit, pjit

SPLIT_MIN_KEYS = 256  # from this many cached positions on, decode attention runs on all threads


@jit
def attend_range(q, cache_k, cache_v, first, stop, top_out, total_out, acc_out):
    """Unnormalised attention of every query head over cached positions ``first .. stop-1``.

    Per head ``h``: ``top_out[h]`` = the largest scaled score, ``total_out[h]`` = the sum of
    ``exp(score - top)``, ``acc_out[h]`` = the sum of ``exp(score - top) * value`` ([hd]). The
    softmax-weighted output is ``acc / total``; partial results over disjoint ranges merge
    exactly by rescaling with ``exp(top_i - max top)`` (see :func:`decode_attention_split`).

    Parameters
    ----------
    q : np.ndarray
        ``[H, hd]`` float32 rotated queries of the new position.
    cache_k, cache_v : np.ndarray
        ``[KV, capacity, hd]`` float32; query head ``h`` reads head ``h // (H // KV)``.
    first, stop : int
        The cached positions attended to, ``first <= i < stop``; requires ``stop > first``.
    top_out, total_out : np.ndarray
        ``[H]`` float32, written: the largest scaled score and the sum of ``exp(score - top)``.
    acc_out : np.ndarray
        ``[H, hd]`` float32, written: the sum of ``exp(score - top) * value``.
    """
    n_heads, head_dim = q.shape
    n_kv = cache_k.shape[0]
    group = n_heads // n_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    n = stop - first
    scores = np.empty((group, n), dtype=np.float32)  # one key/value group's query heads
    for kv in range(n_kv):
        for i in range(n):  # each cached key is read once for all heads of its group
            for g in range(group):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += q[kv * group + g, d] * cache_k[kv, first + i, d]
                scores[g, i] = dot * scale
        for g in range(group):
            h = kv * group + g
            top = scores[g, 0]
            for i in range(1, n):
                top = max(top, scores[g, i])
            total = np.float32(0.0)
            for i in range(n):
                scores[g, i] = np.exp(scores[g, i] - top)
                total += scores[g, i]
            acc = acc_out[h]
            acc[:] = 0.0
            for i in range(n):
                weight = scores[g, i]
                for d in range(head_dim):
                    acc[d] += weight * cache_v[kv, first + i, d]
            top_out[h] = top
            total_out[h] = total


@jit
def decode_attention(q, cache_k, cache_v, n_keys):
    """Scaled dot-product attention of one query position over ``n_keys`` cached positions.

    Parameters
    ----------
    q : np.ndarray
        ``[H, hd]`` float32, the rotated queries of the new position.
    cache_k, cache_v : np.ndarray
        ``[KV, capacity, hd]`` float32; positions ``0 .. n_keys-1`` are used (the new token's key
        and value already written). Query head ``h`` reads key/value head ``h // (H // KV)``.
    n_keys : int
        Number of positions attended to (``S``); the query is the last of them, so no mask.

    Returns
    -------
    np.ndarray
        ``[1, H*hd]`` float32, heads concatenated.
    """
    n_heads, head_dim = q.shape
    top = np.empty(n_heads, dtype=np.float32)
    total = np.empty(n_heads, dtype=np.float32)
    acc = np.empty((n_heads, head_dim), dtype=np.float32)
    attend_range(q, cache_k, cache_v, 0, n_keys, top, total, acc)
    out = np.empty((1, n_heads * head_dim), dtype=np.float32)
    for h in range(n_heads):
        for d in range(head_dim):
            out[0, h * head_dim + d] = acc[h, d] / total[h]
    return out


@pjit
def decode_attention_split(q, cache_k, cache_v, n_keys, n_parts):
    """:func:`decode_attention` with the cached positions split into ``n_parts`` ranges that the
    threads attend to in parallel (as flash-decoding does), then merged.

    Worth it for long contexts only (a parallel launch costs a few µs): :func:`decode_step` uses it
    from :data:`SPLIT_MIN_KEYS` positions on.

    Parameters
    ----------
    q, cache_k, cache_v, n_keys
        As for :func:`decode_attention`.
    n_parts : int
        Number of position ranges (one per thread); clipped to ``1 .. n_keys``.

    Returns
    -------
    np.ndarray
        ``[1, H*hd]`` float32, as :func:`decode_attention` gives up to float32 rounding (the sums
        run in another order).
    """
    n_heads, head_dim = q.shape
    n_parts = max(1, min(n_parts, n_keys))
    tops = np.empty((n_parts, n_heads), dtype=np.float32)
    totals = np.empty((n_parts, n_heads), dtype=np.float32)
    accs = np.empty((n_parts, n_heads, head_dim), dtype=np.float32)
    for part in numba.prange(n_parts):
        first = part * n_keys // n_parts
        stop = (part + 1) * n_keys // n_parts
        attend_range(q, cache_k, cache_v, first, stop, tops[part], totals[part], accs[part])
    out = np.empty((1, n_heads * head_dim), dtype=np.float32)
    for h in range(n_heads):
        top = tops[0, h]
        for part in range(1, n_parts):
            top = max(top, tops[part, h])
        total = np.float32(0.0)
        for d in range(head_dim):
            out[0, h * head_dim + d] = 0.0
        for part in range(n_parts):
            rescale = np.exp(tops[part, h] - top)
            total += totals[part, h] * rescale
            for d in range(head_dim):
                out[0, h * head_dim + d] += accs[part, h, d] * rescale
        for d in range(head_dim):
            out[0, h * head_dim + d] /= total
    return out


@jit
def _rotate(x, cos, sin):  # x [heads, hd], cos/sin [hd] -> rotated copy (rotate-half RoPE)
    half = x.shape[1] // 2
    out = np.empty_like(x)
    for h in range(x.shape[0]):
        for d in range(half):
            out[h, d] = x[h, d] * cos[d] - x[h, d + half] * sin[d]
            out[h, d + half] = x[h, d + half] * cos[d + half] + x[h, d] * sin[d + half]
    return out


@jit
def decode_step(q, k, v, cos, sin, cache_k, cache_v, position, rotate, threads=1):
    """One decode step of attention: RoPE, cache append, attention over ``position + 1`` keys.

    Parameters
    ----------
    q : np.ndarray
        ``[H, hd]`` float32 projected queries of the new token (biases added).
    k, v : np.ndarray
        ``[KV, hd]`` float32 projected key and value.
    cos, sin : np.ndarray
        ``[hd]`` float32 RoPE tables at ``position`` (ignored unless ``rotate``).
    cache_k, cache_v : np.ndarray
        ``[KV, capacity, hd]`` float32; ``position`` is written.
    position : int
        Position of the new token.
    rotate : bool
        Apply RoPE to ``q`` and ``k`` (LLaMA family) or not (learned positions).
    threads : int
        The most kernel threads (``numba.config.NUMBA_NUM_THREADS``); with more than one, from
        :data:`SPLIT_MIN_KEYS` positions on the attention runs split into that many ranges
        (:func:`decode_attention_split`). The ceiling, not the count in use, so the result does
        not depend on how many threads run (:mod:`npsparse.threads` changes that count with the
        machine's load). Passed in so this function stays cacheable.

    Returns
    -------
    np.ndarray
        ``[1, H*hd]`` float32.
    """
    if rotate:
        q = _rotate(q, cos, sin)
        k = _rotate(k, cos, sin)
    cache_k[:, position] = k
    cache_v[:, position] = v
    if position + 1 >= SPLIT_MIN_KEYS and threads > 1:
        return decode_attention_split(q, cache_k, cache_v, position + 1, threads)
    return decode_attention(q, cache_k, cache_v, position + 1)
