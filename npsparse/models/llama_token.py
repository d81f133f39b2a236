"""One decoded token of a LLaMA-family model in one compiled call per block.

:mod:`.llama_decode` runs a block's one-token step as a handful of compiled calls with Python
between them: about 300 Numba dispatches and 120 product calls per SmolLM2 token, whose overhead
was a large share of a sparse model's token. :func:`decode_token` instead gathers what a block
reads (norm gains, each product's arrays as :func:`npsparse.kernels.step.step_args` describes
them) into one tuple and makes a single call to :func:`block_step` per block, which runs the whole
block in compiled code: RMSNorm, the q/k/v product (one stacked product when :mod:`npsparse.arena`
built it), RoPE + cache append + attention (:func:`~npsparse.kernels.attention.decode_step`),
o_proj and the residual with the next norm, gate/up, SwiGLU, down_proj and the residual; then
:func:`head_step` (final norm and head). Each product is still its own parallel region, entered
from compiled code: Numba offers no barrier for threads that would walk one work list.

One call per token over all blocks was tried: a tuple of 30 block tuples as one argument took
Numba 40-130 s to compile (LLVM over a few hundred array structs), against 6-8 s for one block;
30 calls cost a few microseconds each.

The arithmetic is :mod:`.llama_decode`'s, in the same order, with the same kernels; only SwiGLU's
``exp`` is the compiled scalar one instead of NumPy's, so results agree with the per-block path
to float32 rounding (tested). Blocks with top-L attention, a routed FFN or PESC experts, layers
in a format without a compiled product, and float64 models run the per-block path instead.

Setting ``model.token_step = False`` turns this path off (for comparisons). The cycles spent
inside the products are summed in :data:`PRODUCT_TICKS`, so that ``npsparse bench decode`` can
report the time per token outside them.
"""

from __future__ import annotations

import numpy as np
import numba

from ..kernels._numba import jit
from ..kernels.attention import decode_step
from ..kernels.rowops import add_rms_norm, rms_norm_rows
from ..kernels.step import group_gemv, layer_gemv, prefetch_rows, step_args, ticks
from .llama_decode import GATE_UP, QKV

_NO_BIAS = np.zeros(0, dtype=np.float32)
# Cycles (kernels.step.ticks) spent inside the products of every token decoded by this path,
# summed: what ``npsparse bench decode`` subtracts to find the time outside them.
PRODUCT_TICKS = np.zeros(1, dtype=np.int64)


