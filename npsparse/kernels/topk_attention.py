"""SPT's top-L sparse attention (:func:`npsparse.sparse_attention.topk_attention`) in one Numba call.

The NumPy path builds an ``[R, S]`` matrix of approximate scores per block of query rows, masks
it and runs a full stable argsort of every row to keep L keys, then gathers ``[R, L, hd]`` copies
of the chosen keys and values: at 2048 positions that is slower than exact attention, which the
whole point of keeping L keys was to beat. :func:`topk_attention_kernel` does the same computation
query by query, with every temporary a small per-task buffer:

1. the query's ADC table ``[M, C]`` (its sub-vector dot products with every centroid);
2. ADC scores of the causally visible keys only (positions ``0 .. start+t``); when ``M`` is even
   and ``C <= 16``, from a table of sums over pairs of subspaces (``[M/2, C^2]``), so a key
   costs ``M/2`` lookups (the sum is the same up to float32 rounding order);
3. the top L of them without a sort (:func:`select_keys`: a histogram of the scores finds the
   bucket holding the L-th largest, a partition of that bucket alone finds the score; the keys
   above it and, in position order, the keys equal to it are taken), which is the same key
   *set* as :func:`npsparse.sparse_attention.select_topk`'s stable sort;
4. exact scaled dot products with the chosen keys, the optional clamp, a max-subtracted softmax
   and the weighted sum of their values.

With ``L >= start + t + 1`` steps 1-3 are skipped: the query attends to every visible key, which
is exact causal attention. Tasks are (query head, residue class of tokens): a task takes the
tokens ``first, first + n_strides, ...`` so that every task holds early (few visible keys) and
late (many) tokens alike and the threads stay balanced under the causal mask.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._numba import jit, pjit

TOKEN_STRIDES = 16  # tasks per query head (each takes every 16th token)
BUCKETS = 256  # histogram buckets of select_keys


@jit
def select_keys(scores, n_visible, n_keep, keys_out, scratch_pos, scratch_val, hist):
    """Positions of the ``n_keep`` highest of ``scores[:n_visible]``, ties to the lower position.

    No sort. With ``L < n_visible``, the L-th largest score ``x`` is found by one histogram
    pass: the scores' range is cut into ``len(hist)`` equal buckets (the bucket of a score never
    decreases as the score grows), counted, and the bucket holding ``x`` found from the top; a
    partition of that bucket's scores alone (typically a few) gives ``x``. A second pass gathers
    the keys of the buckets above (all taken) and of that bucket, of which those above ``x`` are
    taken, then those equal to ``x`` in position order until L are taken. The set equals the
    first L of a stable sort by descending score (:func:`npsparse.sparse_attention.select_topk`);
    the order within it is not by score.

    Parameters
    ----------
    scores : np.ndarray
        ``[>= n_visible]`` float32 (approximate) scores; entries past ``n_visible`` are ignored.
    n_visible : int
        Keys ``0 .. n_visible-1`` are candidates, ``n_visible >= 1``.
    n_keep : int
        L >= 1.
    keys_out : np.ndarray
        ``[>= min(L, n_visible)]`` int64, written with the chosen positions: those of the
        buckets above the boundary one, then those from it, each in position order.
    scratch_pos, scratch_val : np.ndarray
        ``[>= 2 * n_visible]`` int64 and ``[>= n_visible]`` float32 scratch.
    hist : np.ndarray
        ``[B]`` int64 scratch, ``B >= 1`` buckets (:data:`BUCKETS` in the kernel).

    Returns
    -------
    int
        The number of keys written, ``min(L, n_visible)`` (fewer only if scores are NaN).
    """
    if n_keep >= n_visible:
        for s in range(n_visible):
            keys_out[s] = s
        return n_visible
    n_buckets = len(hist)
    low = scores[0]
    high = scores[0]
    for s in range(1, n_visible):
        low = min(low, scores[s])
        high = max(high, scores[s])
    # float64: a float32 range cannot overflow it, so the bucket of x in [low, high] is in
    # 0 .. B and grows with x; the clip to 0 .. B-1 also keeps non-finite scores in bounds
    inv_width = 0.0
    if high > low:
        inv_width = n_buckets / (np.float64(high) - np.float64(low))
    hist[:] = 0
    bucket = scratch_pos  # each key's bucket, computed once so every pass agrees on it
    for s in range(n_visible):
        b = int((np.float64(scores[s]) - np.float64(low)) * inv_width)
        b = max(0, min(b, n_buckets - 1))
        bucket[s] = b
        hist[b] += 1
    higher = 0  # keys in buckets above the boundary one: fewer than L
    edge = n_buckets - 1
    while higher + hist[edge] < n_keep:
        higher += hist[edge]
        edge -= 1
    edge_pos = scratch_pos[n_visible:]  # the boundary bucket's keys and scores
    above = 0  # keys in buckets above it, compacted in place over their buckets
    count = 0
    for s in range(n_visible):  # branch-free: slots are overwritten until they are counted
        b = bucket[s]
        bucket[above] = s
        above += b > edge
        edge_pos[count] = s
        scratch_val[count] = scores[s]
        count += b == edge
    need = n_keep - above  # 1 .. count of them come from the boundary bucket
    cut = np.partition(scratch_val[:count], count - need)[count - need]  # the L-th largest
    ties = need  # keys scoring exactly `cut` to take, lowest positions first
    for i in range(count):
        ties -= scratch_val[i] > cut
    for i in range(above):
        keys_out[i] = bucket[i]
    taken = above
    for i in range(count):  # few: the boundary bucket only
        x = scratch_val[i]
        if x > cut or (x == cut and ties > 0):
            if taken < n_keep:
                keys_out[taken] = edge_pos[i]
            taken += 1
            if x == cut:
                ties -= 1
    return min(taken, n_keep)  # == n_keep unless scores hold NaN (whose order is undefined)


@jit
def _adc_table(query, books, table):
    """``table[m, c]`` = the query's sub-vector ``m`` dotted with centroid ``c`` of subspace
    ``m``. query [hd], books [M, C, d], table [M, C]."""
    n_sub, n_cent, sub_dim = books.shape
    for m in range(n_sub):
        for c in range(n_cent):
            dot = np.float32(0.0)
            for j in range(sub_dim):
                dot += query[m * sub_dim + j] * books[m, c, j]
            table[m, c] = dot


@jit
def _adc_scores(table, codes, n_visible, scores):
    """``scores[s]`` = the sum over subspaces of ``table[m, codes[s, m]]`` for keys
    ``0 .. n_visible-1``. table [M, C], codes [S, M] uint8."""
    n_sub = table.shape[0]
    for s in range(n_visible):
        total = np.float32(0.0)
        for m in range(n_sub):
            total += table[m, codes[s, m]]
        scores[s] = total


@jit
def encode_keys(k, codebooks):
    """PQ codes of every key/value head's keys: the nearest centroid (squared L2, ties to the
    lower index) in each subspace, the rule of :func:`npsparse.sparse_attention.encode`.

    Serial: the work is small next to the attention, smaller than what a parallel launch costs
    when another process holds a core.

    The squared distances are summed in another order than NumPy's, so a key equidistant from
    two centroids to within float32 rounding may get the other one; exact ties go to the lower
    index in both.

    Parameters
    ----------
    k : np.ndarray
        ``[KV, S, hd]`` float32 keys.
    codebooks : np.ndarray
        ``[KV, M, C, d]`` float32 with ``M * d = hd``.

    Returns
    -------
    np.ndarray
        ``[KV, S, M]`` uint8.
    """
    n_kv, n_keys, _ = k.shape
    n_sub, n_cent, sub_dim = codebooks.shape[1], codebooks.shape[2], codebooks.shape[3]
    codes = np.empty((n_kv, n_keys, n_sub), dtype=np.uint8)
    for row in range(n_kv * n_keys):
        h = row // n_keys
        s = row % n_keys
        for m in range(n_sub):
            best = 0
            best_dist = np.float32(0.0)
            for c in range(n_cent):
                dist = np.float32(0.0)
                for j in range(sub_dim):
                    diff = k[h, s, m * sub_dim + j] - codebooks[h, m, c, j]
                    dist += diff * diff
                if c == 0 or dist < best_dist:  # strict: a tie keeps the lower index
                    best = c
                    best_dist = dist
            codes[h, s, m] = best
    return codes


@jit
def _pair_codes(codes, n_cent, n_keys):
    """Codes of subspace pairs ``(2p, 2p+1)``: ``codes[..., 2p] * C + codes[..., 2p+1]``, of the
    first ``n_keys`` keys. codes [KV, >= S, M] uint8 with M even and C <= 16 -> [KV, S, M/2]
    uint8."""
    n_kv, n_sub = codes.shape[0], codes.shape[2]
    pairs = np.empty((n_kv, n_keys, n_sub // 2), dtype=np.uint8)
    for h in range(n_kv):
        for s in range(n_keys):
            for p in range(n_sub // 2):
                pairs[h, s, p] = codes[h, s, 2 * p] * n_cent + codes[h, s, 2 * p + 1]
    return pairs


@jit
def _adc_pair_scores(table, pair_table, pair_codes, n_visible, scores):
    """:func:`_adc_scores` with half the lookups: ``pair_table[p, a * C + b]`` is first filled
    with ``table[2p, a] + table[2p+1, b]`` (C^2 entries per pair of subspaces), then each key
    sums M/2 entries named by its pair codes. table [M, C], pair_table [M/2, C^2],
    pair_codes [S, M/2] uint8."""
    n_sub, n_cent = table.shape
    n_pairs = n_sub // 2
    for p in range(n_pairs):
        for a in range(n_cent):
            for b in range(n_cent):
                pair_table[p, a * n_cent + b] = table[2 * p, a] + table[2 * p + 1, b]
    for s in range(n_visible):
        total = np.float32(0.0)
        for p in range(n_pairs):
            total += pair_table[p, pair_codes[s, p]]
        scores[s] = total


@pjit
def topk_attention_kernel(q, k, v, start, n_keep, codebooks, codes, use_clamp, clamp,
                          n_strides=TOKEN_STRIDES):
    """Causal attention in which each query reads only its top-L keys by ADC score (see module).

    Parameters
    ----------
    q : np.ndarray
        ``[H, T, hd]`` float32 queries for positions ``start .. start+T-1``.
    k, v : np.ndarray
        ``[KV, P, hd]`` float32 keys/values, ``P >= S = start + T``: positions ``0 .. S-1`` are
        read, the rest not, so a ``[KV, capacity, hd]`` KV cache is read in place (a copy of
        its ``[:, :S]`` view would cost more than the attention at a long context); query head
        ``h`` reads key/value head ``h // (H // KV)``.
    start : int
        Position of the first query.
    n_keep : int
        L >= 1, keys per query (all visible ones if fewer).
    codebooks : np.ndarray
        ``[KV, M, C, d]`` float32, one PQ codebook per key/value head.
    codes : np.ndarray
        ``[KV, >= S, M]`` uint8 PQ codes of the keys, of which the first S are read
        (:func:`npsparse.sparse_attention.encode`); not read when ``L >= S``, so then
        ``[KV, 0, M]`` will do.
    use_clamp : bool
        Clip the scaled scores to ``[-clamp, clamp]`` before the softmax.
    clamp : float
        The bound (ignored unless ``use_clamp``).
    n_strides : int
        Tasks per query head: task ``first`` takes tokens ``first, first + n_strides, ...``.

    Returns
    -------
    np.ndarray
        ``[T, H*hd]`` float32, heads concatenated (as
        :func:`npsparse.models.layers.merge_heads`).
    """
    n_heads, n_tok, head_dim = q.shape
    n_kv = k.shape[0]
    n_keys = start + n_tok  # S: the keys read, of k.shape[1] >= S
    group = n_heads // n_kv
    n_sub, n_cent = codebooks.shape[1], codebooks.shape[2]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    bound = np.float32(clamp)
    width = min(n_keep, n_keys)
    n_strides = max(1, min(n_strides, n_tok))
    # pairs of subspaces looked up at once when their C^2 joint codes fit a byte (SmolLM2's
    # M=8, C=16: 4 lookups per key instead of 8)
    paired = n_sub % 2 == 0 and n_cent <= 16 and n_keep < n_keys
    pair_codes = _pair_codes(codes, n_cent, n_keys if paired else 0)  # [KV, S or 0, M/2]
    out = np.empty((n_tok, n_heads * head_dim), dtype=np.float32)
    for task in numba.prange(n_heads * n_strides):
        head = task // n_strides
        first = task % n_strides
        kv = head // group
        table = np.empty((n_sub, n_cent), dtype=np.float32)
        pair_table = np.empty((n_sub // 2, n_cent * n_cent), dtype=np.float32)
        scores = np.empty(n_keys, dtype=np.float32)
        keys = np.empty(width, dtype=np.int64)
        scratch_pos = np.empty(2 * n_keys, dtype=np.int64)
        scratch_val = np.empty(n_keys, dtype=np.float32)
        hist = np.empty(BUCKETS, dtype=np.int64)
        weights = np.empty(width, dtype=np.float32)
        acc = np.empty(head_dim, dtype=np.float32)
        for t in range(first, n_tok, n_strides):
            query = q[head, t]
            n_visible = start + t + 1
            if n_keep < n_visible:
                _adc_table(query, codebooks[kv], table)
                if paired:
                    _adc_pair_scores(table, pair_table, pair_codes[kv], n_visible, scores)
                else:
                    _adc_scores(table, codes[kv], n_visible, scores)
            count = select_keys(scores, n_visible, n_keep, keys, scratch_pos, scratch_val,
                                hist)  # all visible if L >= them
            for i in range(count):
                key = k[kv, keys[i]]
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += query[d] * key[d]
                dot *= scale
                if use_clamp:
                    dot = min(max(dot, -bound), bound)
                weights[i] = dot
            top = weights[0]  # count >= 1: a query always sees its own position
            for i in range(1, count):
                top = max(top, weights[i])
            total = np.float32(0.0)
            acc[:] = 0.0
            for i in range(count):
                weight = np.exp(weights[i] - top)
                total += weight
                value = v[kv, keys[i]]
                for d in range(head_dim):
                    acc[d] += weight * value[d]
            row = out[t, head * head_dim:(head + 1) * head_dim]
            for d in range(head_dim):
                row[d] = acc[d] / total
    return out
