"""The LLVM primitive behind the panel kernel: 16 output rows from one panel's mask words.

A panel mask word covers 16 rows x 2 columns: bit ``r`` = (row r, column k), bit ``16 + r`` =
(row r, column k + 1). Expanding the next ``popcount`` packed bf16 values by that word gives 32
uint16 lanes in bit order. Read as 16 uint32 lanes, lane ``m`` holds words ``2m`` (low half)
and ``2m + 1`` (high half); a shift left by 16 and an and with ``0xFFFF0000`` turn them into two
float32 vectors (bf16 bits are the high half of float32 bits):

    even = rows 0, 2, .. 14 of column k, then rows 0, 2, .. 14 of column k + 1
    odd  = rows 1, 3, .. 15 of column k, then rows 1, 3, .. 15 of column k + 1

so both meet the same activation vector ``[x[k]] * 8 + [x[k + 1]] * 8``, built per pair from two
scalar loads of x (L1-resident) by one two-source permute. Each column pair costs one expand, a
shift, an and, that permute and two FMAs (~3.3 cycles per 32 positions on Zen 4, where 512-bit
ops occupy a pipe for 2 cycles; the and may run on any of the four vector pipes). Loading the
activation vector precomputed instead (64 bytes per pair, from L2 for K = 4096) saves the permute
but took twice as long out of cache: its L2 reads got in the way of the weight stream. The halves
are folded and put in row order once per panel, and the 16 outputs are stored directly (no
horizontal sums).

Three lowerings of the expand, chosen once from the host CPU (tests run all on a VBMI2 host):

* ``vbmi2``: over-load 32 values, register-form ``vpexpandw`` (``llvm.x86.avx512.mask.expand``).
* ``avx512``: two 16-lane ``vpexpandd`` after zero-extending (as :mod:`._simd`), then two
  two-source permutes into the even/odd order above.
* ``portable``: ``llvm.masked.expandload`` (reads exactly ``popcount`` values), then shift/and.

The first two read up to :data:`OVERREAD` values past the panel's last one; callers run the
portable lowering on panels that end closer than that to the array's end.
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._simd import _HOST_AVX512, _data_ptr, _fn, _unrolled, _expand16

_FEATURES = llvm_binding.get_host_cpu_features().flatten()
HOST_MODE = ("vbmi2" if "+avx512vbmi2" in _FEATURES else
             "avx512" if _HOST_AVX512 else "portable")
MODES = ("vbmi2", "avx512", "portable")

OVERREAD = 32  # packed values the x86 lowerings may read past a panel's last one

_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_V16I32 = ir.VectorType(_I32, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V32I1 = ir.VectorType(ir.IntType(1), 32)

# i32 lanes of even and odd, as indices into [column k rows 0-15, column k+1 rows 0-15].
_EVEN = [2 * i for i in range(8)] + [16 + 2 * i for i in range(8)]
_ODD = [i + 1 for i in _EVEN]
_UPPER_HALF = ir.Constant(ir.VectorType(ir.IntType(1), 16), [0] * 8 + [1] * 8)


def _splat(builder, scalar):
    """<16 x float> with every lane = scalar."""
    one = builder.insert_element(ir.Constant(_V16F, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_V16I32, [0] * 16))


def _in_register(builder, vec):
    """``vec`` unchanged, but forced into a register: an empty asm tied to its input. It keeps
    LLVM from folding the load into ``vpexpandw``'s memory form (half the speed on Zen 4)."""
    asm = ir.InlineAsm(ir.FunctionType(vec.type, [vec.type]), "", "=v,0")
    return builder.call(asm, [vec])


def _expand_pair(builder, mode, vptr, p, word):
    """(even, odd) float32 <16> vectors of one mask word's 32 positions (see the module doc)."""
    src = builder.gep(vptr, [p])
    lanes = builder.bitcast(word, _V32I1)
    if mode == "avx512":
        ctpop = _fn(builder, "llvm.ctpop.i32", _I32, [_I32])
        low = builder.trunc(word, _I16)
        high = builder.trunc(builder.lshr(word, ir.Constant(_I32, 16)), _I16)
        mid = builder.add(p, builder.zext(builder.call(ctpop, [builder.zext(low, _I32)]), _I64))
        col_k = _expand16(builder, "bf16", True, vptr, p, low)
        col_k1 = _expand16(builder, "bf16", True, vptr, mid, high)
        pick = ir.VectorType(_I32, 16)
        return (builder.shuffle_vector(col_k, col_k1, ir.Constant(pick, _EVEN)),
                builder.shuffle_vector(col_k, col_k1, ir.Constant(pick, _ODD)))
    if mode == "vbmi2":
        raw = builder.load(builder.bitcast(src, _V32I16.as_pointer()), align=2)
        expand = _fn(builder, "llvm.x86.avx512.mask.expand.v32i16", _V32I16,
                     [_V32I16, _V32I16, _V32I1])
        words = builder.call(expand, [_in_register(builder, raw), ir.Constant(_V32I16, None),
                                      lanes])
    else:
        expand = _fn(builder, "llvm.masked.expandload.v32i16", _V32I16,
                     [src.type, _V32I1, _V32I16])
        words = builder.call(expand, [src, lanes, ir.Constant(_V32I16, None)])
    pairs = builder.bitcast(words, _V16I32)  # lane m = (word 2m + 1) << 16 | word 2m
    even = builder.shl(pairs, ir.Constant(_V16I32, [16] * 16))
    odd = builder.and_(pairs, ir.Constant(_V16I32, [-65536] * 16))
    return builder.bitcast(even, _V16F), builder.bitcast(odd, _V16F)


