"""SPT's sparse multi-head attention: each query attends only to its top-L keys, found with product
quantization (PQ), with a softmax over those keys alone (Gui et al. 2023, issue 16).

Shapes: T tokens, S keys (``S = start + T``), H/KV query/key-value heads, hd head dim, M PQ
subspaces of ``d = hd / M`` dims, C centroids per subspace, L keys kept per query.

What the prototype (ytgui/SPT-proto) does, read for this module:

- ``naive_gpt/layers/basic/quantizer.py`` (``PQBase``): one codebook ``[M, C, d]`` per attention
  layer, *shared by q and k* (the same quantizer encodes both). It is trained by gradient
  descent (MSE of the inputs to their hard centroids plus a soft-assignment term), and codes are
  assigned by the nearest centroid in L1 distance (``torch.cdist(p=1)``, ``extension/cdist.cu``).
- ``naive_gpt/layers/sparse/attention.py`` (``SparseRotaryAttentionV2._get_attn``): q and k are
  both encoded; ``kernels.lookup`` picks ``S / 8`` keys per query; exact scores are computed on
  them only (``sddmm``), scaled, *clamped to [-10, 10]*, sparse-softmaxed and multiplied by V.
- ``extension/lookup.cu``: a candidate key is scored by how many of its M codes *equal* the
  query's codes (a Hamming-style count, bucketed into 3 slots), not by dot products; there is no
  causal mask in the lookup.

Where this module departs, and why:

- Codebooks are fitted by a seeded k-means (Lloyd, squared L2) on calibration samples instead of
  trained by gradient: no training loop is needed at inference, and the fit is deterministic.
  Following the prototype, one codebook serves a head's queries and keys: fit it on both.
- Candidate keys are ranked by asymmetric distance computation (ADC, Jegou et al. 2011): the
  query stays exact, a lookup table of its sub-vector dot products with every centroid is summed
  over the key's codes. This approximates ``q . k`` itself, where the prototype's code-match count
  only approximates closeness of q and k (a poor proxy for a dot product).
- Top-L is restricted to causally visible keys (the prototype's lookup ignores the mask); ties
  go to the lower position; L is given, not fixed at ``S / 8``.
- The clamp of the scaled scores to [-10, 10] is optional (``clamp``); it is off by default,
  because a pretrained model that was not fine-tuned with it has logits beyond 10.
- GQA: one codebook per key/value head; the query heads of a group share that head's codes.
"""

from __future__ import annotations

import math
import time
import weakref

import numpy as np

from .errors import NpsparseError
from .kernels.topk_attention import encode_keys, topk_attention_kernel
from .models.layers import merge_heads, softmax

_ROWS = 256  # query rows per block: bounds the [rows, S] and [rows, L, hd] temporaries
_FIT_CHUNK = 4096  # samples per block when assigning to centroids


