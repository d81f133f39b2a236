"""One-token decode of a LLaMA-family block: the body of :class:`~.llama.LlamaBlock`, fewer calls.

At one token every NumPy call costs more than its arithmetic, so decode runs the block's steps
in compiled pieces (:mod:`npsparse.kernels.rowops`, :func:`~npsparse.kernels.attention.decode_step`)
and computes same-input layers (q/k/v, gate/up) as one stacked product when
:mod:`npsparse.arena` built one. The arithmetic is the body's; sums run in another order, so
results agree with it to float32 rounding (tested in ``tests/test_attention.py``), not bit for bit.
A block with another attention (``block.attention``, SPT's top-L) runs the same steps around it;
its RoPE and cache append are the body's (tested in ``tests/test_topk_cache.py``).
:meth:`~npsparse.models.base.CausalLM.forward` chooses this path once per call: one new token
with a cache.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels.attention import decode_step
from ..kernels.rowops import add_rms_norm, rms_norm_rows, silu_mul
from .layers import append_to_cache, apply_rope, split_heads

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def products(block, names: tuple[str, ...], h: np.ndarray) -> list[np.ndarray]:
    """``[block.linears[n](h) for n in names]``, as one stacked product when the arena built one.

    The stacked layer (``block.fused[names]``) is used only while the block still holds exactly
    the layers it was stacked from; otherwise each layer runs on its own.

    Parameters
    ----------
    block : LlamaBlock
    names : tuple of str
        Layers that read the same input (:data:`QKV` or :data:`GATE_UP`).
    h : np.ndarray
        ``[T, K]`` float32, their common input.

    Returns
    -------
    list of np.ndarray
        One ``[T, N_i]`` float32 output per name (column views of one array when stacked).
    """
    fused = block.fused.get(names)
    if fused is None or not fused.current([block.linears[n] for n in names]):
        return [block.linears[n](h) for n in names]
    y = fused.layer(h)  # [T, sum of rows]
    b = fused.bounds
    return [y[:, b[i]:b[i + 1]] for i in range(len(names))]


def decode_block(block, x: np.ndarray, start: int, cache_k: np.ndarray,
                 cache_v: np.ndarray) -> np.ndarray:
    """One token through ``block``, appending its key and value to the cache at ``start``.

    Parameters
    ----------
    block : LlamaBlock
    x : np.ndarray
        ``[1, D]`` float32 residual stream.
    start : int
        The token's position.
    cache_k, cache_v : np.ndarray
        This layer's ``[KV, capacity, hd]`` float32 cache.

    Returns
    -------
    np.ndarray
        ``[1, D]`` float32.
    """
    cfg, eps = block.cfg, block.cfg.norm_eps
    hd = cfg.head_dim
    h = rms_norm_rows(x, block.attn_norm, eps)  # [1, D]
    q, k, v = products(block, QKV, h)  # [1, H*hd], [1, KV*hd], [1, KV*hd]
    if cfg.qkv_bias:
        q, k, v = q + block.bias["q"], k + block.bias["k"], v + block.bias["v"]
    cos, sin = block.rope(start, 1)  # [1, hd]
    if block.attention is not None:  # SPT's top-L attention
        att = _other_attention(block, q, k, v, cos, sin, start, cache_k, cache_v)  # [1, H*hd]
    else:
        att = decode_step(q.reshape(cfg.n_heads, hd), k.reshape(cfg.n_kv_heads, hd),
                          v.reshape(cfg.n_kv_heads, hd), cos[0], sin[0], cache_k, cache_v, start,
                          True, numba.config.NUMBA_NUM_THREADS)  # [1, H*hd]
    x, h = add_rms_norm(x, block.linears["self_attn.o_proj"](att), block.mlp_norm, eps)
    if block.ffn_router is not None:  # routed FFN: rows of the A chosen blocks only
        f = block.ffn_router(h, block.linears)  # [1, D]
    else:
        gate, up = products(block, GATE_UP, h)  # [1, F] each
        f = block.linears["mlp.down_proj"](silu_mul(gate, up))  # [1, D]
    if block.moe is not None:  # PESC: the router, then only the k chosen experts' adapters
        f = block.moe(h, f)  # [1, D]
    return x + f  # [1, D]


def _other_attention(block, q, k, v, cos, sin, start, cache_k, cache_v):
    """One token's RoPE and cache append as the body does them, then ``block.attention``.

    q [1, H*hd], k/v [1, KV*hd] projections; cos/sin [1, hd]; cache_k/cache_v
    [KV, capacity, hd], written at ``start``. Returns [1, H*hd].
    """
    cfg = block.cfg
    q = apply_rope(split_heads(q, cfg.n_heads), cos, sin)  # [H, 1, hd]
    k = apply_rope(split_heads(k, cfg.n_kv_heads), cos, sin)  # [KV, 1, hd]
    k, v = append_to_cache(cache_k, cache_v, k, split_heads(v, cfg.n_kv_heads),
                           start)  # [KV, S, hd]
    return block.attention(q, k, v, start)  # [1, H*hd]


def decode_final(model, x: np.ndarray) -> np.ndarray:
    """Final RMSNorm (one compiled call) and the output head for one token.

    Parameters
    ----------
    model : LlamaModel
    x : np.ndarray
        ``[1, D]`` float32, the last block's output.

    Returns
    -------
    np.ndarray
        ``[1, V]`` float32 logits.
    """
    return model.head(rms_norm_rows(x, model.norm, model.config.norm_eps))  # [1, V]
