"""Quantized panel format: sparse int8 weights times int8 activations (the lossy fast mode).

Rows are grouped in panels of 16 (the last padded with empty rows), columns padded to a multiple
of 32 and grouped in quads of 4. Per panel and quad ``j`` one uint64 mask word: bit ``4 r + c`` =
(row ``16 q + r``, column ``4 j + c``) kept, so that after a byte expand each 32-bit lane holds
one row's four consecutive columns, the operand layout of ``vpdpbusd``. A panel's kept weights
follow its words in bit order, contiguous per panel, as ``w_q + 128`` (uint8) with ``w_q =
round(w / s)`` in -127..127: stored biased, pruned lanes expand to 128 = weight 0.

Each row has one float32 scale per group of ``group`` consecutive columns (a multiple of 32, the
layer's option; :data:`GROUP` by default; a group of at least ``K32`` is one scale per row):
``s = max|w kept in the row and group| / 127``, 0 for a group that keeps only zeros. A row with
one outlier then coarsens only the outlier's group: on SmolLM2-135M pruned 2:4 by SparseGPT, one
scale per row changed the perplexity by +0.59% against the exact model, past the 0.5% this mode
allows (see :data:`GROUP` for the measurements). They are stored ``scales [P, G, 16]``, panel by
panel and group by group, so that one group's 16 row scales are one vector load.

Each product quantizes the activations as llama.cpp's Q8_0 dot products do: per token and block
of 32 (zero-padded) columns, ``d_b = max|x| / 127`` and ``x_q = round(x / d_b)`` in int8, plus the
block sum ``sx_b`` (:func:`quantize_activations`). Per panel and block the kernel sums ``(w_q +
128) x_q`` in int32 (exact), takes off ``128 sx_b``, and adds the block as ``accf = fma(sum, d_b *
s_g, accf)`` per row, ``s_g`` the row's scale of the block's group; ``accf`` is the output. Only
the activation rounding is lost: the result is ``x_deq @ W_deq.T`` with the float32 rounding of
``d_b * s_g`` and of one fma per block. Prefill and perplexity run the same arithmetic per token,
so they measure what decode computes.

Bytes per position of the padded grid (16 P rows x K32 columns, d = kept / positions): 1/8
(mask words) + d (values) + 4 ceil(K32 / group) / K32 (scales: 4/group when group divides K32,
1/64 at group 256; 4/K32 for one scale per row), plus 8 bytes of pointer per 16 rows; panel's
bf16 values: 1/8 + 2d. The kernel is in :mod:`._qpanel_simd`.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NpsparseError
from ._layer import (PackedLinear, check_arrays, check_shapes, check_weight_mask, pack_words,
                     row_pointers, unpack_words)
from ._numba import jit, pjit
from ._qpanel_simd import (OVERREAD, QUADS, fma32, qpanel_dot, qpanel_dot4, qpanel_dot4_portable,
                           qpanel_dot_portable)

PANEL = 16  # rows per panel: one register of 16 int32 / float32 row accumulators
BLOCK = 32  # columns per activation scale (QK8_0 in ggml)
QUAD = 4  # columns per mask word lane group: the four bytes vpdpbusd sums per lane
BIAS = 128  # stored value of weight 0
# Columns per weight scale: the largest group measured that keeps the perplexity change against
# the exact model within the fast mode's 0.5%. SmolLM2-135M pruned by SparseGPT, the first 40
# pydoc windows of 512 tokens, same windows for both (2026-12-08), change (top-1 agreement):
# 2:4 one scale per row +0.586% (95.46%), group 256 +0.438% (95.74%), 128 +0.788% (96.10%),
# 64 +0.343% (96.07%); 70% group 256 +0.228% (94.73%), 128 -0.274% (95.18%). Agreement rises
# with finer groups but the change does not: near 0.5% it moves by a few tenths from run to run
# of the rounding, so 256 passes with little margin.
GROUP = 256


def qpanel_nbytes(n_rows: int, k_cols: int, nnz: int, group: int = GROUP) -> int:
    """Bytes a qpanel layer of this size holds: mask words, biased int8 values, pointers, scales.

    Parameters
    ----------
    n_rows, k_cols : int
        ``N`` and ``K`` of the weight.
    nnz : int
        Kept weights.
    group : int
        Columns per weight scale.

    Returns
    -------
    int
        ``8 P K32/4 + nnz + 8 (P + 1) + 64 P G`` with ``P = ceil(N/16)``, ``K32 = 32
        ceil(K/32)`` and ``G = ceil(K32 / group)``.
    """
    panels = -(-n_rows // PANEL)
    return (8 * panels * _quads(k_cols) + nnz + 8 * (panels + 1)
            + 4 * PANEL * panels * _groups(k_cols, group))


def _quads(k_cols: int) -> int:
    return -(-k_cols // BLOCK) * (BLOCK // QUAD)


def _groups(k_cols: int, group: int) -> int:
    """G = ceil(K32 / group): weight scales per row."""
    return -(-_quads(k_cols) * QUAD // group)


def _panel_order(a: np.ndarray, fill) -> np.ndarray:
    """[N, K] -> [P, KQ, 16, 4]: panel, quad, row in panel, column in quad (bit order)."""
    n_rows, k_cols = a.shape
    panels, quads = -(-n_rows // PANEL), _quads(k_cols)
    padded = np.full((panels * PANEL, quads * QUAD), fill, dtype=a.dtype)
    padded[:n_rows, :k_cols] = a
    return padded.reshape(panels, PANEL, quads, QUAD).transpose(0, 2, 1, 3)


def _from_panel_order(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_panel_order`: [P, KQ, 16, 4] -> [N, K]."""
    panels, quads = a.shape[:2]
    rows = a.transpose(0, 2, 1, 3).reshape(panels * PANEL, quads * QUAD)
    return np.ascontiguousarray(rows[: shape[0], : shape[1]])


