"""Every format's one-token product, callable from compiled code (the compiled decode step).

A layer's ``__call__`` chooses its kernel in Python (padding, path, pattern) and costs a Numba
dispatch per product. A decode step compiled as one function (:mod:`npsparse.models.llama_token`)
cannot call Python, so each format's choice is made once here, in :func:`step_args`: the layer's
arrays and the flags its ``_matmul`` would read, as a small named tuple whose *type* names the
format. :func:`layer_gemv`, called from jitted code, is resolved at compile time from that type to
the same kernel ``__call__`` runs for one token, so both give the same bits.

Formats without an entry (monarch, the training wrappers, anything new) make :func:`step_args`
return None, and decode then runs the per-layer path.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ..linear import DenseLinear
from ._numba import jit
from .bitmask import BitmaskLinear
from .bitmask import _gemv as _bitmask_gemv
from .bf16 import BF16Linear
from .csr import CSRLinear
from .csr import _gemv as _csr_gemv
from .dense import gemv_dense
from .nm import NMLinear, _fast_plan
from .nm import _gemv as _nm_gemv
from .nm import _gemv24 as _nm_gemv24
from .nm import _matmul_naive as _nm_naive
from .panel import PanelLinear
from .panel import _matmul as _panel_matmul
from .qpanel import QPanelLinear
from .qpanel import _matmul as _qpanel_matmul
from .q8 import Q8Linear, _gemv_portable as _q8_portable, _gemv_vector as _q8_vector
from ._simd import _data_ptr, _fn


class DenseArgs(NamedTuple):  # dense float32 or bf16 bits, [N, K]
    weight: np.ndarray


class PanelArgs(NamedTuple):
    masks: np.ndarray
    values: np.ndarray
    panel_ptr: np.ndarray
    n_rows: int
    portable: bool


class QPanelArgs(NamedTuple):
    masks: np.ndarray
    values: np.ndarray
    panel_ptr: np.ndarray
    scales: np.ndarray
    group: int
    n_rows: int
    portable: bool


class BitmaskArgs(NamedTuple):
    masks: np.ndarray
    values: np.ndarray
    row_ptr: np.ndarray
    scales: np.ndarray


class CSRArgs(NamedTuple):
    values: np.ndarray
    cols: np.ndarray
    row_ptr: np.ndarray


class NMArgs(NamedTuple):  # kernel 0: _gemv24, 1: _gemv with a plan, 2: the naive loop
    values: np.ndarray
    indices: np.ndarray
    scales: np.ndarray
    m: int
    kept: int
    kernel: int
    lanes: np.ndarray
    chunk_bytes: int
    field: int


class Q8Args(NamedTuple):
    values: np.ndarray
    scale_bits: np.ndarray
    vector: bool


_NO_LANES = np.zeros(0, dtype=np.int64)


def step_args(layer):
    """The arrays and flags of ``layer``'s one-token product, or None if no compiled path exists.

    Parameters
    ----------
    layer : Linear
        A block linear layer or the output head.

    Returns
    -------
    NamedTuple or None
        One of the ``*Args`` tuples of this module, read by :func:`layer_gemv`.
    """
    kind = type(layer)
    if kind is DenseLinear:
        w = layer.weight
        return DenseArgs(w) if w.dtype == np.float32 and w.flags.c_contiguous else None
    if kind is BF16Linear:
        return DenseArgs(layer.arrays["bits"])
    a = getattr(layer, "arrays", None)
    if kind is PanelLinear:
        return PanelArgs(a["masks"], a["values"], a["panel_ptr"], layer.shape[0],
                         bool(layer._portable))
    if kind is QPanelLinear:
        return QPanelArgs(a["masks"], a["values"], a["panel_ptr"], a["scales"], layer.group,
                          layer.shape[0], bool(layer._portable))
    if kind is BitmaskLinear:
        return BitmaskArgs(*layer._kernel_args())
    if kind is CSRLinear:
        return CSRArgs(a["values"], a["cols"], a["row_ptr"])
    if kind is NMLinear:
        values, indices, scales = layer._kernel_args()
        m, kept = layer.m, layer.m - layer.n
        if layer._blend_gemv:
            return NMArgs(values, indices, scales, m, kept, 0, _NO_LANES, 0, 0)
        plan = _fast_plan(layer.n, layer.m, layer.shape[1])
        if plan is None:
            return NMArgs(values, indices, scales, m, kept, 2, _NO_LANES, 0, 0)
        return NMArgs(values, indices, scales, m, kept, 1, *plan)
    if kind is Q8Linear:
        return Q8Args(a["values"], a["scales"].view(np.uint16), layer.path == "vector")
    return None


def layer_gemv(args, x):
    """``y [1, N] = x [1, K] @ W.T`` for the layer described by ``args`` (:func:`step_args`).

    Callable from jitted code only; the kernel is the one the layer's ``__call__`` runs for one
    token.

    Parameters
    ----------
    args : NamedTuple
        A :func:`step_args` tuple; its type picks the kernel when the caller is compiled.
    x : np.ndarray
        ``[1, K]`` float32, C-contiguous.

    Returns
    -------
    np.ndarray
        ``[1, N]`` float32.
    """
    raise NotImplementedError("layer_gemv is called from compiled code only")


@jit
def _padded(x, width):
    """x [1, K] -> [1, width] zero-padded (x itself when K == width)."""
    if x.shape[1] == width:
        return x
    out = np.zeros((1, width), dtype=np.float32)
    out[0, :x.shape[1]] = x[0]
    return out


@overload(layer_gemv)
def _layer_gemv_impl(args, x):
    cls = getattr(args, "instance_class", None) if isinstance(args, types.BaseNamedTuple) else None
    if cls is DenseArgs:
        return lambda args, x: gemv_dense(args.weight, x)
    if cls is PanelArgs:
        def panel(args, x):
            y = _panel_matmul(args.masks, args.values, args.panel_ptr,
                              _padded(x, 2 * args.masks.shape[1]), args.portable)
            return y[:, :args.n_rows]
        return panel
    if cls is QPanelArgs:
        def qpanel(args, x):
            y = _qpanel_matmul(args.masks, args.values, args.panel_ptr, args.scales, args.group,
                               x, args.portable)
            return y[:, :args.n_rows]
        return qpanel
    if cls is BitmaskArgs:
        return lambda args, x: _bitmask_gemv(args.masks, args.values, args.row_ptr, args.scales,
                                             _padded(x, 32 * args.masks.shape[1]))
    if cls is CSRArgs:
        return lambda args, x: _csr_gemv(args.values, args.cols, args.row_ptr, x)
    if cls is NMArgs:
        def nm(args, x):
            if args.kernel == 0:
                return _nm_gemv24(args.values, args.indices, x)
            if args.kernel == 1:
                return _nm_gemv(args.values, args.indices, args.scales, args.m, args.kept,
                                args.lanes, args.chunk_bytes, args.field, x)
            return _nm_naive(args.values, args.indices, args.scales, args.m, args.kept, x)
        return nm
    if cls is Q8Args:
        def q8(args, x):
            if args.vector:
                return _q8_vector(args.values, args.scale_bits, x)
            return _q8_portable(args.values, args.scale_bits, x)
        return q8
    return None


def group_gemv(group, x):
    """The outputs of a tuple of 1-3 same-input layers (``step_args`` each), side by side.

    Callable from jitted code only.

    Parameters
    ----------
    group : tuple of NamedTuple
        :func:`step_args` of each layer.
    x : np.ndarray
        ``[1, K]`` float32, their common input.

    Returns
    -------
    np.ndarray
        ``[1, sum N_i]`` float32, layer ``i``'s columns in order.
    """
    raise NotImplementedError("group_gemv is called from compiled code only")


@overload(group_gemv)
def _group_gemv_impl(group, x):
    if not isinstance(group, types.BaseTuple):
        return None
    if len(group) == 1:
        return lambda group, x: layer_gemv(group[0], x)
    if len(group) == 2:
        return lambda group, x: np.concatenate((layer_gemv(group[0], x),
                                                layer_gemv(group[1], x)), axis=1)
    if len(group) == 3:
        return lambda group, x: np.concatenate((layer_gemv(group[0], x), layer_gemv(group[1], x),
                                                layer_gemv(group[2], x)), axis=1)
    return None


@intrinsic
def ticks(typingctx):
    """The CPU's cycle counter (``rdtsc`` on x86) as int64.

    A Numba intrinsic: callable only from jitted code, as ``ticks()``. Steady across cores where
    the CPU has an invariant TSC (``constant_tsc``/``nonstop_tsc`` in ``/proc/cpuinfo``);
    :func:`tick_seconds` converts.

    Parameters
    ----------
    typingctx : numba typing context
        Supplied by Numba, not by the caller.

    Returns
    -------
    int64
    """
    def codegen(context, builder, signature, args):
        counter = _fn(builder, "llvm.readcyclecounter", ir.IntType(64), [])
        return builder.call(counter, [])

    return types.int64(), codegen


@jit
def read_ticks():
    """:func:`ticks` from Python."""
    return ticks()


def tick_seconds(interval: float = 0.05) -> float:
    """Seconds per :func:`ticks` count, measured against ``time.perf_counter`` over ``interval``.

    Parameters
    ----------
    interval : float
        Seconds to measure over (busy-waited).

    Returns
    -------
    float
    """
    read_ticks()  # compiled before timing
    t0, c0 = time.perf_counter(), read_ticks()
    while time.perf_counter() - t0 < interval:
        pass
    t1, c1 = time.perf_counter(), read_ticks()
    return (t1 - t0) / max(1, c1 - c0)


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring the cache line of ``array``'s flat element ``index`` into L1.

    A Numba intrinsic: callable only from jitted code, as ``prefetch(array, index)``; a hint
    (``prefetcht0``), never a fault, whatever the index. ``array`` must be C-contiguous.

    Parameters
    ----------
    typingctx : numba typing context
        Supplied by Numba, not by the caller.
    array : np.ndarray
        C-contiguous.
    index : int
        Flat element index.

    Returns
    -------
    None
    """
    def codegen(context, builder, signature, args):
        ptr = _data_ptr(context, builder, signature.args[0], args[0], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, i32, i32, i32])
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


@jit
def prefetch_rows(array, first, stop):
    """Prefetch the flat elements ``first .. stop-1`` of ``array``, a cache line at a time.

    Many misses are then in flight at once, where a loop that reads and computes would take them
    a few at a time (its instructions fill the out-of-order window first).

    Parameters
    ----------
    array : np.ndarray
        C-contiguous (one row of a 2-D array is fine).
    first, stop : int
        Flat element range; only addresses are formed, so the range is a hint, not checked.
    """
    step = max(1, 64 // array.itemsize)
    for i in range(first, stop, step):
        prefetch(array, i)