def _check_subspaces(head_dim: int, n_sub: int) -> int:
    if n_sub < 1 or head_dim % n_sub != 0:
        raise NpsparseError(f"PQ subspaces M={n_sub} must be >= 1 and divide head dim {head_dim}")
    return head_dim // n_sub


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2, ties to the lower index). x [N, d], c [C, d]."""
    nearest = np.empty(len(x), dtype=np.int64)
    for lo in range(0, len(x), _FIT_CHUNK):
        diff = x[lo:lo + _FIT_CHUNK, None, :] - centroids[None, :, :]  # [n, C, d]
        nearest[lo:lo + _FIT_CHUNK] = np.argmin((diff * diff).sum(axis=-1), axis=1)  # [n]
    return nearest


def _initial_centroids(x: np.ndarray, n_centroids: int, rng: np.random.Generator) -> np.ndarray:
    """C distinct sample rows chosen by ``rng``; all distinct rows (padded) if there are <= C."""
    distinct = np.unique(x, axis=0)  # [U, d], sorted, so the choice does not depend on row order
    if len(distinct) <= n_centroids:
        pad = np.repeat(distinct[:1], n_centroids - len(distinct), axis=0)  # never nearest first
        return np.concatenate([distinct, pad]).astype(np.float32)  # [C, d]
    chosen = np.sort(rng.choice(len(distinct), size=n_centroids, replace=False))  # [C]
    return distinct[chosen].astype(np.float32)  # [C, d]


def _lloyd(x: np.ndarray, centroids: np.ndarray, iters: int) -> np.ndarray:
    """k-means iterations; an empty cluster keeps its centroid. x [N, d], centroids [C, d]."""
    n_centroids = len(centroids)
    for _ in range(iters):
        nearest = _nearest(x, centroids)  # [N]
        counts = np.bincount(nearest, minlength=n_centroids)  # [C]
        # per-dim bincount in float64: np.add.at gave the same sums 3x slower
        sums = np.stack([np.bincount(nearest, weights=x[:, j], minlength=n_centroids)
                         for j in range(x.shape[1])], axis=1)  # [C, d]
        filled = counts > 0
        centroids = centroids.copy()
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return centroids


def fit_codebooks(samples: np.ndarray, n_sub: int, n_centroids: int, seed: int,
                  iters: int = 20) -> np.ndarray:
    """Fit one PQ codebook per subspace by seeded k-means on calibration vectors of one head.

    ``hd`` is split into ``M`` contiguous subspaces of ``d = hd / M`` dims; in each, ``C``
    centroids start at distinct sample sub-vectors chosen by ``seed`` (all of them, padded by a
    repeat, if there are at most ``C`` distinct ones, so such data is represented exactly) and
    move by ``iters`` Lloyd iterations (squared L2). SPT shares one codebook between a head's
    queries and keys: pass both, stacked, as ``samples``.

    Parameters
    ----------
    samples : np.ndarray
        ``[N, hd]`` float32 calibration vectors (one layer, one key/value head), ``N >= 1``.
    n_sub : int
        M, the number of subspaces; must divide ``hd``.
    n_centroids : int
        C, centroids per subspace, ``1 <= C <= 256`` (codes are uint8).
    seed : int
        Seed of the initial choice; the result depends only on the inputs and the seed.
    iters : int
        Lloyd iterations (fixed; no convergence test).

    Returns
    -------
    np.ndarray
        ``[M, C, d]`` float32 codebooks.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 2 or len(samples) == 0:
        raise NpsparseError(f"PQ calibration samples must be [N>=1, hd], got {samples.shape}")
    if not 1 <= n_centroids <= 256:
        raise NpsparseError(f"PQ centroids C={n_centroids} must be in 1..256 (uint8 codes)")
    if iters < 0:
        raise NpsparseError(f"PQ k-means iterations must be >= 0, got {iters}")
    sub_dim = _check_subspaces(samples.shape[1], n_sub)
    rng = np.random.default_rng(seed)
    parts = samples.reshape(len(samples), n_sub, sub_dim)  # [N, M, d]
    books = np.empty((n_sub, n_centroids, sub_dim), dtype=np.float32)  # [M, C, d]
    for m in range(n_sub):
        x = np.ascontiguousarray(parts[:, m])  # [N, d]
        books[m] = _lloyd(x, _initial_centroids(x, n_centroids, rng), iters)
    return books


