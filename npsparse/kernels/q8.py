"""Q8_0: llama.cpp's 8-bit block format, kept as the GGUF stores it (SmolLM2's tied head).

ggml's ``block_q8_0`` is 34 bytes: one float16 scale ``d``, then 32 int8 values ``q``; the weight
is ``d * q`` (ggml-common.h). A row of ``K`` weights is ``K / 32`` such blocks. npsparse splits
them into two arrays, ``values [N, K] int8`` and ``scales [N, K/32] float16``, so the kernel
streams the int8 values contiguously; 1.0625 bytes per weight (SmolLM2's head: 30 MB, against
57 MB in bf16). Taken from the file's own blocks (:func:`q8_0_from_blocks`), nothing is lost
relative to the checkpoint: ``float16 -> float32`` is exact, and ``d * q`` needs at most 11 + 7
significant bits, so it is exact in float32 too (the same values ``gguf`` dequantizes to).

Decode product (one token, ``x [K]`` float32): per 32-column block, ``t = q[0:16] * x[0:16] +
q[16:32] * x[16:32]`` in two 16-lane float32 vectors, then ``acc += d * t`` (a fused
multiply-add with ``d`` broadcast); one horizontal sum per row. Measured at ``[49152, 576]`` on
2 threads of a Zen 5 host (prototypes, same run): 0.49 ms, against 0.93 ms for scaling each
block's dequantized weights before the FMA and 12 ms for a scalar per-block sum (its horizontal
sum per 32 values dominates), and 0.96 ms for the bf16 GEMV of the same matrix.

Two lowerings, chosen once from the host: :func:`q8_dot` (explicit 16-lane LLVM vectors, one
AVX-512 register per half block) where the host has AVX-512, else a plain Numba loop over 32
lanes that LLVM vectorises for whatever the host has. Both compile and run on any x86 host, so
the tests run both (``Q8Linear.path``). Several tokens (prefill, eval): rows are dequantized in
tiles of :data:`TILE_ROWS` into float32 and multiplied by NumPy's BLAS.

The quantizer (:func:`quantize_q8_0`) is llama.cpp's reference rule, for checkpoints that do not
come as Q8_0 (an opt-in, lossy head): ``d = max|w| / 127`` per block, ``q = round(w / d)``
(half away from zero), ``d`` stored as float16.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import NpsparseError
from ._layer import PackedLinear, check_arrays, check_shapes, check_weight_mask, check_x
from ._numba import jit, pjit, row_block
from ._simd import _F32, _HOST_AVX512, _I32, _I64, _V16F, _V16I32, _data_ptr, _fn, _load16
from ._simd import _reduce, _unrolled

BLOCK = 32  # weights per scale (QK8_0 in ggml)
BLOCK_BYTES = 2 + BLOCK  # ggml block_q8_0: float16 d, then 32 int8
TILE_ROWS = 2048  # rows dequantized at once for the BLAS product (2048 x 576 floats: 4.7 MB)
PATHS = ("vector", "portable")
DEFAULT_PATH = "vector" if _HOST_AVX512 else "portable"


def _check_k(k_cols: int) -> None:
    if k_cols % BLOCK or k_cols == 0:
        raise NpsparseError(f"Q8_0 needs K to be a positive multiple of {BLOCK}, got K = {k_cols}")


def quantize_q8_0(weight) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``W [N, K]`` to Q8_0 blocks by llama.cpp's reference rule (lossy).

    Parameters
    ----------
    weight : array-like
        ``[N, K]`` float32 (or exactly convertible), ``K`` a multiple of 32, finite.

    Returns
    -------
    values : np.ndarray
        ``[N, K]`` int8, ``round(w / d)`` half away from zero, in ``-127 .. 127``.
    scales : np.ndarray
        ``[N, K/32]`` float16, ``d = max|w| / 127`` of each block (0 for an all-zero block).

    Raises
    ------
    NpsparseError
        ``K`` not a multiple of 32, a non-2-D weight, or non-finite values.
    """
    weight, _ = check_weight_mask(weight, None)
    n_rows, k_cols = weight.shape
    _check_k(k_cols)
    if not np.all(np.isfinite(weight)):
        raise NpsparseError("Q8_0 quantization needs finite weights")
    blocks = weight.reshape(n_rows, k_cols // BLOCK, BLOCK)  # [N, K/32, 32]
    d = np.abs(blocks).max(axis=2) / np.float32(127.0)  # [N, K/32] float32
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inv[:, :, None]
    q = np.trunc(scaled + np.copysign(np.float32(0.5), scaled))  # C roundf: half away from zero
    values = np.clip(q, -127, 127).astype(np.int8).reshape(n_rows, k_cols)
    return values, d.astype(np.float16)


def q8_0_from_blocks(raw, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Split a GGUF Q8_0 tensor's bytes into ``values`` and ``scales`` (exact, no rounding).

    Parameters
    ----------
    raw : np.ndarray
        The tensor's data as the ``gguf`` reader gives it: uint8, ``N * K/32 * 34`` bytes (any
        shape), each block a little-endian float16 ``d`` then 32 int8 ``q``.
    shape : tuple of int
        ``(N, K)`` in NumPy order (GGUF lists dimensions reversed).

    Returns
    -------
    values : np.ndarray
        ``[N, K]`` int8 (a copy).
    scales : np.ndarray
        ``[N, K/32]`` float16 (a copy).

    Raises
    ------
    NpsparseError
        ``K`` not a multiple of 32, or a byte count that does not match ``shape``.
    """
    n_rows, k_cols = (int(s) for s in shape)
    _check_k(k_cols)
    raw = np.asarray(raw)
    blocks_per_row = k_cols // BLOCK
    if raw.dtype != np.uint8 or raw.size != n_rows * blocks_per_row * BLOCK_BYTES:
        raise NpsparseError(f"Q8_0 tensor of shape {[n_rows, k_cols]} needs "
                            f"{n_rows * blocks_per_row * BLOCK_BYTES} bytes, got {raw.size} "
                            f"of {raw.dtype}")
    blocks = raw.reshape(n_rows, blocks_per_row, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view("<f2").reshape(n_rows, blocks_per_row)
    values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n_rows, k_cols)
    return values, scales.astype(np.float16)


def dequantize_q8_0(values, scales) -> np.ndarray:
    """The weights ``d * q`` of Q8_0 arrays, in float32 (exact).

    Parameters
    ----------
    values : np.ndarray
        ``[N, K]`` int8.
    scales : np.ndarray
        ``[N, K/32]`` float16.

    Returns
    -------
    np.ndarray
        ``[N, K]`` float32.
    """
    n_rows, k_cols = values.shape
    blocks = values.reshape(n_rows, k_cols // BLOCK, BLOCK).astype(np.float32)
    return (blocks * scales.astype(np.float32)[:, :, None]).reshape(n_rows, k_cols)


# ---- kernels: values [N, K] int8, scale bits [N, K/32] uint16 (float16), x [T, K] float32 -----

@intrinsic
def half_to_f32(typingctx, bits):
    """A float16 bit pattern (uint16) as float32, exactly (LLVM ``fpext``; F16C where present).

    A Numba intrinsic: callable only from jitted code, as ``half_to_f32(bits)``.

    Parameters
    ----------
    typingctx : numba typing context
        Supplied by Numba, not by the caller.
    bits : uint16
        IEEE half-precision bits.

    Returns
    -------
    float32
    """
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return sig, codegen


@intrinsic
def q8_dot(typingctx, vals, voff, scales, soff, x, xoff, nblocks):
    """One Q8_0 row times one token: sum over blocks of ``d_b * (q_b . x_b)``, float32.

    ``vals[voff:]`` holds the row's ``32 * nblocks`` int8 values, ``scales[soff:]`` its float16
    scale bits (uint16), ``x[xoff:]`` the token's activations. Two blocks per iteration, each
    into its own accumulator (two FMA chains). A Numba intrinsic: callable only from jitted code.

    Parameters
    ----------
    typingctx : numba typing context
        Supplied by Numba, not by the caller.
    vals : np.ndarray
        int8, C-contiguous (the layer's ``values``).
    voff : int
        Element offset of the row's first value.
    scales : np.ndarray
        uint16 float16 bits, C-contiguous (the layer's ``scales`` viewed as uint16).
    soff : int
        Element offset of the row's first scale.
    x : np.ndarray
        float32 activations, C-contiguous.
    xoff : int
        Element offset of the token's first activation.
    nblocks : int
        ``K / 32``.

    Returns
    -------
    float32
    """
    sig = types.float32(vals, types.intp, scales, types.intp, x, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        vals_a, voff_, sc_a, soff_, x_a, xoff_, count = args
        vptr = _data_ptr(context, builder, signature.args[0], vals_a, voff_)
        sptr = _data_ptr(context, builder, signature.args[2], sc_a, soff_)
        xptr = _data_ptr(context, builder, signature.args[4], x_a, xoff_)
        fma = _fn(builder, "llvm.fma.v16f32", _V16F, [_V16F, _V16F, _V16F])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(2)]
        v16i8 = ir.VectorType(ir.IntType(8), 16)

        def block(b, slot):
            col = builder.mul(b, ir.Constant(_I64, BLOCK))
            halves = []
            for start in (0, 16):
                src = builder.gep(vptr, [builder.add(col, ir.Constant(_I64, start))])
                raw = builder.load(builder.bitcast(src, v16i8.as_pointer()), align=1)
                halves.append(builder.sitofp(builder.sext(raw, _V16I32), _V16F))
            x_lo = _load16(builder, xptr, col)
            x_hi = _load16(builder, xptr, builder.add(col, ir.Constant(_I64, 16)))
            part = builder.call(fma, [halves[0], x_lo, builder.fmul(halves[1], x_hi)])
            bits = builder.load(builder.gep(sptr, [b]))
            d = builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)
            one = builder.insert_element(ir.Constant(_V16F, None), d, ir.Constant(_I32, 0))
            d16 = builder.shuffle_vector(one, one, ir.Constant(_V16I32, [0] * 16))
            acc = accs[slot]
            builder.store(builder.call(fma, [d16, part, builder.load(acc)]), acc)

        _unrolled(builder, count, 2, block)
        return _reduce(builder, accs)

    return sig, codegen


@jit
def _matmul_naive(values, scale_bits, x):  # -> y [T, N]; the spec: sum_b d_b * sum_j q x
    n_rows, k_cols = values.shape
    y = np.zeros((x.shape[0], n_rows), dtype=np.float32)
    for t in range(x.shape[0]):
        for n in range(n_rows):
            acc = np.float32(0.0)
            for b in range(k_cols // 32):
                part = np.float32(0.0)
                for j in range(32):
                    part += np.float32(values[n, 32 * b + j]) * x[t, 32 * b + j]
                acc += half_to_f32(scale_bits[n, b]) * part
            y[t, n] = acc
    return y


@pjit
def _gemv_vector(values, scale_bits, x):  # x [1, K] -> y [1, N], through q8_dot
    n_rows, k_cols = values.shape
    n_blocks = k_cols // 32
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            y[0, n] = q8_dot(values, n * k_cols, scale_bits, n * n_blocks, x, 0, n_blocks)
    return y


@pjit
def _gemv_portable(values, scale_bits, x):  # x [1, K] -> y [1, N], a loop LLVM vectorises
    n_rows, k_cols = values.shape
    y = np.empty((1, n_rows), dtype=np.float32)
    rows_per = row_block(n_rows)
    for task in numba.prange((n_rows + rows_per - 1) // rows_per):
        lanes = np.empty(32, dtype=np.float32)  # one accumulator per block position
        for n in range(task * rows_per, min(n_rows, (task + 1) * rows_per)):
            lanes[:] = 0.0
            for b in range(k_cols // 32):
                d = half_to_f32(scale_bits[n, b])
                for j in range(32):
                    lanes[j] += d * (np.float32(values[n, 32 * b + j]) * x[0, 32 * b + j])
            y[0, n] = lanes.sum()
    return y


@pjit
def _dequantize_rows(values, scale_bits, n0, rows, tile):  # tile[:rows] = W[n0:n0+rows]
    k_cols = values.shape[1]
    for r in numba.prange(rows):
        for b in range(k_cols // 32):
            d = half_to_f32(scale_bits[n0 + r, b])
            for j in range(32):
                tile[r, 32 * b + j] = d * np.float32(values[n0 + r, 32 * b + j])


def gemv(values, scales, x, path: str = DEFAULT_PATH) -> np.ndarray:
    """One token times a Q8_0 weight, ``y = x @ W.T``, by the chosen kernel.

    Parameters
    ----------
    values : np.ndarray
        ``[N, K]`` int8, C-contiguous.
    scales : np.ndarray
        ``[N, K/32]`` float16, C-contiguous.
    x : np.ndarray
        ``[1, K]`` float32, C-contiguous.
    path : {"vector", "portable"}
        :func:`q8_dot` (the default on AVX-512 hosts) or the plain Numba loop (elsewhere).

    Returns
    -------
    np.ndarray
        ``[1, N]`` float32.
    """
    bits = scales.view(np.uint16)
    if path == "vector":
        return _gemv_vector(values, bits, x)
    if path == "portable":
        return _gemv_portable(values, bits, x)
    raise NpsparseError(f"Q8_0 kernel path must be one of {list(PATHS)}, got {path!r}")


class Q8Linear(PackedLinear):
    """Q8_0 blocks: int8 values with one float16 scale per 32 (1.0625 bytes per weight).

    Arrays: ``values [N, K] int8``, ``scales [N, K/32] float16``. ``path`` names the GEMV
    lowering (:data:`PATHS`); it defaults to the host's best and may be set (tests run both).
    """

    FORMAT = "q8_0"

    def __init__(self, arrays, shape):
        super().__init__(arrays, shape)
        self.path = DEFAULT_PATH

    @classmethod
    def pack(cls, weight, mask=None):
        """Quantize ``W [N, K]`` (times ``mask``) to Q8_0 by :func:`quantize_q8_0` (lossy).

        Parameters
        ----------
        weight : array-like
            ``[N, K]`` float32, ``K`` a multiple of 32.
        mask : array-like, optional
            ``[N, K]`` bool, True = kept; pruned positions become zeros before quantizing.

        Returns
        -------
        Q8Linear
        """
        weight, keep = check_weight_mask(weight, mask)
        values, scales = quantize_q8_0(np.where(keep, weight, np.float32(0.0)))
        return cls({"values": values, "scales": scales}, weight.shape)

    @classmethod
    def from_q8_0(cls, values, scales):
        """Wrap Q8_0 arrays as they are (a GGUF's own blocks, see :func:`q8_0_from_blocks`).

        Parameters
        ----------
        values : np.ndarray
            ``[N, K]`` int8.
        scales : np.ndarray
            ``[N, K/32]`` float16, finite.

        Returns
        -------
        Q8Linear

        Raises
        ------
        NpsparseError
            As :meth:`from_arrays`.
        """
        return cls.from_arrays({"values": values, "scales": scales}, {})

    @classmethod
    def from_arrays(cls, arrays, metadata):
        """Wrap stored ``values`` and ``scales`` as a layer (no copy), after checking them.

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            ``values [N, K] int8`` and ``scales [N, K/32] float16``; others are ignored.
        metadata : dict of str to str
            Not read: the format has no options (the shape is the arrays').

        Returns
        -------
        Q8Linear

        Raises
        ------
        NpsparseError
            An array missing or of the wrong dtype, rank or shape, ``K`` not a multiple of 32,
            or a scale that is NaN or infinite.
        """
        check_arrays(arrays, {"values": (np.int8, 2), "scales": (np.float16, 2)}, cls.FORMAT)
        values, scales = arrays["values"], arrays["scales"]
        _check_k(values.shape[1])
        check_shapes(arrays, {"scales": (values.shape[0], values.shape[1] // BLOCK)}, cls.FORMAT)
        if not np.all(np.isfinite(scales)):
            raise NpsparseError(f"{cls.FORMAT} array 'scales' holds NaN or infinite values")
        if not (values.flags.c_contiguous and scales.flags.c_contiguous):
            raise NpsparseError(f"{cls.FORMAT} arrays must be C-contiguous")
        return cls({"values": values, "scales": scales}, values.shape)

    def _matmul(self, x):
        values, scales = self.arrays["values"], self.arrays["scales"]
        if x.shape[0] == 1:
            return gemv(values, scales, x, self.path)
        n_rows, k_cols = self.shape
        y = np.empty((x.shape[0], n_rows), dtype=np.float32)  # [T, N]
        tile = np.empty((min(TILE_ROWS, n_rows), k_cols), dtype=np.float32)
        for n0 in range(0, n_rows, TILE_ROWS):
            rows = min(TILE_ROWS, n_rows - n0)
            _dequantize_rows(values, scales.view(np.uint16), n0, rows, tile)
            y[:, n0:n0 + rows] = x @ tile[:rows].T  # [T, K] @ [K, rows]: BLAS
        return y

    def matmul_naive(self, x):
        """``x @ W.T`` by a scalar loop: per block, the int8 dot product, times its scale."""
        x = check_x(x, self.shape[1])
        return _matmul_naive(self.arrays["values"], self.arrays["scales"].view(np.uint16), x)

    def to_dense(self):
        """The stored weight ``d * q`` in float32 (exact)."""
        return dequantize_q8_0(self.arrays["values"], self.arrays["scales"])

    def rows(self, ids) -> np.ndarray:
        """Dequantized rows ``W[ids]``: the embedding lookup of a tied Q8_0 head.

        Parameters
        ----------
        ids : array-like
            ``[T]`` integer row indices in ``0 .. N-1``.

        Returns
        -------
        np.ndarray
            ``[T, K]`` float32, equal to ``to_dense()[ids]``; only those rows are read.
        """
        ids = np.asarray(ids, dtype=np.int64)
        return dequantize_q8_0(self.arrays["values"][ids], self.arrays["scales"][ids])

    @property
    def nnz(self) -> int:
        """int: stored values whose weight is not zero (a zero scale zeroes its block)."""
        nonzero = (self.arrays["values"] != 0).reshape(self.shape[0], -1, BLOCK)
        return int((nonzero & (self.arrays["scales"] != 0)[:, :, None]).sum())