def _f32(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous


def _group(block, names):
    """step_args of a same-input group: the stacked layer if current, else each layer."""
    fused = block.fused.get(names)
    if fused is not None and fused.current([block.linears[n] for n in names]):
        args = step_args(fused.layer)
        if args is not None:
            return (args,)
    group = tuple(step_args(block.linears[n]) for n in names)
    return None if any(a is None for a in group) else group


def _state(block) -> tuple:
    """Every object :func:`block_args` reads from ``block``."""
    return (block.attention, block.ffn_router, block.moe, block.attn_norm, block.mlp_norm,
            *block.bias.values(), *block.fused.values(), *block.linears.values())


def block_args(block):
    """What :func:`block_step` reads of one block, or None if the block needs the per-block path.

    The tuple is kept on the block with the objects it was built from (layers, stacked layers,
    norms, biases, attention/FFN replacements), and rebuilt when any of them is no longer the
    very same object. Kept alive there, those objects' ``id`` cannot be reused, so one tuple
    comparison of ids checks them all. The layers' kernel switches (``PanelLinear._portable``,
    ``Q8Linear.path``) are read when the tuple is built.

    Parameters
    ----------
    block : LlamaBlock

    Returns
    -------
    tuple or None
        ``(attn_norm, mlp_norm, qkv group, q bias, k bias, v bias, o_proj, gate/up group,
        down_proj)``; absent biases are empty arrays.
    """
    return _kept(block)[2]


def _kept(block) -> list:
    """``[objects, their ids, block_args, compiled block_step for them or None]``, kept."""
    state = _state(block)
    ids = tuple(map(id, state))
    kept = getattr(block, "_token_args", None)
    if kept is None or kept[1] != ids:
        kept = [state, ids, _build_block_args(block), None]
        block._token_args = kept
    return kept


def _compiled(dispatcher, args):
    """The machine code of ``dispatcher`` for the types of ``args`` (compiled or loaded from the
    disk cache once). Calling it skips the dispatcher's typing of every argument on every call,
    about 10 µs for a block's tuple of named tuples (Numba types named tuples in Python)."""
    return dispatcher.compile(tuple(numba.typeof(a) for a in args))


def _build_block_args(block):
    if block.attention is not None or block.ffn_router is not None or block.moe is not None:
        return None
    if not (_f32(block.attn_norm) and _f32(block.mlp_norm)):
        return None
    qkv, gate_up = _group(block, QKV), _group(block, GATE_UP)
    o_proj = step_args(block.linears["self_attn.o_proj"])
    down = step_args(block.linears["mlp.down_proj"])
    if qkv is None or gate_up is None or o_proj is None or down is None:
        return None
    bias = tuple(_NO_BIAS if block.bias[n] is None else block.bias[n] for n in "qkv")
    if not all(_f32(b) for b in bias):
        return None
    return (block.attn_norm, block.mlp_norm, qkv) + bias + (o_proj, gate_up, down)


def decode_token(model, ids: np.ndarray, start: int, cache) -> np.ndarray | None:
    """Logits of one new token through every block and the head in one compiled call.

    Parameters
    ----------
    model : LlamaModel
    ids : np.ndarray
        ``[1]`` int64, the token.
    start : int
        Its position (``cache.length``); the caller advances the cache.
    cache : KVCache

    Returns
    -------
    np.ndarray or None
        ``[1, V]`` float32 logits, or None (nothing computed) when some block or the head has
        no compiled path; the caller then runs the per-block path.
    """
    if not getattr(model, "token_step", True):
        return None
    kept = [_kept(block) for block in model.blocks]
    head = _kept_head(model)
    if head[1] is None or any(k[2] is None for k in kept) or not _f32(model.norm):
        return None
    if not all(_f32(a) and a.ndim == 3 for a in cache.k + cache.v):
        return None
    cfg = model.config
    cos, sin = model.rope(start, 1)  # [1, hd]
    cos, sin = cos[0], sin[0]
    eps, n_heads, n_kv, head_dim = cfg.norm_eps, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    threads = numba.config.NUMBA_NUM_THREADS
    x = model.embed(ids, start)  # [1, D]
    if not _f32(x):
        return None
    for k, cache_k, cache_v in zip(kept, cache.k, cache.v):
        args = (x, k[2], cache_k, cache_v, cos, sin, start, eps, n_heads, n_kv, head_dim, threads,
                PRODUCT_TICKS)
        if k[3] is None:
            k[3] = _compiled(block_step, args)
        x = k[3](*args)
    args = (x, model.norm, eps, head[1], PRODUCT_TICKS)
    if head[2] is None:
        head[2] = _compiled(head_step, args)
    return head[2](*args)


def _kept_head(model) -> list:
    """``[head layer, its step_args, compiled head_step or None]``, kept on the model while its
    head is the same object."""
    kept = getattr(model, "_token_head", None)
    if kept is None or kept[0] is not model.head:
        kept = [model.head, step_args(model.head), None]
        model._token_head = kept
    return kept


@jit
def silu_mul_row(gate_up, ffn):
    """``silu(gate) * up`` of one token.

    As :func:`npsparse.kernels.rowops.silu_mul` computes it, ``g / (1 + exp(-g)) * up``, but with
    an ``exp`` that vectorises (Numba's scalar ``exp`` took 14 µs per SmolLM2 layer in decode,
    this 3 µs): ``exp(z) = 2^n e^r`` with ``n = round(z / ln 2)``, ``|r| <= ln 2 / 2`` and
    ``e^r`` by its Taylor series to ``r^7`` (truncation below 6e-9 relative, under float32's
    rounding); ``z = -g`` is clamped to [-87, 88], where ``exp`` stays a normal float32 and
    ``silu`` is ``g`` or below 1e-36 either way. Within 6e-7 relative (a few float32 ulps) of
    NumPy's result (tested).

    Parameters
    ----------
    gate_up : np.ndarray
        ``[1, 2F]`` float32: the gate projection, then the up projection.
    ffn : int
        ``F``.

    Returns
    -------
    np.ndarray
        ``[1, F]`` float32.
    """
    poly = np.empty(ffn, dtype=np.float32)
    bits = np.empty(ffn, dtype=np.int32)  # 2^n as float32 bits
    for j in range(ffn):
        z = min(max(-gate_up[0, j], np.float32(-87.0)), np.float32(88.0))
        n = np.floor(z * np.float32(1.4426950408889634) + np.float32(0.5))
        # r = z - n ln 2, with ln 2 split in two so that n * 0.693359375 is exact
        r = z - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        p = np.float32(1.0 / 5040)
        for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
            p = p * r + np.float32(c)
        poly[j] = p
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    out = np.empty((1, ffn), dtype=np.float32)
    for j in range(ffn):
        out[0, j] = gate_up[0, j] / (poly[j] * scale[j] + np.float32(1.0)) * gate_up[0, ffn + j]
    return out


@jit
def block_step(x, block, cache_k, cache_v, cos, sin, position, eps, n_heads, n_kv, head_dim,
               threads, clock):
    """One block for one token; see the module docstring.

    Parameters
    ----------
    x : np.ndarray
        ``[1, D]`` float32, the residual stream.
    block : tuple
        :func:`block_args` of the block.
    cache_k, cache_v : np.ndarray
        The layer's ``[KV, capacity, hd]`` float32 cache; ``position`` is written.
    cos, sin : np.ndarray
        ``[hd]`` float32 RoPE tables at ``position``.
    position : int
    eps : float
        RMSNorm epsilon.
    n_heads, n_kv, head_dim : int
    threads : int
        The kernel thread ceiling (long contexts split attention by it).
    clock : np.ndarray
        ``[1]`` int64; the cycles spent in the four products are added to it.

    Returns
    -------
    np.ndarray
        ``[1, D]`` float32, the block's output.
    """
    q_end = n_heads * head_dim
    k_end = q_end + n_kv * head_dim
    h = rms_norm_rows(x, block[0], eps)  # [1, D]
    t0 = ticks()
    qkv = group_gemv(block[2], h)  # [1, (H + 2 KV) hd]
    spent = ticks() - t0
    # What the next steps read, requested all at once: the products' outputs (half of them
    # written by the other thread's core) and this layer's cached keys and values (evicted by
    # the weights streamed since the last token). Read in loops instead, they arrive a few
    # cache lines at a time.
    prefetch_rows(qkv, 0, qkv.size)
    plane = cache_k.shape[1] * head_dim
    for kv in range(n_kv):
        prefetch_rows(cache_k, kv * plane, kv * plane + (position + 1) * head_dim)
        prefetch_rows(cache_v, kv * plane, kv * plane + (position + 1) * head_dim)
    q = qkv[0, :q_end].copy()
    k = qkv[0, q_end:k_end].copy()
    v = qkv[0, k_end:].copy()
    if block[3].shape[0]:  # biases (Qwen2)
        q += block[3]
        k += block[4]
        v += block[5]
    att = decode_step(q.reshape(n_heads, head_dim), k.reshape(n_kv, head_dim),
                      v.reshape(n_kv, head_dim), cos, sin, cache_k, cache_v, position, True,
                      threads)  # [1, H hd]
    t0 = ticks()
    o = layer_gemv(block[6], att)  # [1, D]
    spent += ticks() - t0
    prefetch_rows(o, 0, o.size)
    x, h = add_rms_norm(x, o, block[1], eps)
    t0 = ticks()
    gate_up = group_gemv(block[7], h)  # [1, 2F]
    spent += ticks() - t0
    prefetch_rows(gate_up, 0, gate_up.size)
    act = silu_mul_row(gate_up, gate_up.shape[1] // 2)  # [1, F]
    t0 = ticks()
    f = layer_gemv(block[8], act)  # [1, D]
    clock[0] += spent + ticks() - t0
    prefetch_rows(f, 0, f.size)
    return x + f


@jit
def head_step(x, norm, eps, head, clock):
    """Final RMSNorm and the output head for one token.

    Parameters
    ----------
    x : np.ndarray
        ``[1, D]`` float32, the last block's output.
    norm : np.ndarray
        ``[D]`` float32, the final norm's gain.
    eps : float
        RMSNorm epsilon.
    head : NamedTuple
        :func:`~npsparse.kernels.step.step_args` of the output head.
    clock : np.ndarray
        ``[1]`` int64; the head product's cycles are added to it.

    Returns
    -------
    np.ndarray
        ``[1, V]`` float32 logits.
    """
    h = rms_norm_rows(x, norm, eps)
    t0 = ticks()
    logits = layer_gemv(head, h)
    clock[0] += ticks() - t0
    return logits