def fit_head_codebooks(samples: np.ndarray, n_sub: int, n_centroids: int, seed: int,
                       iters: int = 20) -> np.ndarray:
    """:func:`fit_codebooks` for every key/value head of one layer, seeded ``seed + head``.

    Parameters
    ----------
    samples : np.ndarray
        ``[KV, N, hd]`` float32 calibration vectors per key/value head (keys, or keys and the
        queries of the head's group stacked along N).
    n_sub, n_centroids, seed, iters
        As in :func:`fit_codebooks`.

    Returns
    -------
    np.ndarray
        ``[KV, M, C, d]`` float32.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 3:
        raise NpsparseError(f"PQ calibration samples must be [KV, N, hd], got {samples.shape}")
    return np.stack([fit_codebooks(samples[h], n_sub, n_centroids, seed + h, iters)
                     for h in range(samples.shape[0])])  # [KV, M, C, d]


def encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """PQ codes: the nearest centroid (squared L2, ties to the lower index) in each subspace.

    Parameters
    ----------
    x : np.ndarray
        ``[..., hd]`` float32 vectors (keys of one key/value head, ``[S, hd]``).
    codebooks : np.ndarray
        ``[M, C, d]`` float32 with ``M * d = hd``, from :func:`fit_codebooks`.

    Returns
    -------
    np.ndarray
        ``[..., M]`` uint8.
    """
    n_sub, _, sub_dim = codebooks.shape
    if x.shape[-1] != n_sub * sub_dim:
        raise NpsparseError(f"PQ codebooks {codebooks.shape} do not fit head dim {x.shape[-1]}")
    parts = np.asarray(x, dtype=np.float32).reshape(-1, n_sub, sub_dim)  # [N, M, d]
    codes = np.empty((len(parts), n_sub), dtype=np.uint8)  # [N, M]
    for m in range(n_sub):
        codes[:, m] = _nearest(parts[:, m], codebooks[m])
    return codes.reshape(*x.shape[:-1], n_sub)  # [..., M]


def approximate_scores(q: np.ndarray, codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Approximate ``q . k`` for every query and key by ADC over the keys' PQ codes (unscaled).

    For each query a table ``[M, C]`` of its sub-vector dot products with every centroid is
    built; a key's score is the sum over subspaces of the table entry its code names. This equals
    ``q . k_hat`` where ``k_hat`` is the key rebuilt from its centroids.

    Parameters
    ----------
    q : np.ndarray
        ``[R, hd]`` float32 queries (rows of one key/value head's group).
    codes : np.ndarray
        ``[S, M]`` uint8 key codes from :func:`encode`.
    codebooks : np.ndarray
        ``[M, C, d]`` float32.

    Returns
    -------
    np.ndarray
        ``[R, S]`` float32.
    """
    n_sub, _, sub_dim = codebooks.shape
    parts = q.reshape(len(q), n_sub, sub_dim)  # [R, M, d]
    table = np.einsum("rmd,mcd->mrc", parts, codebooks)  # [M, R, C]
    scores = np.zeros((len(q), len(codes)), dtype=np.float32)  # [R, S]
    for m in range(n_sub):
        scores += table[m][:, codes[:, m]]  # [R, S]
    return scores


