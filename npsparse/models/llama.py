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
    """Every tensor a LLaMA-family checkpoint must have, with its shape.

    Parameters
    ----------
    cfg : ModelConfig
        A LLaMA-family configuration (Llama, Mistral, Qwen2).

    Returns
    -------
    dict of str -> tuple of int
        Hugging Face name -> ``(N, K)`` or ``(D,)``: ``embed_tokens`` ``(V, D)``, norms ``(D,)``,
        ``q_proj`` ``(H*hd, D)``, ``k_proj``/``v_proj`` ``(KV*hd, D)``, ``o_proj`` ``(D, H*hd)``,
        ``gate_proj``/``up_proj`` ``(F, D)``, ``down_proj`` ``(D, F)``; ``lm_head`` ``(V, D)``
        only without tied embeddings, q/k/v biases only with ``cfg.qkv_bias``.
    """
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
        """``[layer(h) for layer in names]``, as one stacked product when the arena built one.

        The stacked product (``self.fused[names]``, from :mod:`npsparse.arena`) is used only while
        the block still holds exactly the layers it was stacked from; otherwise each layer runs
        on its own.

        Parameters
        ----------
        names : tuple of str
            Names of linear layers that read the same input, e.g. :data:`QKV` or
            :data:`GATE_UP`.
        h : np.ndarray
            ``[T, K]`` float32, their common input.

        Returns
        -------
        list of np.ndarray
            One ``[T, N_i]`` float32 output per name, in order (column views of one array when
            stacked).
        """
        fused = self.fused.get(names)
        if fused is None or not fused.current([self.linears[n] for n in names]):
            return [self.linears[n](h) for n in names]
        y = fused.layer(h)  # [T, sum of rows]
        b = fused.bounds
        return [y[:, b[i]:b[i + 1]] for i in range(len(names))]

    def attention(self, h: np.ndarray, start: int, cache_k, cache_v) -> np.ndarray:
        """Self-attention: q/k/v projections (+ bias), RoPE, grouped-query attention, ``o_proj``.

        Parameters
        ----------
        h : np.ndarray
            ``[T, D]`` float32, the block input after ``input_layernorm``.
        start : int
            Position of the first token.
        cache_k, cache_v : np.ndarray or None
            This layer's ``[KV, capacity, hd]`` float32 cache; positions ``start .. start+T-1``
            are written. None attends over the new tokens only.

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32, before the residual is added.
        """
        cfg, lin = self.cfg, self.linears
        q, k, v = self.products(QKV, h)  # [T, H*hd], [T, KV*hd], [T, KV*hd]
        if cfg.qkv_bias:
            q, k, v = q + self.bias["q"], k + self.bias["k"], v + self.bias["v"]
        rope = self.rope(start, h.shape[0])  # cos, sin [T, hd]
        out = multi_head_attention(q, k, v, cfg.n_heads, cfg.n_kv_heads, start, cache_k, cache_v,
                                   rope)  # [T, H*hd]
        return lin["self_attn.o_proj"](out)  # [T, D]

    def mlp(self, h: np.ndarray) -> np.ndarray:
        """SwiGLU MLP: ``down_proj(silu(gate_proj(h)) * up_proj(h))``.

        Parameters
        ----------
        h : np.ndarray
            ``[T, D]`` float32, the residual stream after ``post_attention_layernorm``.

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32, before the residual is added (the ``[T, F]`` hidden activation
            is internal).
        """
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
        """The block's tensors under their names inside the block (``mlp.up_proj.weight`` ...).

        Returns
        -------
        dict of str -> np.ndarray
            float32 norm weights ``[D]``, every linear weight densified to ``[N, K]``, and the
            q/k/v biases ``[N]`` when the model has them.
        """
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
        """LLaMA-family checkpoints name block ``i`` ``model.layers.{i}``.

        Parameters
        ----------
        i : int
            Block index.

        Returns
        -------
        str
            The prefix, without a trailing dot.
        """
        return f"model.layers.{i}"

    def load_block(self, i: int) -> LlamaBlock:
        """Read block ``i``'s tensors (those of :attr:`shapes` under its prefix) and build it.

        The block shares the model's RoPE table.

        Parameters
        ----------
        i : int
            Block index.

        Returns
        -------
        LlamaBlock

        Raises
        ------
        NpsparseError
            A block tensor is missing, has the wrong shape, or holds NaN or infinite values.
        """
        prefix = self.block_prefix(i) + "."
        tensors = {name[len(prefix):]: self.weights.get_checked(name, shape)
                   for name, shape in self.shapes.items() if name.startswith(prefix)}
        return LlamaBlock(self.config, tensors, self.rope)

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Rows of ``embed_tokens``; positions enter later through RoPE, so ``start`` is unused.

        Parameters
        ----------
        ids : np.ndarray
            ``[T]`` int64 token ids.
        start : int
            Position of the first token (ignored).

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32, a writable copy even when the embeddings are memory-mapped.
        """
        return np.array(self.embed_tokens[ids], dtype=np.float32)  # [T, D]

    def final(self, x: np.ndarray) -> np.ndarray:
        """RMSNorm ``model.norm`` (compiled form for one token), then the output head.

        Parameters
        ----------
        x : np.ndarray
            ``[T, D]`` float32, the last block's output.

        Returns
        -------
        np.ndarray
            ``[T, V]`` float32 logits.
        """
        return self.head(_norm_for(x)(x, self.norm, self.config.norm_eps))  # [T, V]

    def outer_state(self) -> dict[str, np.ndarray]:
        """``model.embed_tokens`` and ``model.norm``, and ``lm_head`` unless embeddings are tied.

        Returns
        -------
        dict of str -> np.ndarray
            float32 ``model.embed_tokens.weight`` ``[V, D]``, ``model.norm.weight`` ``[D]``, and
            ``lm_head.weight`` ``[V, D]`` (dense) when ``config.tie_embeddings`` is false.
        """
        out = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not self.config.tie_embeddings:
            out["lm_head.weight"] = self.head.to_dense()
        return out
