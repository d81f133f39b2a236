"""The LLVM primitive behind the qpanel kernel: 16 rows of int8 weights times int8 activations.

A qpanel mask word covers 16 rows x 4 columns: bit ``4 r + c`` = (row r, column 4 j + c).
Expanding the next ``popcount`` stored bytes by that word, with 0x80 in the cleared lanes, gives
64 uint8 lanes in bit order: 32-bit lane ``r`` holds row r's four columns, the biased weights
``w_q + 128`` (128 = weight 0). One ``vpdpbusd`` (u8 x s8 -> i32, four products summed per
lane) meets them with the token's four int8 activations of that quad, broadcast to every lane,
so 16 row accumulators grow by one instruction per 64 positions and no horizontal sum is needed.

Per 32-column block ``b`` (8 quads) the integer sums are exact (|sum| <= 32 * 255 * 127 < 2^31);
the bias adds ``128 * sx_b`` (``sx_b`` = the block's activation sum), taken off once per block.
The true block sum is converted to float32 (exact: |sum| <= 32 * 127 * 127 < 2^24) and added as
``accf = fma(sum, d_b * s_g, accf)``, with ``s_g`` the 16 rows' weight scales of the block's
group (one vector load per group, then one multiply by ``d_b`` per block), block after block,
exactly as the naive loop in :mod:`.qpanel` does, so both give the same bits. ``accf`` is the
output: no multiply follows.

Two lowerings, chosen once from the host CPU (tests run both on a VNNI host):

* ``vnni``: over-load 64 bytes, register-form ``vpexpandb`` (``llvm.x86.avx512.mask.expand``,
  kept off its memory form as in :mod:`._panel_simd`), ``vpdpbusd``. Needs AVX512-VBMI2 and
  AVX512-VNNI; reads up to :data:`OVERREAD` bytes past a panel's last value.
* ``portable``: ``llvm.masked.expandload`` (reads exactly ``popcount`` bytes), then widening
  32-bit multiplies and adds of each lane's four products; correct everywhere, not fast.
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._panel_simd import _in_register
from ._simd import _data_ptr, _fn

_FEATURES = llvm_binding.get_host_cpu_features().flatten()
HOST_MODE = ("vnni" if "+avx512vbmi2" in _FEATURES and "+avx512vnni" in _FEATURES
             else "portable")
MODES = ("vnni", "portable")

OVERREAD = 64  # stored bytes the vnni lowering may read past a panel's last one
QUADS = 8  # quads (4 columns) per 32-column activation block

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_V16I32 = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(_I8, 64)
_V64I32 = ir.VectorType(_I32, 64)
_V64I1 = ir.VectorType(ir.IntType(1), 64)
_BIAS = ir.Constant(_V64I8, [0x80] * 64)  # lane value of a pruned position: weight 0


@intrinsic
def fma32(typingctx, a, b, c):
    """``a * b + c`` in float32 with one rounding (``llvm.fma.f32``): the naive loop's block step,
    the scalar twin of the vector kernel's."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(_fn(builder, "llvm.fma.f32", _F32, [_F32, _F32, _F32]), list(args))

    return sig, codegen


def _splat(builder, scalar, vtype):
    """<16 x scalar> with every lane = scalar."""
    one = builder.insert_element(ir.Constant(vtype, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_V16I32, [0] * 16))


def _expand_quad(builder, mode, vptr, p, word):
    """<64 x i8> biased weights of one mask word: stored bytes from vptr[p:], 0x80 elsewhere."""
    src = builder.gep(vptr, [p])
    lanes = builder.bitcast(word, _V64I1)
    if mode == "vnni":
        raw = builder.load(builder.bitcast(src, _V64I8.as_pointer()), align=1)
        expand = _fn(builder, "llvm.x86.avx512.mask.expand.v64i8", _V64I8,
                     [_V64I8, _V64I8, _V64I1])
        return builder.call(expand, [_in_register(builder, raw), _BIAS, lanes])
    expand = _fn(builder, "llvm.masked.expandload.v64i8", _V64I8, [src.type, _V64I1, _V64I8])
    return builder.call(expand, [src, lanes, _BIAS])


def _dot_quad(builder, mode, acc, weights, x4):
    """acc [16] i32 + per lane the four products weights (u8) x x4 (four s8, in every lane)."""
    if mode == "vnni":
        # The <16 x i32> operand form: native before LLVM 21, auto-upgraded after.
        dp = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32, _V16I32, _V16I32])
        return builder.call(dp, [acc, builder.bitcast(weights, _V16I32), x4])
    products = builder.mul(builder.zext(weights, _V64I32),
                           builder.sext(builder.bitcast(x4, _V64I8), _V64I32))
    for c in range(4):  # lane 4 r + c = row r's column c
        picked = ir.Constant(_V16I32, [4 * r + c for r in range(16)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, picked))
    return acc