def select_topk(scores: np.ndarray, query_pos: np.ndarray, n_keep: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``L`` highest-scoring causally visible keys of each query, ties to the lower position.

    Parameters
    ----------
    scores : np.ndarray
        ``[R, S]`` float32 (approximate) scores; key ``s`` is visible to a query at position
        ``p`` when ``s <= p``.
    query_pos : np.ndarray
        ``[R]`` int positions of the queries, each in ``0 .. S-1``.
    n_keep : int
        L >= 1.

    Returns
    -------
    keys : np.ndarray
        ``[R, min(L, S)]`` int64 key positions, best first; in a row with fewer than L visible
        keys, the entries past its visible count are padding (future positions).
    valid : np.ndarray
        ``[R, min(L, S)]`` bool, False on that padding.
    """
    n_keys = scores.shape[1]
    width = min(n_keep, n_keys)
    visible = np.arange(n_keys)[None, :] <= query_pos[:, None]  # [R, S]
    masked = np.where(visible, scores, -np.inf)  # [R, S]
    # a stable sort of the negated scores keeps equal scores in position order
    keys = np.argsort(-masked, axis=1, kind="stable")[:, :width]  # [R, L]
    valid = np.arange(width)[None, :] < (query_pos[:, None] + 1)  # [R, L]
    return keys, valid


def _attend_selected(q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray,
                     valid: np.ndarray, clamp: float | None) -> np.ndarray:
    """Exact scores on the chosen keys only, softmax over them, weighted sum of their values."""
    scale = np.float32(1.0 / math.sqrt(q.shape[1]))
    chosen_k = k[keys]  # [R, L, hd]
    scores = (chosen_k @ q[:, :, None])[:, :, 0] * scale  # [R, L]
    if clamp is not None:
        scores = np.clip(scores, np.float32(-clamp), np.float32(clamp))
    scores[~valid] = -np.inf
    probs = softmax(scores)  # [R, L]
    return (probs[:, None, :] @ v[keys])[:, 0, :]  # [R, hd]


def _check_inputs(q, k, v, start, n_keep, codebooks) -> None:
    if n_keep < 1:
        raise NpsparseError(f"sparse attention needs L >= 1 keys per query, got {n_keep}")
    n_heads, n_tok, head_dim = q.shape
    n_kv, n_keys, _ = k.shape
    if n_heads % n_kv != 0 or v.shape != k.shape or k.shape[2] != head_dim:
        raise NpsparseError(f"attention shapes q {q.shape}, k {k.shape}, v {v.shape} disagree")
    if n_keys != start + n_tok:
        raise NpsparseError(f"attention has {n_keys} keys, expected start + T = {start + n_tok}")
    if codebooks.ndim != 4 or codebooks.shape[0] != n_kv:
        raise NpsparseError(f"PQ codebooks must be [KV={n_kv}, M, C, d], got {codebooks.shape}")
    _check_subspaces(head_dim, codebooks.shape[1])
    if codebooks.shape[1] * codebooks.shape[3] != head_dim:
        raise NpsparseError(f"PQ codebooks {codebooks.shape} do not fit head dim {head_dim}")


def topk_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, n_keep: int,
                   codebooks: np.ndarray, clamp: float | None = None,
                   path: str = "numba") -> np.ndarray:
    """Causal attention in which each query reads only its top-L keys by PQ-approximated score.

    Per key/value head: keys are PQ-encoded, every query's scores are approximated by ADC
    (:func:`approximate_scores`), the top L visible keys kept (:func:`select_topk`), and exact
    scaled scores ``q . k / sqrt(hd)`` computed on those alone, softmaxed over them and used to
    weight their values. With ``L >= S`` it is exact causal attention.

    Parameters
    ----------
    q : np.ndarray
        ``[H, T, hd]`` float32 queries for positions ``start .. start+T-1``.
    k, v : np.ndarray
        ``[KV, S, hd]`` float32 keys/values for positions ``0 .. S-1`` (``S = start + T``);
        query head ``h`` reads key/value head ``h // (H // KV)``.
    start : int
        Position of the first query.
    n_keep : int
        L >= 1, keys per query (all visible ones if fewer).
    codebooks : np.ndarray
        ``[KV, M, C, d]`` float32, one codebook per key/value head (:func:`fit_head_codebooks`).
    clamp : float, optional
        If given, scaled scores are clipped to ``[-clamp, clamp]`` before the softmax (SPT uses
        10.0); None (default) leaves them exact.
    path : str
        ``"numba"`` (default): keys encoded by :func:`npsparse.kernels.topk_attention.
        encode_keys`, then one compiled call that works query by query and finds the top L
        without a sort (:func:`npsparse.kernels.topk_attention.topk_attention_kernel`);
        ``"numpy"``: blocks of query rows with ``[R, S]`` score matrices and a stable argsort
        (slower than exact attention). Both keep the same keys; the results agree up to float32
        rounding.

    Returns
    -------
    np.ndarray
        ``[T, H*hd]`` float32, heads concatenated (as :func:`npsparse.models.layers.attend`).
    """
    _check_inputs(q, k, v, start, n_keep, codebooks)
    if path == "numpy":
        return _topk_attention_numpy(q, k, v, start, n_keep, codebooks, clamp)
    if path != "numba":
        raise NpsparseError(f"top-L attention path {path!r} must be 'numba' or 'numpy'")
    k = np.ascontiguousarray(k, dtype=np.float32)
    codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
    if n_keep >= k.shape[1]:  # every query keeps all its visible keys: codes are never read
        codes = np.zeros((k.shape[0], 0, codebooks.shape[1]), dtype=np.uint8)
    else:
        codes = encode_keys(k, codebooks)  # [KV, S, M], as encode() per head
    return _topk_attention_numba(q, k, v, start, n_keep, codebooks, codes, clamp)  # [T, H*hd]


def _in_place(x: np.ndarray, dtype) -> np.ndarray:
    """``x [KV, S, ...]`` as a C-contiguous ``[KV, P >= S, ...]`` array whose ``[:, :S]`` is x.

    When x is the ``[:, :S]`` view of a C-contiguous buffer (a KV cache, as ``append_to_cache``
    returns it; key codes in :class:`KeyCodes`), that buffer, with no copy: copying the keys
    and values of every layer on every decode step cost more than the top-L attention itself
    (SmolLM2-135M at S 1800: ~84 MB and 8 of 15 ms per token). Otherwise a C-contiguous copy.
    """
    owner = x.base
    if (isinstance(owner, np.ndarray) and owner.dtype == dtype and owner.flags.c_contiguous
            and owner.ndim == x.ndim and owner.shape[0] == x.shape[0]
            and owner.shape[2:] == x.shape[2:] and owner.strides == x.strides
            and owner.ctypes.data == x.ctypes.data):
        return owner  # [KV, capacity, ...]
    return np.ascontiguousarray(x, dtype=dtype)  # [KV, S, ...]


def _topk_attention_numba(q, k, v, start, n_keep, codebooks, codes, clamp):
    """The compiled kernel on C-contiguous float32 arrays, given the keys' codes [KV, S, M];
    k, v and codes are read in place when they are leading views of buffers (:func:`_in_place`).
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    k, v = _in_place(k, np.float32), _in_place(v, np.float32)  # [KV, >= S, hd]
    codes = _in_place(codes, np.uint8)  # one kernel specialisation, whoever made the codes
    return topk_attention_kernel(q, k, v, start, n_keep, codebooks, codes, clamp is not None,
                                 0.0 if clamp is None else float(clamp))  # [T, H*hd]


def _topk_attention_numpy(q, k, v, start, n_keep, codebooks, clamp):
    """:func:`topk_attention` in NumPy, a block of ``_ROWS`` query rows at a time."""
    n_heads, n_tok, head_dim = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    qg = q.reshape(n_kv, group * n_tok, head_dim)  # [KV, g*T, hd]
    query_pos = start + np.tile(np.arange(n_tok), group)  # [g*T]; row i*T + t is token t
    out = np.empty((n_kv, group * n_tok, head_dim), dtype=np.float32)  # [KV, g*T, hd]
    for h in range(n_kv):
        codes = encode(k[h], codebooks[h])  # [S, M]
        for lo in range(0, group * n_tok, _ROWS):
            rows = slice(lo, lo + _ROWS)
            approx = approximate_scores(qg[h, rows], codes, codebooks[h])  # [R, S]
            keys, valid = select_topk(approx, query_pos[rows], n_keep)  # [R, L]
            out[h, rows] = _attend_selected(qg[h, rows], k[h], v[h], keys, valid, clamp)
    return merge_heads(out.reshape(n_heads, n_tok, head_dim))  # [T, H*hd]


def topk_attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int,
                             n_keep: int, codebooks: np.ndarray,
                             clamp: float | None = None) -> np.ndarray:
    """Naive loop over heads and queries with the signature and result of :func:`topk_attention`.

    Each query's approximate score of each visible key is ``q . k_hat`` with ``k_hat`` the key
    rebuilt from its centroids; keys are sorted by (score descending, position ascending).

    Parameters
    ----------
    q, k, v, start, n_keep, codebooks, clamp
        As in :func:`topk_attention`.

    Returns
    -------
    np.ndarray
        ``[T, H*hd]`` float32.
    """
    _check_inputs(q, k, v, start, n_keep, codebooks)
    n_heads, n_tok, head_dim = q.shape
    group = n_heads // k.shape[0]
    out = np.zeros((n_tok, n_heads * head_dim), dtype=np.float32)  # [T, H*hd]
    for head in range(n_heads):
        h = head // group
        books = codebooks[h]  # [M, C, d]
        rebuilt = [np.concatenate([books[m, c] for m, c in enumerate(encode(key, books))])
                   for key in k[h]]  # S x [hd]
        for t in range(n_tok):
            visible = range(start + t + 1)
            ranked = sorted(visible, key=lambda s: (-float(q[head, t] @ rebuilt[s]), s))
            chosen = ranked[:n_keep]
            scores = np.array([q[head, t] @ k[h, s] for s in chosen]) / math.sqrt(head_dim)
            if clamp is not None:
                scores = np.clip(scores, -clamp, clamp)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            row = sum(w * v[h, s] for w, s in zip(weights, chosen))  # [hd]
            out[t, head * head_dim:(head + 1) * head_dim] = row
    return out