def pack_qpanel_bits(keep: np.ndarray) -> np.ndarray:
    """keep [N, K] bool -> words [ceil(N/16), K32/4] uint64 in the qpanel bit order.

    Parameters
    ----------
    keep : np.ndarray
        ``[N, K]`` bool, True = kept.

    Returns
    -------
    np.ndarray
        ``[P, K32/4]`` uint64; bit ``4 r + c`` of word ``(q, j)`` is ``keep[16 q + r, 4 j + c]``;
        padding rows and columns are 0.
    """
    bits = _panel_order(keep, False)  # [P, KQ, 16, 4] = [P, KQ, 64] in bit order
    return pack_words(bits.reshape(*bits.shape[:2], 64), 64)


def unpack_qpanel_bits(words: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pack_qpanel_bits`: words [P, K32/4] uint64 -> keep [N, K] bool.

    Parameters
    ----------
    words : np.ndarray
        ``[ceil(N/16), K32/4]`` uint64 mask words.
    shape : tuple of int
        ``(N, K)``; padding rows and columns are dropped.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool.
    """
    return _from_panel_order(_bits_in_order(words), shape)


def _bits_in_order(words: np.ndarray) -> np.ndarray:
    """words [P, KQ] uint64 -> bits [P, KQ, 16, 4] bool (bit order)."""
    return unpack_words(words, 64).reshape(*words.shape, PANEL, QUAD)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact for |v| < 2^52, in float64)."""
    v = v.astype(np.float64)
    return np.copysign(np.floor(np.abs(v) + 0.5), v)


def quantize_groups(weight: np.ndarray, keep: np.ndarray,
                    group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """int8 quantization of the kept weights per row and group of ``group`` columns:
    ``w_q = round(w / s)``, ``s = max|w| / 127``.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32, finite.
    keep : np.ndarray
        ``[N, K]`` bool; only kept weights set a group's scale.
    group : int
        Columns per scale, a positive multiple of 32; at least ``K`` for one scale per row.

    Returns
    -------
    w_q : np.ndarray
        ``[N, K]`` int8 in -127..127 (halves away from zero), 0 where not kept.
    scales : np.ndarray
        ``[N, G]`` float32, ``G = ceil(K32 / group)``: ``max|w kept| / 127`` of columns ``group
        g`` to ``group (g + 1)`` of the row (0 for a group that keeps only zeros).
    """
    n_rows, k_cols = weight.shape
    n_groups = _groups(k_cols, group)
    span = min(group, _quads(k_cols) * QUAD)  # columns per group, as padded
    kept = np.zeros((n_rows, n_groups * span), dtype=np.float32)
    kept[:, :k_cols] = np.where(keep, weight, np.float32(0.0))
    amax = np.abs(kept).reshape(n_rows, n_groups, span).max(axis=2, initial=np.float32(0.0))
    scales = (amax / np.float32(127.0)).astype(np.float32)  # [N, G]
    column_scales = scales[:, np.arange(k_cols) // group]  # [N, K]
    safe = np.where(column_scales == 0, np.float32(1.0), column_scales)
    w_q = np.clip(_round_half_away(kept[:, :k_cols] / safe), -127, 127).astype(np.int8)
    return w_q, scales


def quantize_activations(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize activations per token and 32-column block, as llama.cpp's Q8_0 dot products do.

    Per block (columns zero-padded to a multiple of 32): ``d = max|x| / 127`` (float32) and
    ``x_q = round(x * (1 / d))``, halves away from zero (ggml's ``quantize_row_q8_0_ref``: the
    reciprocal, then ``roundf``); a block of zeros gets ``d = 0`` and ``x_q = 0``.

    Parameters
    ----------
    x : array-like
        ``[T, K]`` float32 (or ``[K]``, one token), finite.

    Returns
    -------
    x_q : np.ndarray
        ``[T, K32]`` int8 in -127..127, ``K32 = 32 ceil(K / 32)``.
    d : np.ndarray
        ``[T, K32/32]`` float32 block scales.
    sx : np.ndarray
        ``[T, K32/32]`` int32 block sums of ``x_q``.
    """
    x = np.atleast_2d(np.ascontiguousarray(x, dtype=np.float32))
    return _quantize(x, -(-x.shape[1] // BLOCK))


# ---- kernels: masks [P, KQ] uint64, values [nnz] uint8, panel_ptr [P+1], scales [P, G, 16] ----

@jit
def _quantize(x, n_blocks):  # x [T, K] -> x_q [T, 32 B] int8, d [T, B] f32, sx [T, B] i32
    n_tokens, k_cols = x.shape
    x_q = np.zeros((n_tokens, BLOCK * n_blocks), dtype=np.int8)
    d = np.zeros((n_tokens, n_blocks), dtype=np.float32)
    sx = np.zeros((n_tokens, n_blocks), dtype=np.int32)
    for t in range(n_tokens):
        for b in range(n_blocks):
            lo, hi = BLOCK * b, min(BLOCK * b + BLOCK, k_cols)
            amax = np.float32(0.0)
            for k in range(lo, hi):
                amax = max(amax, abs(x[t, k]))
            # in float64, then rounded: the float32 quotient correctly rounded, which fastmath's
            # reciprocal rewrite of a float32 division would not guarantee
            d_b = np.float32(np.float64(amax) / 127.0)
            if d_b == 0:
                continue
            inv = np.float32(1.0) / d_b
            total = 0
            for k in range(lo, hi):
                v = np.float64(x[t, k] * inv)
                q = int(np.floor(abs(v) + 0.5))
                q = min(q, 127)
                q = -q if v < 0 else q
                x_q[t, k] = q
                total += q
            d[t, b], sx[t, b] = d_b, total
    return x_q, d, sx


@jit
def _matmul_naive(masks, values, panel_ptr, scales, group, x, n_rows):  # x [T, K] -> y [T, N]
    n_panels, n_quads = masks.shape
    group_blocks = group // BLOCK
    x_q, d, _ = _quantize(x, n_quads // QUADS)
    y = np.zeros((x.shape[0], PANEL * n_panels), dtype=np.float32)
    block = np.zeros(PANEL, dtype=np.int64)
    for t in range(x.shape[0]):
        for q in range(n_panels):
            p = panel_ptr[q]
            accf = np.zeros(PANEL, dtype=np.float32)
            for b in range(n_quads // QUADS):
                block[:] = 0
                for j in range(QUADS * b, QUADS * b + QUADS):
                    word = masks[q, j]
                    for bit in range(64):  # bit order: row bit // 4, column 4 j + bit % 4
                        if (word >> np.uint64(bit)) & np.uint64(1):
                            w_q = np.int64(values[p]) - BIAS
                            block[bit >> 2] += w_q * np.int64(x_q[t, QUAD * j + (bit & 3)])
                            p += 1
                g = b // group_blocks
                for r in range(PANEL):
                    step = d[t, b] * scales[q, g, r]  # float32, rounded once
                    accf[r] = fma32(np.float32(block[r]), step, accf[r])
            for r in range(PANEL):
                y[t, PANEL * q + r] = accf[r]
    return y[:, :n_rows].copy()


@jit
def _panel(masks, values, panel_ptr, scales, group_blocks, x_q, d, sx, q, exact, y):
    """Panel q of the product -> y [T, 16 P]; ``exact``: the lowering that reads no further."""
    n_quads = masks.shape[1]
    n_tokens, xstride, bstride, ostride = x_q.shape[0], x_q.shape[1], d.shape[1], y.shape[1]
    start, moff, ooff = panel_ptr[q], q * n_quads, PANEL * q
    soff = q * scales.shape[1] * PANEL  # flat start of panel q's [G, 16] scales
    nb, gb = n_quads // QUADS, group_blocks
    t = 0
    while t + 4 <= n_tokens:  # four tokens per pass: each word is expanded once for all four
        xoff, boff, out = t * xstride, t * bstride, ooff + t * ostride
        if exact:
            qpanel_dot4_portable(masks, moff, values, start, x_q, xoff, xstride, d, sx, boff,
                                 bstride, nb, gb, scales, soff, y, out, ostride)
        else:
            qpanel_dot4(masks, moff, values, start, x_q, xoff, xstride, d, sx, boff, bstride, nb,
                        gb, scales, soff, y, out, ostride)
        t += 4
    while t < n_tokens:
        xoff, boff, out = t * xstride, t * bstride, ooff + t * ostride
        if exact:
            qpanel_dot_portable(masks, moff, values, start, x_q, xoff, 0, d, sx, boff, 0, nb, gb,
                                scales, soff, y, out, 0)
        else:
            qpanel_dot(masks, moff, values, start, x_q, xoff, 0, d, sx, boff, 0, nb, gb, scales,
                       soff, y, out, 0)
        t += 1


@pjit
def _matmul(masks, values, panel_ptr, scales, group, x, portable):  # x [T, K] -> y [T, 16 P]
    n_panels, n_quads = masks.shape
    n_blocks = n_quads // QUADS
    group_blocks = min(group // BLOCK, max(n_blocks, 1))  # a group past K32 is the whole row
    x_q, d, sx = _quantize(x, n_blocks)  # serial: O(T K), small beside the product
    y = np.empty((x.shape[0], PANEL * n_panels), dtype=np.float32)
    safe_end = values.shape[0] - OVERREAD  # panels ending later use the exact-read lowering
    per_task = max(1, (n_panels + 63) // 64)  # fixed by the shape: results ignore thread count
    for task in numba.prange((n_panels + per_task - 1) // per_task):
        for q in range(task * per_task, min(n_panels, (task + 1) * per_task)):
            _panel(masks, values, panel_ptr, scales, group_blocks, x_q, d, sx, q,
                   portable or panel_ptr[q + 1] > safe_end, y)
    return y


class QPanelLinear(PackedLinear):
    """16-row panels of int8 weights (a scale per row and group of columns) multiplied by
    int8-quantized activations.

    Arrays: ``masks [ceil(N/16), K32/4] uint64`` (bit 4r + c = row 16q + r at column 4j + c),
    ``values [nnz] uint8`` (``w_q + 128``, panel by panel in bit order), ``panel_ptr
    [ceil(N/16) + 1] int64`` (start of each panel in ``values``) and ``scales [ceil(N/16), G, 16]
    float32`` (``scales[q, g, r]``: row 16q + r, columns ``group g`` to ``group (g + 1)``; padding
    rows 0), ``G = ceil(K32 / group)``. Lossy twice: weights to int8 at packing, activations to
    int8 per 32 columns at every product.
    """

    FORMAT = "qpanel"
    # arena.consolidate stacks layers by concatenating every array along its first axis and
    # offsetting panel_ptr: masks and scales are per panel, so, as for panel, that is the layer of
    # the stacked rows only when every part but the last fills its last panel. Layers stack only
    # with the same group (an option, so part of arena's signature).
    POINTER = "panel_ptr"
    ROW_BLOCK = PANEL

    @classmethod
    def pack(cls, weight, mask=None, values="int8", group=GROUP):
        """Quantize ``W [N, K]`` per row and group of columns to int8 and pack it in 16-row panels.

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32 (or exactly convertible), finite.
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; default: the nonzeros of ``weight``.
        values : {"int8"}
            Value type; the only one.
        group : int
            Columns per weight scale, a positive multiple of 32 (default :data:`GROUP`); at
            least ``K`` for one scale per row.

        Returns
        -------
        QPanelLinear
            1/8 + d bytes per weight at density d, plus 4 per row and group and 8 per 16 rows.

        Raises
        ------
        NpsparseError
            Another ``values``, a bad ``group``, non-finite weights, or a weight/mask shape or
            dtype problem.
        """
        _check_values(values)
        _check_group(group)
        weight, keep = check_weight_mask(weight, mask)
        if not np.all(np.isfinite(weight[keep])):
            raise NpsparseError("qpanel quantization needs finite weights")
        w_q, group_scales = quantize_groups(weight, keep, group)  # [N, K], [N, G]
        bits = _panel_order(keep, False)  # [P, KQ, 16, 4]
        biased = (w_q.astype(np.int16) + BIAS).astype(np.uint8)
        panels, n_groups = bits.shape[0], group_scales.shape[1]
        scales = np.zeros((PANEL * panels, n_groups), dtype=np.float32)
        scales[: weight.shape[0]] = group_scales
        arrays = {
            "masks": pack_qpanel_bits(keep),
            "values": _panel_order(biased, BIAS)[bits],  # C order = bit order
            "panel_ptr": row_pointers(bits.reshape(panels, -1).sum(axis=1, dtype=np.int64)),
            "scales": np.ascontiguousarray(  # [16 P, G] -> [P, G, 16]
                scales.reshape(panels, PANEL, n_groups).transpose(0, 2, 1)),
        }
        return cls(arrays, weight.shape, group)

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored qpanel arrays as a layer, without copying them.

        Names, dtypes and shapes are checked, no mask bit may fall in the padding, ``panel_ptr``
        must agree with the masks' bit counts and scales must be finite and not negative (once,
        at load: the kernels trust them).

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``masks [P, K32/4] uint64``, ``values [nnz] uint8``, ``panel_ptr [P+1] int64`` and
            ``scales [P, G, 16] float32`` with ``P = ceil(N/16)``, ``G = ceil(K32 / group)``;
            others are ignored.
        metadata : dict of str to str
            ``shape`` (``"N,K"``, required), ``group`` (columns per scale, required) and
            ``values`` (``"int8"``, the default).

        Returns
        -------
        QPanelLinear

        Raises
        ------
        NpsparseError
            A missing or mistyped array, a bad group, bits set in the padding, pointers that do
            not match, or bad scales.
        """
        _check_values(metadata.get("values", "int8"))
        group = _parse_group(metadata.get("group"))
        expected = {"masks": (np.uint64, 2), "values": (np.uint8, 1),
                    "panel_ptr": (np.int64, 1), "scales": (np.float32, 3)}
        check_arrays(arrays, expected, cls.FORMAT)
        shape = tuple(int(s) for s in metadata["shape"].split(","))
        _check_structure(arrays, shape, group)
        return cls({name: np.ascontiguousarray(arrays[name]) for name in expected}, shape, group)

    def __init__(self, arrays, shape, group):
        super().__init__(arrays, shape)
        self.group = int(group)
        self._portable = False  # tests set it to run the exact-read lowering everywhere

    def _options(self):
        return {"values": "int8", "group": str(self.group)}

    def _matmul(self, x):
        a = self.arrays
        y = _matmul(a["masks"], a["values"], a["panel_ptr"], a["scales"], self.group, x,
                    self._portable)
        if y.shape[1] != self.shape[0]:  # drop the last panel's padding rows
            y = np.ascontiguousarray(y[:, : self.shape[0]])
        return y

    def matmul_naive(self, x):
        """``x @ W.T`` as the kernel computes it: quantize x, integer block sums bit by bit."""
        a = self.arrays
        return _matmul_naive(a["masks"], a["values"], a["panel_ptr"], a["scales"], self.group,
                             np.ascontiguousarray(x, dtype=np.float32), self.shape[0])

    def keep_mask(self) -> np.ndarray:
        """keep [N, K] bool: the stored positions."""
        return unpack_qpanel_bits(self.arrays["masks"], self.shape)

    def row_scales(self) -> np.ndarray:
        """scales [N, G] float32: each row's scale per group of ``group`` columns."""
        scales = self.arrays["scales"]  # [P, G, 16]
        return scales.transpose(0, 2, 1).reshape(-1, scales.shape[1])[: self.shape[0]]

    def to_dense(self):
        """The dequantized weights ``(values - 128) * scale`` of their row and column group."""
        bits = _bits_in_order(self.arrays["masks"])
        w_q = np.zeros(bits.shape, dtype=np.float32)
        w_q[bits] = self.arrays["values"].astype(np.float32) - BIAS
        w_q = _from_panel_order(w_q, self.shape)  # [N, K]
        return w_q * self.row_scales()[:, np.arange(self.shape[1]) // self.group]

    @property
    def nnz(self) -> int:
        """int: packed values, one per set mask bit."""
        return int(self.arrays["values"].shape[0])


def _check_values(values) -> None:
    if values != "int8":
        raise NpsparseError(f"qpanel values must be 'int8', got {values!r}")


def _check_group(group) -> None:
    if (isinstance(group, bool) or not isinstance(group, (int, np.integer))
            or not 0 < group < 2**31 or group % BLOCK):
        raise NpsparseError(f"qpanel group must be a positive multiple of {BLOCK} columns below "
                            f"2^31, got {group!r}")


def _parse_group(text) -> int:
    """The ``group`` metadata string as a checked int."""
    try:
        group = int(text)
    except (TypeError, ValueError):
        raise NpsparseError(f"qpanel metadata 'group' must be a positive multiple of {BLOCK}, "
                            f"got {text!r}") from None
    _check_group(group)
    return group


def _check_structure(arrays: dict, shape: tuple[int, int], group: int) -> None:
    """Stored qpanel arrays agree with the shape, the group and each other."""
    rows, k_cols = shape
    panels = -(-rows // PANEL)
    check_shapes(arrays, {"masks": (panels, _quads(k_cols)), "panel_ptr": (panels + 1,),
                          "scales": (panels, _groups(k_cols, group), PANEL)}, "qpanel")
    ptr = arrays["panel_ptr"]
    nnz = arrays["values"].shape[0]
    if ptr[0] != 0 or ptr[-1] != nnz or np.any(ptr[1:] < ptr[:-1]):
        raise NpsparseError(f"qpanel array 'panel_ptr' must rise from 0 to the {nnz} stored "
                            "values")
    counts = np.bitwise_count(arrays["masks"]).sum(axis=1, dtype=np.int64)  # [P] kept per panel
    if unpack_qpanel_bits(arrays["masks"], shape).sum() != counts.sum():
        raise NpsparseError(f"qpanel array 'masks' has bits set past row {rows} or column "
                            f"{k_cols}")
    if np.any(counts != np.diff(ptr)):
        raise NpsparseError("qpanel array 'panel_ptr' does not match the number of mask bits of "
                            "each panel")
    if not np.all(np.isfinite(arrays["scales"])) or np.any(arrays["scales"] < 0):
        raise NpsparseError("qpanel array 'scales' must be finite and not negative")