def _make_qpanel_dot(mode, tokens, chains):
    @intrinsic
    def qpanel_dot(typingctx, masks, moff, vals, voff, xq, xoff, xstride, d, sx, boff, bstride,
                   nblocks, gblocks, scales, soff, out, ooff, ostride):
        """out[ooff + s*ostride:][:16] = one panel times token s, for ``tokens`` tokens:
        masks[moff:moff + 8*nblocks] uint64, biased weights from vals[voff:] (uint8), token s's
        int8 activations at xq[xoff + s*xstride:], its block scales d and sums sx at
        [boff + s*bstride:]; ``gblocks`` blocks per weight scale group, whose 16 row scales are
        at scales[soff + 16 g:] (flat float32). Each word is expanded once for all the tokens."""
        if vals.dtype != types.uint8 or xq.dtype != types.int8:
            raise TypeError(f"qpanel kernels take uint8 values and int8 activations, not "
                            f"{vals.dtype} and {xq.dtype}")
        sig = types.void(masks, types.intp, vals, types.intp, xq, types.intp, types.intp, d, sx,
                         types.intp, types.intp, types.intp, types.intp, scales, types.intp, out,
                         types.intp, types.intp)

        def codegen(context, builder, signature, args):
            (masks_a, moff_, vals_a, voff_, xq_a, xoff_, xstride_, d_a, sx_a, boff_, bstride_,
             count, gblocks_, sc_a, soff_, out_a, ooff_, ostride_) = args

            def ptr(index, array, offset):
                return _data_ptr(context, builder, signature.args[index], array, offset)

            def token_offset(base, stride, s):
                return builder.add(base, builder.mul(stride, ir.Constant(_I64, s)))

            mptr, vptr = ptr(0, masks_a, moff_), ptr(2, vals_a, voff_)
            x32s = [builder.bitcast(ptr(4, xq_a, token_offset(xoff_, xstride_, s)),
                                    _I32.as_pointer()) for s in range(tokens)]  # 4 bytes a quad
            dptrs = [ptr(7, d_a, token_offset(boff_, bstride_, s)) for s in range(tokens)]
            sptrs = [ptr(8, sx_a, token_offset(boff_, bstride_, s)) for s in range(tokens)]
            scale_ptr = ptr(13, sc_a, soff_)
            fma = _fn(builder, "llvm.fma.v16f32", _V16F, [_V16F, _V16F, _V16F])
            ctpop = _fn(builder, "llvm.ctpop.i64", _I64, [_I64])
            accf = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None))
                    for _ in range(tokens)]
            p = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))
            one = ir.Constant(_I64, 1)
            n_groups = builder.sdiv(builder.add(count, builder.sub(gblocks_, one)), gblocks_)
            with cgutils.for_range(builder, n_groups) as group_loop:
                g = group_loop.index
                group_scales = builder.load(  # [16] the rows' scales of group g
                    builder.bitcast(builder.gep(scale_ptr, [builder.mul(g, ir.Constant(_I64, 16))]),
                                    _V16F.as_pointer()), align=4)
                first = builder.mul(g, gblocks_)
                stop = builder.add(first, gblocks_)
                stop = builder.select(builder.icmp_signed("<", stop, count), stop, count)
                with cgutils.for_range(builder, stop, start=first) as loop:
                    _block(builder, mode, chains, loop.index, mptr, vptr, p, ctpop, x32s, dptrs,
                           sptrs, group_scales, fma, accf)
            for s in range(tokens):
                dst = ptr(15, out_a, token_offset(ooff_, ostride_, s))
                builder.store(builder.load(accf[s]), builder.bitcast(dst, _V16F.as_pointer()),
                              align=4)
            return context.get_dummy_value()

        return sig, codegen

    return qpanel_dot


def _block(builder, mode, chains, b, mptr, vptr, p, ctpop, x32s, dptrs, sptrs, group_scales, fma,
           accf):
    """Block b (8 quads) of one panel for each token: accf[s] = fma(sum, d_b * scales, accf[s])."""
    tokens = len(accf)
    # ``chains`` integer accumulators per token: vpdpbusd's latency (Zen 4: 4 cycles) would
    # otherwise bound a token at one quad per 4 cycles. Integer sums are exact, so how the quads
    # are split among them changes no bit.
    accs = [[ir.Constant(_V16I32, None)] * chains for _ in range(tokens)]
    for jj in range(QUADS):
        j = builder.add(builder.mul(b, ir.Constant(_I64, QUADS)), ir.Constant(_I64, jj))
        word = builder.load(builder.gep(mptr, [j]))
        start = builder.load(p)
        weights = _expand_quad(builder, mode, vptr, start, word)
        builder.store(builder.add(start, builder.call(ctpop, [word])), p)
        for s in range(tokens):
            x4 = _splat(builder, builder.load(builder.gep(x32s[s], [j]), align=1), _V16I32)
            chain = jj % chains
            accs[s][chain] = _dot_quad(builder, mode, accs[s][chain], weights, x4)
    for s in range(tokens):
        total = accs[s][0]
        for other in accs[s][1:]:
            total = builder.add(total, other)
        bias = builder.shl(builder.load(builder.gep(sptrs[s], [b])),
                           ir.Constant(_I32, 7))  # 128 * sx_b
        exact = builder.sitofp(builder.sub(total, _splat(builder, bias, _V16I32)), _V16F)
        d_b = _splat(builder, builder.load(builder.gep(dptrs[s], [b])), _V16F)
        step = builder.fmul(d_b, group_scales)  # [16] d_b * s_g, rounded once, as the naive loop
        builder.store(builder.call(fma, [exact, step, builder.load(accf[s])]), accf[s])


# One token, two integer chains per block; four tokens, one chain each (four already overlap).
QPANEL_DOT = {mode: _make_qpanel_dot(mode, 1, 2) for mode in MODES}
QPANEL_DOT4 = {mode: _make_qpanel_dot(mode, 4, 1) for mode in MODES}
qpanel_dot, qpanel_dot4 = QPANEL_DOT[HOST_MODE], QPANEL_DOT4[HOST_MODE]
qpanel_dot_portable, qpanel_dot4_portable = QPANEL_DOT["portable"], QPANEL_DOT4["portable"]