def attention_error(exact_out: np.ndarray, sparse_out: np.ndarray) -> float:
    """Relative Frobenius error of sparse attention against exact attention.

    Parameters
    ----------
    exact_out, sparse_out : np.ndarray
        ``[T, H*hd]`` float32 outputs of exact and sparse attention on the same inputs.

    Returns
    -------
    float
        ``||sparse - exact||_F / ||exact||_F`` (computed in float64); 0.0 when both are zero.
    """
    exact = np.asarray(exact_out, dtype=np.float64)
    diff = np.linalg.norm(np.asarray(sparse_out, dtype=np.float64) - exact)
    norm = np.linalg.norm(exact)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return float(diff / norm)


# -- in a model: switching blocks to top-L attention, and codebooks fitted on calibration data --

PQ_SUBSPACES = 8  # M: SmolLM2's hd 64 in 8 subspaces of 8 dims
PQ_CENTROIDS = 16  # C per subspace
CALIB_WINDOWS = 4  # calibration windows the codebooks are fitted on
CALIB_SEQLEN = 512  # and their length (shortened to the model's context if it is shorter)
MAX_FIT_ROWS = 2048  # rows per (layer, key/value head) for k-means (SmolLM2 fits in ~30 s)


class KeyCodes:
    """PQ codes of the keys one layer attends to, kept between calls so each key is encoded once.

    In KV-cache decode every call sees the keys of all positions so far; encoding them all again
    (``S x C x hd`` per key/value head per token) costs more than exact attention. Here a call
    with ``start`` reuses the codes of positions ``0 .. min(start, valid)-1`` and encodes the keys
    from there to ``S``: the code of a key depends on that key and the codebooks alone
    (:func:`~npsparse.kernels.topk_attention.encode_keys` encodes row by row), so the result is
    the same as encoding them all.

    Stale codes are ruled out this way:

    - ``start`` 0 (a new sequence, a window without a cache) trusts nothing;
    - a rewind to a smaller ``start`` trusts only the positions before it, and the codes past it
      are dropped even when the call needs none (``L >= S``);
    - codes are trusted only for the same key buffer they were made from: the array owning the
      keys' memory (held weakly, so a new cache at a recycled address does not match), the keys'
      address in it and their strides. Another cache, layer or model handing its keys to the
      same object starts over (correct, but it encodes every key again).

    What it cannot see: keys at positions below ``start`` rewritten in the same buffer without
    passing through this object (npsparse writes a block's cache only in ``LlamaBlock.__call__``,
    just before calling its attention with ``start`` at the first written position). It is not
    thread-safe: a model runs one sequence at a time.

    ``codes`` is ``[KV, capacity, M]`` uint8 (capacity grows by doubling); ``valid`` positions
    hold codes of the keys in the buffer named by ``_source``.
    """

    def __init__(self):
        self.codes = np.zeros((0, 0, 0), dtype=np.uint8)  # [KV, capacity, M]
        self.valid = 0
        self._source = None  # (weak reference to the owning array, address, strides)

    def update(self, k: np.ndarray, start: int, codebooks: np.ndarray, needed: bool
               ) -> np.ndarray:
        """The keys' PQ codes, encoding only those without trusted codes (see the class).

        Parameters
        ----------
        k : np.ndarray
            ``[KV, S, hd]`` keys of positions ``0 .. S-1`` (a view of the KV cache in decode).
        start : int
            First position written since the last call: codes from it on are made anew.
        codebooks : np.ndarray
            ``[KV, M, C, d]`` float32, the same on every call.
        needed : bool
            False when the kernel reads no codes (``L >= S``): nothing is encoded, and the
            codes from ``start`` on are dropped.

        Returns
        -------
        np.ndarray
            ``[KV, S, M]`` uint8 (a view of ``codes``), or ``[KV, 0, M]`` if not ``needed``.
        """
        n_kv, n_keys, _ = k.shape
        n_sub = codebooks.shape[1]
        owner = k.base if isinstance(k.base, np.ndarray) else k
        same = (self._source is not None and self._source[0]() is owner
                and self._source[1:] == (k.ctypes.data, k.strides))
        if self.codes.shape[0] != n_kv or self.codes.shape[2] != n_sub:
            self.codes = np.zeros((n_kv, 0, n_sub), dtype=np.uint8)  # [KV, capacity, M]
            same = False
        keep = min(start, self.valid) if same else 0  # positions whose codes are still right
        self._source = (weakref.ref(owner), k.ctypes.data, k.strides)
        self.valid = keep
        if not needed:
            return np.zeros((n_kv, 0, n_sub), dtype=np.uint8)
        if n_keys > self.codes.shape[1]:
            grown = np.zeros((n_kv, max(n_keys, 2 * self.codes.shape[1]), n_sub), dtype=np.uint8)
            grown[:, :keep] = self.codes[:, :keep]
            self.codes = grown  # [KV, capacity, M]
        new_keys = np.ascontiguousarray(k[:, keep:], dtype=np.float32)  # [KV, S-keep, hd]
        self.codes[:, keep:n_keys] = encode_keys(new_keys, codebooks)  # [KV, S-keep, M]
        self.valid = n_keys
        return self.codes[:, :n_keys]  # [KV, S, M]


