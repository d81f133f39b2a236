"""The LLaMA-family forward pass (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA, SwiGLU.

Read top to bottom: one decoder block, then the model. Shapes: T tokens, D model dim, H query heads,
KV key/value heads, hd head dim, F FFN dim, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..kernels.rowops import add_rms_norm, rms_norm_rows, silu_mul
from ..linear import DenseLinear, as_linear
from .base import CausalLM
from .layers import RopeTables, multi_head_attention, rms_norm, rope_inv_freq, silu

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linear layers that read the same input (calibration statistics are collected once per group).
INPUT_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every tensor a LLaMA-family checkpoint must have, with its shape."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    q_rows, kv_rows = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_rows, d),
            p + "self_attn.k_proj.weight": (kv_rows, d),
            p + "self_attn.v_proj.weight": (kv_rows, d),
            p + "self_attn.o_proj.weight": (d, q_rows),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
        if cfg.qkv_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (q_rows,),
                p + "self_attn.k_proj.bias": (kv_rows,),
                p + "self_attn.v_proj.bias": (kv_rows,),
            })
    return shapes


def _norm_for(x: np.ndarray):
    """RMSNorm for ``x``: the compiled one-call form for a single token (decode), else NumPy's."""
    return rms_norm_rows if x.shape[0] == 1 else rms_norm


class LlamaBlock:
    """One decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    input_groups = INPUT_GROUPS
    fusable_groups = (QKV, GATE_UP)  # stacked into one product each by npsparse.arena

    def __init__(self, cfg: ModelConfig, tensors: dict, rope: RopeTables):
        self.cfg = cfg
        self.fused = {}  # group names -> npsparse.arena.Fused, filled by consolidate()
        self.rope = rope  # cos/sin by position, shared by all blocks
        self.attn_norm = tensors["input_layernorm.weight"]  # [D]
        self.mlp_norm = tensors["post_attention_layernorm.weight"]  # [D]
        self.linears = {name: as_linear(tensors[name + ".weight"]) for name in LINEAR_NAMES}
        self.bias = {name: tensors.get(f"self_attn.{name}_proj.bias") for name in "qkv"}

    def products(self, names: tuple[str, ...], h: np.ndarray) -> list[np.ndarray]:
        """``[layer(h) for layer in names]``, as one stacked product when the arena built one."""
        fused = self.fused.get(names)
        if fused is None or not fused.current([self.linears[n] for n in names]):
            return [self.linears[n](h) for n in names]
        y = fused.layer(h)  # [T, sum of rows]
        b = fused.bounds
        return [y[:, b[i]:b[i + 1]] for i in range(len(names))]

    def attention(self, h: np.ndarray, start: int, cache_k, cache_v) -> np.ndarray:
        cfg, lin = self.cfg, self.linears
        q, k, v = self.products(QKV, h)  # [T, H*hd], [T, KV*hd], [T, KV*hd]
        if cfg.qkv_bias:
            q, k, v = q + self.bias["q"], k + self.bias["k"], v + self.bias["v"]
        rope = self.rope(start, h.shape[0])  # cos, sin [T, hd]
        out = multi_head_attention(q, k, v, cfg.n_heads, cfg.n_kv_heads, start, cache_k, cache_v,
                                   rope)  # [T, H*hd]
        return lin["self_attn.o_proj"](out)  # [T, D]

    def mlp(self, h: np.ndarray) -> np.ndarray:
        gate, up = self.products(GATE_UP, h)  # [T, F] each
        act = silu_mul(gate, up) if h.shape[0] == 1 else silu(gate) * up  # one token: in place
        return self.linears["mlp.down_proj"](act)  # [T, D]

    def __call__(self, x: np.ndarray, start: int, cache_k=None, cache_v=None) -> np.ndarray:
        eps = self.cfg.norm_eps
        if x.shape[0] == 1:  # decode: the same steps, fewer calls (npsparse.kernels.rowops)
            attn = self.attention(rms_norm_rows(x, self.attn_norm, eps), start, cache_k, cache_v)
            x, h = add_rms_norm(x, attn, self.mlp_norm, eps)
            return x + self.mlp(h)  # [1, D]
        x = x + self.attention(rms_norm(x, self.attn_norm, eps), start, cache_k, cache_v)
        return x + self.mlp(rms_norm(x, self.mlp_norm, eps))  # [T, D]

    def state(self) -> dict:
        out = {"input_layernorm.weight": self.attn_norm,
               "post_attention_layernorm.weight": self.mlp_norm}
        out.update({name + ".weight": layer.to_dense() for name, layer in self.linears.items()})
        out.update({f"self_attn.{k}_proj.bias": b for k, b in self.bias.items() if b is not None})
        return out


class LlamaModel(CausalLM):
    """A LLaMA-family causal language model over a flat mapping of float32 weights.

    Parameters
    ----------
    config : ModelConfig
    weights : Mapping of str -> np.ndarray
        Hugging Face names (``model.layers.{i}.self_attn.q_proj.weight`` ...), checked against
        :func:`expected_shapes`. A :class:`~npsparse.io.Weights` is read tensor by tensor.
    """

    def __init__(self, config: ModelConfig, weights, load_blocks: bool = True):
        self.config = config
        self.weights = weights
        self.shapes = expected_shapes(config)
        get = weights.get_checked
        embed_shape = self.shapes["model.embed_tokens.weight"]
        self.embed_tokens = get("model.embed_tokens.weight", embed_shape)
        self.norm = get("model.norm.weight", (config.dim,))
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.rope = RopeTables(self.inv_freq)
        self.blocks = [self.load_block(i) for i in range(config.n_layers)] if load_blocks else []
        if config.tie_embeddings:  # the head reuses the embedding matrix [V, D]
            self.head = DenseLinear(self.embed_tokens)
        else:
            self.head = as_linear(get("lm_head.weight", self.shapes["lm_head.weight"]))

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def load_block(self, i: int) -> LlamaBlock:
        prefix = self.block_prefix(i) + "."
        tensors = {name[len(prefix):]: self.weights.get_checked(name, shape)
                   for name, shape in self.shapes.items() if name.startswith(prefix)}
        return LlamaBlock(self.config, tensors, self.rope)

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        return np.array(self.embed_tokens[ids], dtype=np.float32)  # [T, D]

    def final(self, x: np.ndarray) -> np.ndarray:
        return self.head(_norm_for(x)(x, self.norm, self.config.norm_eps))  # [T, V]

    def outer_state(self) -> dict[str, np.ndarray]:
        out = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not self.config.tie_embeddings:
            out["lm_head.weight"] = self.head.to_dense()
        return out