def _make_panel_dot(mode, tokens, ways):
    @intrinsic
    def panel_dot(typingctx, masks, moff, vals, voff, x, xoff, xstride, npairs, out, ooff,
                  ostride):
        """out[ooff + s*ostride:][:16] = one panel times token s of x, for ``tokens`` tokens:
        masks[moff:moff+npairs] uint32, values from vals[voff:] (uint16 bf16 bits), token s at
        x[xoff + s*xstride:][:2*npairs] float32 (zero-padded to even). Each word is expanded once
        for all the tokens."""
        if vals.dtype != types.uint16:
            raise TypeError(f"panel kernels take uint16 (bf16) values, not {vals.dtype}")
        sig = types.void(masks, types.intp, vals, types.intp, x, types.intp, types.intp,
                         types.intp, out, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            masks_a, moff_, vals_a, voff_, x_a, xoff_, xstride, count, out_a, ooff_, ostride = args
            mptr = _data_ptr(context, builder, signature.args[0], masks_a, moff_)
            vptr = _data_ptr(context, builder, signature.args[2], vals_a, voff_)
            xptrs = [_data_ptr(context, builder, signature.args[4], x_a, builder.add(
                xoff_, builder.mul(xstride, ir.Constant(_I64, s)))) for s in range(tokens)]
            fma = _fn(builder, "llvm.fma.v16f32", _V16F, [_V16F, _V16F, _V16F])
            ctpop = _fn(builder, "llvm.ctpop.i32", _I32, [_I32])
            # ways pairs per iteration, each with its own even/odd accumulators per token: FMA
            # latency (4 cycles on Zen 4) would bound one token at 2 cycles per column pair.
            accs = [[[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None))
                      for _ in range(2)] for _ in range(tokens)] for _ in range(ways)]
            p = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))

            def pair(j, slot):
                word = builder.load(builder.gep(mptr, [j]))
                start = builder.load(p)
                even, odd = _expand_pair(builder, mode, vptr, start, word)
                builder.store(builder.add(start, builder.zext(builder.call(ctpop, [word]), _I64)),
                              p)
                col = builder.mul(j, ir.Constant(_I64, 2))
                for xptr, token_accs in zip(xptrs, accs[slot]):
                    x_k = _splat(builder, builder.load(builder.gep(xptr, [col])))
                    x_k1 = _splat(builder, builder.load(builder.gep(xptr, [builder.add(
                        col, ir.Constant(_I64, 1))])))
                    # [x[k]] * 8 + [x[k+1]] * 8: LLVM makes it two vmovss and one vpermt2ps
                    xv = builder.select(_UPPER_HALF, x_k1, x_k)
                    for half, acc in zip((even, odd), token_accs):
                        builder.store(builder.call(fma, [half, xv, builder.load(acc)]), acc)

            _unrolled(builder, count, ways, pair)
            for s in range(tokens):
                rows = _panel_rows(builder, [accs[slot][s] for slot in range(ways)])
                dst = builder.gep(_data_ptr(context, builder, signature.args[8], out_a, ooff_),
                                  [builder.mul(ostride, ir.Constant(_I64, s))])
                builder.store(rows, builder.bitcast(dst, _V16F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return panel_dot


def _panel_rows(builder, accs):
    """The 16 row sums in row order from the (even, odd) accumulator allocas of every slot."""
    even, odd = (builder.load(accs[0][h]) for h in range(2))
    for acc in accs[1:]:
        even = builder.fadd(even, builder.load(acc[0]))
        odd = builder.fadd(odd, builder.load(acc[1]))
    first, second = (ir.Constant(ir.VectorType(_I32, 8), list(range(s, s + 8))) for s in (0, 8))
    # column k's half plus column k+1's half: even rows 0, 2, .. 14; odd rows 1, .. 15
    even = builder.fadd(builder.shuffle_vector(even, even, first),
                        builder.shuffle_vector(even, even, second))
    odd = builder.fadd(builder.shuffle_vector(odd, odd, first),
                       builder.shuffle_vector(odd, odd, second))
    interleave = [lane for r in range(8) for lane in (r, 8 + r)]
    return builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(_I32, 16), interleave))


# One token, four pairs in flight; four tokens (a GEMM's groups), one pair in flight: with 8
# accumulators the FMA chains already overlap.
PANEL_DOT = {mode: _make_panel_dot(mode, 1, 4) for mode in MODES}
PANEL_DOT4 = {mode: _make_panel_dot(mode, 4, 1) for mode in MODES}
panel_dot, panel_dot4 = PANEL_DOT[HOST_MODE], PANEL_DOT4[HOST_MODE]
panel_dot_portable, panel_dot4_portable = PANEL_DOT["portable"], PANEL_DOT4["portable"]