class TopkAttention:
    """One layer's top-L attention, callable as ``LlamaBlock.attention``.

    ``n_keep`` is L; ``codebooks`` ``[KV, M, C, d]`` (copied); ``clamp`` as in
    :func:`topk_attention`, whose result a call returns. Unlike that function it PQ-encodes each
    key once, keeping the codes between calls (:class:`KeyCodes`): one object per layer, one
    sequence at a time. Give new codebooks to a new object, not by changing ``codebooks``.
    """

    def __init__(self, n_keep: int, codebooks: np.ndarray, clamp: float | None = None):
        self.n_keep = n_keep
        self.codebooks = np.array(codebooks, dtype=np.float32, order="C")  # [KV, M, C, d]
        self.clamp = clamp
        self.key_codes = KeyCodes()

    def __repr__(self) -> str:
        return (f"TopkAttention(n_keep={self.n_keep}, codebooks={self.codebooks.shape}, "
                f"clamp={self.clamp})")

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
        _check_inputs(q, k, v, start, self.n_keep, self.codebooks)
        needed = self.n_keep < k.shape[1]  # else every query keeps all its visible keys
        codes = self.key_codes.update(k, start, self.codebooks, needed)  # [KV, S or 0, M]
        return _topk_attention_numba(q, k, v, start, self.n_keep, self.codebooks, codes,
                                     self.clamp)  # [T, H*hd]


def parse_attention(text: str) -> int | None:
    """``"exact"`` -> None; ``"topk:L"`` -> L (an integer >= 1). Anything else is refused.

    Parameters
    ----------
    text : str

    Returns
    -------
    int or None
    """
    if text == "exact":
        return None
    kind, _, keep = text.partition(":")
    if kind == "topk" and keep.isdigit() and int(keep) >= 1:
        return int(keep)
    raise NpsparseError(f"attention {text!r} must be 'exact' or 'topk:L' with L >= 1 keys")


def parse_pq(text: str) -> tuple[int, int]:
    """``"M,C"`` -> ``(M, C)``: PQ subspaces and centroids per subspace (checked when fitted).

    Parameters
    ----------
    text : str
        ``--pq``'s value, two positive integers joined by a comma, e.g. ``"8,16"``.

    Returns
    -------
    (int, int)
        ``M`` subspaces and ``C`` centroids per subspace.
    """
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise NpsparseError(f"--pq {text!r} must be M,C (subspaces, centroids), e.g. 8,16")
    return int(parts[0]), int(parts[1])


def _llama_blocks(model) -> list:
    model = getattr(model, "model", model)  # an npsparse.LLM or its CausalLM
    if not all(hasattr(block, "attention") for block in model.blocks):
        raise NpsparseError(f"top-L attention needs a LLaMA-family model, not {model.config.arch}")
    return model.blocks


def use_topk_attention(model, n_keep: int | None, codebooks: list | None = None,
                       clamp: float | None = None) -> None:
    """Switch every block of ``model`` to top-L attention, or back to exact with ``n_keep=None``.

    Parameters
    ----------
    model : LLM or LlamaModel
        Changed in place: each block's ``attention`` becomes a new :class:`TopkAttention`, with
        no key codes yet (None: exact). Prefill, perplexity and one-token decode (around the
        compiled steps of :mod:`npsparse.models.llama_decode`) run it.
    n_keep : int or None
        L >= 1 keys per query; None restores exact attention.
    codebooks : list of np.ndarray
        One ``[KV, M, C, d]`` float32 array per layer (:func:`fit_attention_codebooks`).
    clamp : float, optional
        As in :func:`topk_attention`.
    """
    blocks = _llama_blocks(model)
    if n_keep is None:
        for block in blocks:
            block.attention = None
        return
    if n_keep < 1:
        raise NpsparseError(f"sparse attention needs L >= 1 keys per query, got {n_keep}")
    if codebooks is None or len(codebooks) != len(blocks):
        raise NpsparseError(f"top-L attention needs one codebook per layer ({len(blocks)})")
    for block, books in zip(blocks, codebooks):
        block.attention = TopkAttention(n_keep, np.asarray(books, dtype=np.float32), clamp)


def fit_attention_codebooks(model, windows: np.ndarray, n_sub: int = PQ_SUBSPACES,
                            n_centroids: int = PQ_CENTROIDS, seed: int = 0, iters: int = 20,
                            max_rows: int = MAX_FIT_ROWS) -> list[np.ndarray]:
    """PQ codebooks of every layer and key/value head, fitted on post-RoPE keys and queries.

    The model runs on each window as it stands (exact attention unless switched); each layer's
    rotated keys and the queries of each key/value head's group are stacked (SPT shares one
    codebook between them), at most ``max_rows`` rows per head are kept (chosen by ``seed``),
    and :func:`fit_head_codebooks` fits them with seed ``seed + layer * KV``.

    Parameters
    ----------
    model : LLM or LlamaModel
    windows : np.ndarray
        ``[W, T]`` int calibration token ids, each an independent sequence.
    n_sub, n_centroids, seed, iters
        M, C, the seed and the Lloyd iterations (:func:`fit_codebooks`).
    max_rows : int
        Rows per (layer, key/value head) given to k-means.

    Returns
    -------
    list of np.ndarray
        One ``[KV, M, C, d]`` float32 array per layer.
    """
    net = getattr(model, "model", model)
    blocks = _llama_blocks(net)
    cfg = net.config
    group = cfg.n_heads // cfg.n_kv_heads
    samples = [[] for _ in blocks]  # per layer: [KV, (g+1)*T, hd] per window
    for ids in np.asarray(windows):
        x = net.embed(np.asarray(ids, dtype=np.int64), 0)  # [T, D]
        for i, block in enumerate(blocks):
            tape = {}
            x = block(x, 0, tape=tape)  # [T, D]
            q = tape["q"].reshape(cfg.n_kv_heads, group * len(ids), -1)  # [KV, g*T, hd]
            samples[i].append(np.concatenate([tape["k"], q], axis=1))  # [KV, (g+1)*T, hd]
    rng = np.random.default_rng(seed)
    books = []
    for i, parts in enumerate(samples):
        rows = np.concatenate(parts, axis=1)  # [KV, N, hd]
        if rows.shape[1] > max_rows:  # one row choice for all heads of the layer
            rows = rows[:, np.sort(rng.choice(rows.shape[1], max_rows, replace=False))]
        books.append(fit_head_codebooks(rows, n_sub, n_centroids, seed + i * cfg.n_kv_heads,
                                        iters))  # [KV, M, C, d]
    return books


def calibrate_topk_attention(llm, n_keep: int, n_sub: int = PQ_SUBSPACES,
                             n_centroids: int = PQ_CENTROIDS, *, calib: str = "pydoc",
                             nsamples: int = CALIB_WINDOWS, seqlen: int = CALIB_SEQLEN,
                             seed: int = 0, iters: int = 20) -> dict:
    """Fit codebooks on calibration windows and switch ``llm`` to top-L attention.

    Parameters
    ----------
    llm : LLM
        A loaded LLaMA-family model (changed in place, see :func:`use_topk_attention`).
    n_keep : int
        L >= 1.
    n_sub, n_centroids, seed, iters
        As in :func:`fit_attention_codebooks`.
    calib, nsamples, seqlen
        Calibration source and windows (:func:`npsparse.calibration.calibration_windows`);
        ``seqlen`` is cut to the model's ``max_position``.

    Returns
    -------
    dict
        What was used: ``keep``, ``pq_subspaces``, ``pq_centroids``, ``calibration`` (source,
        windows, seqlen, seed) and ``fit_seconds``.
    """
    from .calibration import calibration_windows

    if n_keep < 1:
        raise NpsparseError(f"sparse attention needs L >= 1 keys per query, got {n_keep}")
    _llama_blocks(llm)
    _check_subspaces(llm.config.head_dim, n_sub)
    if not 1 <= n_centroids <= 256:
        raise NpsparseError(f"PQ centroids C={n_centroids} must be in 1..256 (uint8 codes)")
    seqlen = min(seqlen, llm.config.max_position)
    begin = time.perf_counter()
    windows = calibration_windows(calib, llm.tokenizer, llm.config.vocab_size,
                                  nsamples=nsamples, seqlen=seqlen, seed=seed)  # [W, T]
    use_topk_attention(llm, None)  # fit on the exact model's keys and queries
    books = fit_attention_codebooks(llm, windows, n_sub, n_centroids, seed, iters)
    use_topk_attention(llm, n_keep, books)
    return {"keep": n_keep, "pq_subspaces": n_sub, "pq_centroids": n_centroids,
            "calibration": {"data": str(calib), "windows": int(windows.shape[0]),
                            "seqlen": int(windows.shape[1]), "seed": seed},
            "fit_seconds": time.perf_counter() - begin}
