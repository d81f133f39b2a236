"""The LLaMA-family forward pass (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA, SwiGLU.

Read top to bottom: one decoder block, then the model. Shapes: T tokens, D model dim, H query heads,
KV key/value heads, hd head dim, F FFN dim, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig, PescConfig, RoutedFfnConfig, check_activation
from ..errors import NpsparseError
from ..linear import DenseLinear, as_linear
from ..ffn_routing import check_blocks
from ..routing import check_routing
from .backward import attention_backward, rms_norm_backward, rope_backward, swiglu_backward
from .base import CausalLM
from .layers import (RopeTables, append_to_cache, apply_rope, attend, attention_probs, merge_heads,
                     rms_norm, rope_inv_freq, silu, split_heads)
from .llama_decode import decode_block, decode_final
from .llama_token import decode_token
from .pesc import PescExperts, pesc_shapes
from .routed_ffn import BlockRouter, routed_shapes

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
        only without tied embeddings, q/k/v biases only with ``cfg.qkv_bias``; with
        ``cfg.pesc`` each block's router and adapters (:func:`.pesc.pesc_shapes`), with
        ``cfg.routed_ffn`` each block's FFN router (:func:`.routed_ffn.routed_shapes`).
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
        shapes.update({p + name: shape for name, shape in pesc_shapes(cfg).items()})
        shapes.update({p + name: shape for name, shape in routed_shapes(cfg).items()})
    return shapes


class LlamaBlock:
    """One decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    ``__call__`` is the block's one readable body: prefill, perplexity, calibration and training
    all run it (one-token decode runs the same steps in fewer, compiled calls:
    :mod:`.llama_decode`). Given a ``tape`` dict it keeps what :meth:`backward` needs.
    """

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
        self.moe = PescExperts(tensors, cfg) if cfg.pesc is not None else None  # PESC experts
        # SPT: only the router's top-A blocks of FFN units run per token
        self.ffn_router = BlockRouter(tensors, cfg) if cfg.routed_ffn is not None else None
        # SPT: None = exact attention; else a callable (q, k, v, start) -> [T, H*hd], e.g.
        # npsparse.sparse_attention.TopkAttention (set by use_topk_attention)
        self.attention = None

    def _project(self, name: str, h: np.ndarray) -> np.ndarray:
        """``h @ W.T (+ b)`` for ``q``, ``k`` or ``v``: [T, D] -> [T, heads*hd]."""
        y = self.linears[f"self_attn.{name}_proj"](h)
        return y if self.bias[name] is None else y + self.bias[name]

    def __call__(self, x: np.ndarray, start: int = 0, cache_k=None, cache_v=None,
                 tape: dict | None = None) -> np.ndarray:
        """The block on ``x [T, D]`` (positions ``start ..``); returns ``[T, D]``.

        Parameters
        ----------
        x : np.ndarray
            ``[T, D]`` residual stream (float32; float64 works too, for gradient checks).
        start : int
            Position of the first token.
        cache_k, cache_v : np.ndarray or None
            This layer's ``[KV, capacity, hd]`` cache; positions ``start .. start+T-1`` are
            written and every cached position is attended to. None: the new tokens only.
        tape : dict, optional
            Filled with the intermediate arrays :meth:`backward` reads.

        Returns
        -------
        np.ndarray
            ``[T, D]``, the block's output.
        """
        cfg, lin, eps = self.cfg, self.linears, self.cfg.norm_eps
        cos, sin = self.rope(start, x.shape[0])  # [T, hd]
        # attention
        h_attn = rms_norm(x, self.attn_norm, eps)  # [T, D]
        q = split_heads(self._project("q", h_attn), cfg.n_heads)  # [H, T, hd]
        k = split_heads(self._project("k", h_attn), cfg.n_kv_heads)  # [KV, T, hd]
        v = split_heads(self._project("v", h_attn), cfg.n_kv_heads)  # [KV, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:
            k, v = append_to_cache(cache_k, cache_v, k, v, start)  # [KV, S, hd]
        if self.attention is None:
            probs = attention_probs(q, k, start)  # [KV, g*T, S]
            att = attend(probs, v, cfg.n_heads)  # [T, H*hd]
        else:  # SPT: each query reads only its top-L keys (no probs to keep for backward)
            probs = None
            att = self.attention(q, k, v, start)  # [T, H*hd]
        x_mid = x + lin["self_attn.o_proj"](att)  # [T, D]
        # SwiGLU MLP
        h_mlp = rms_norm(x_mid, self.mlp_norm, eps)  # [T, D]
        gate = up = act = ffn_tape = None
        if self.ffn_router is not None:  # routed FFN: the chosen blocks of units only
            ffn_tape = {} if tape is not None else None
            f = self.ffn_router(h_mlp, lin, ffn_tape)  # [T, D]
        else:
            gate = lin["mlp.gate_proj"](h_mlp)  # [T, F]
            up = lin["mlp.up_proj"](h_mlp)  # [T, F]
            act = silu(gate) * up  # [T, F]
            f = lin["mlp.down_proj"](act)  # [T, D]
        if self.moe is not None:  # PESC: the router reads h_mlp, the chosen adapters read f
            moe_tape = {} if tape is not None else None
            f = self.moe(h_mlp, f, moe_tape)  # [T, D]
        out = x_mid + f  # [T, D]
        if tape is not None:
            tape.update(x=x, h_attn=h_attn, cos=cos, sin=sin, q=q, k=k, v=v, probs=probs,
                        att=att, x_mid=x_mid, h_mlp=h_mlp, gate=gate, up=up, act=act)
            if self.moe is not None:
                tape["moe"] = moe_tape
            if self.ffn_router is not None:
                tape["routed_ffn"] = ffn_tape
        return out

    def backward(self, d_out: np.ndarray, tape: dict, trainable=None,
                 d_logits: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Gradients through the block, the forward's steps in reverse.

        Parameters
        ----------
        d_out : np.ndarray
            ``[T, D]``, the loss's gradient with respect to the block's output.
        tape : dict
            What ``__call__(x, tape=tape)`` kept (no cache: training attends within the window).
        trainable : container of str, optional
            Names (inside the block, e.g. ``mlp.up_proj.weight``) whose gradients are wanted;
            None: all. Input gradients are always computed.
        d_logits : np.ndarray, optional
            ``[T, E]`` gradient of other loss terms (the balance loss) with respect to the
            router logits of a PESC block or a routed FFN (``[T, B]``).

        Returns
        -------
        (np.ndarray, dict)
            ``d_x [T, D]`` and the parameter gradients by name, of the parameters' shapes.
            A linear weight's gradient is the dense ``dY^T X``; masking it is the optimizer's.
            A trainable packed layer (Monarch) gives its own arrays' gradients instead, named
            ``mlp.up_proj.weight::right`` as :meth:`parameters` names the arrays.
        """
        cfg, lin, eps, t = self.cfg, self.linears, self.cfg.norm_eps, tape
        want = (lambda name: True) if trainable is None else trainable.__contains__
        grads = {}

        def linear(name: str, d_y: np.ndarray, x: np.ndarray) -> np.ndarray:
            layer = lin[name]
            if getattr(layer, "TRAINABLE", False):  # Monarch: the factors' gradients, no [N, K]
                d_x, layer_grads = layer.backward(d_y, x)  # [T, K], by array name
                for key, grad in layer_grads.items():
                    if want(f"{name}.weight::{key}"):
                        grads[f"{name}.weight::{key}"] = grad
                return d_x
            if want(name + ".weight"):
                grads[name + ".weight"] = d_y.T @ x  # [N, K]
            return d_y @ layer.to_dense()  # [T, K]

        def norm(name: str, d_y: np.ndarray, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
            d_x, d_w = rms_norm_backward(d_y, x, weight, eps)
            if want(name):
                grads[name] = d_w
            return d_x

        # out = x_mid + f, f = down(act) (PESC: f = moe(h_mlp, down(act))); act = silu(gate) * up
        d_f, d_h_router = d_out, None
        if self.moe is not None:
            d_h_router, d_f, moe_grads = self.moe.backward(d_out, t["moe"], d_logits)
            grads.update({name: grad for name, grad in moe_grads.items() if want(name)})
        if self.ffn_router is not None:  # routed FFN: its blocks' and router's gradients
            d_h_mlp, ffn_grads = self.ffn_router.backward(d_f, t["routed_ffn"],
                                                         d_logits)  # [T, D]
            grads.update({name: grad for name, grad in ffn_grads.items() if want(name)})
        else:
            d_act = linear("mlp.down_proj", d_f, t["act"])  # [T, F]
            d_gate, d_up = swiglu_backward(d_act, t["gate"], t["up"])  # [T, F] each
            d_h_mlp = (linear("mlp.gate_proj", d_gate, t["h_mlp"])
                       + linear("mlp.up_proj", d_up, t["h_mlp"]))  # [T, D]
        if d_h_router is not None:
            d_h_mlp += d_h_router
        d_x_mid = d_out + norm("post_attention_layernorm.weight", d_h_mlp, t["x_mid"],
                               self.mlp_norm)  # [T, D]
        # x_mid = x + o_proj(att); att = attention(rope(q), rope(k), v)
        if t["probs"] is None:
            raise NpsparseError("top-L sparse attention has no backward; train with exact "
                                "attention")
        d_att = linear("self_attn.o_proj", d_x_mid, t["att"])  # [T, H*hd]
        d_q, d_k, d_v = attention_backward(split_heads(d_att, cfg.n_heads), t["q"], t["k"],
                                           t["v"], t["probs"])  # [H, T, hd], [KV, T, hd] x2
        d_q = rope_backward(d_q, t["cos"], t["sin"])
        d_k = rope_backward(d_k, t["cos"], t["sin"])
        d_h_attn = 0
        for name, d_heads in (("q", d_q), ("k", d_k), ("v", d_v)):
            d_y = merge_heads(d_heads)  # [T, heads*hd]
            if self.bias[name] is not None and want(f"self_attn.{name}_proj.bias"):
                grads[f"self_attn.{name}_proj.bias"] = d_y.sum(axis=0)
            d_h_attn = d_h_attn + linear(f"self_attn.{name}_proj", d_y, t["h_attn"])  # [T, D]
        d_x = d_x_mid + norm("input_layernorm.weight", d_h_attn, t["x"], self.attn_norm)
        return d_x, grads

    def parameters(self) -> dict:
        """The block's own arrays by name inside the block (linears dense or trainable packed).

        Returns
        -------
        dict of str -> np.ndarray
            The live arrays (not copies): norm gains ``[D]``, linear weights ``[N, K]``, biases;
            a trainable packed layer's arrays under ``NAME.weight::ARRAY``, as a packed folder
            names them (Monarch: ``mlp.up_proj.weight::right`` ``[b, q, p]`` and ``::left``).
        """
        out = {"input_layernorm.weight": self.attn_norm,
               "post_attention_layernorm.weight": self.mlp_norm}
        for name, layer in self.linears.items():
            if isinstance(layer, DenseLinear):
                out[name + ".weight"] = layer.weight
            elif getattr(layer, "TRAINABLE", False):
                out.update({f"{name}.weight::{key}": array
                            for key, array in layer.parameters().items()})
            else:
                raise NpsparseError(f"{name} is packed ({type(layer).__name__}); training needs "
                                    "the unpacked model")
        out.update({f"self_attn.{k}_proj.bias": b for k, b in self.bias.items() if b is not None})
        if self.moe is not None:
            out.update(self.moe.parameters())
        if self.ffn_router is not None:
            out.update(self.ffn_router.parameters())
        return out

    def state(self) -> dict:
        """The block's tensors under their names inside the block (``mlp.up_proj.weight`` ...).

        Returns
        -------
        dict of str -> np.ndarray
            float32 norm weights ``[D]``, every linear weight densified to ``[N, K]``, the
            q/k/v biases ``[N]`` when the model has them, and a PESC block's router and adapters.
        """
        out = {"input_layernorm.weight": self.attn_norm,
               "post_attention_layernorm.weight": self.mlp_norm}
        out.update({name + ".weight": layer.to_dense() for name, layer in self.linears.items()})
        out.update({f"self_attn.{k}_proj.bias": b for k, b in self.bias.items() if b is not None})
        if self.moe is not None:
            out.update(self.moe.parameters())
        if self.ffn_router is not None:
            out.update(self.ffn_router.parameters())
        return out


class LlamaModel(CausalLM):
    """A LLaMA-family causal language model over a flat mapping of float32 weights.

    One-token steps with a cache run :mod:`.llama_decode` (``decode_block``, ``decode_final``),
    the same arithmetic in compiled calls; everything else runs :class:`LlamaBlock`'s body.

    Parameters
    ----------
    config : ModelConfig
    weights : Mapping of str -> np.ndarray
        Hugging Face names (``model.layers.{i}.self_attn.q_proj.weight`` ...), checked against
        :func:`expected_shapes`. A :class:`~npsparse.io.Weights` is read tensor by tensor.
    """

    decode_block = staticmethod(decode_block)
    decode_final = staticmethod(decode_final)
    decode_token = staticmethod(decode_token)
    token_step = True  # False: one-token steps run decode_block per block (see .llama_token)

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
        """LLaMA-family checkpoints name block ``i`` ``model.layers.{i}``."""
        return f"model.layers.{i}"

    def load_block(self, i: int) -> LlamaBlock:
        """Read block ``i``'s tensors (those of :attr:`shapes` under its prefix) and build it.

        The block shares the model's RoPE table.
        """
        prefix = self.block_prefix(i) + "."
        tensors = {name[len(prefix):]: self.weights.get_checked(name, shape)
                   for name, shape in self.shapes.items() if name.startswith(prefix)}
        return LlamaBlock(self.config, tensors, self.rope)

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Rows of ``embed_tokens``; positions enter later through RoPE, so ``start`` is unused."""
        return np.array(self.embed_tokens[ids], dtype=self.embed_tokens.dtype)  # [T, D]

    def final(self, x: np.ndarray) -> np.ndarray:
        """RMSNorm ``model.norm``, then the output head."""
        return self.head(rms_norm(x, self.norm, self.config.norm_eps))  # [T, V]

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


# -- the Hugging Face config.json mapping (see npsparse.architectures) ---------------------------

FAMILY = "llama"
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: dict, model_type: str) -> dict:
    """The :class:`~npsparse.config.ModelConfig` fields a LLaMA-family ``config.json`` sets.

    Parameters
    ----------
    hf : dict
        The parsed ``config.json``.
    model_type : str
        ``"llama"``, ``"mistral"`` or ``"qwen2"``.

    Returns
    -------
    dict
        Field name -> value (the vocabulary size and special token ids are read by
        :meth:`ModelConfig.from_hf` itself).
    """
    n_heads = hf["num_attention_heads"]
    dim = hf["hidden_size"]
    # transformers >= 5 writes "rope_parameters" (theta and scaling together); older
    # configs have top-level "rope_theta" and "rope_scaling".
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return dict(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=_freeze_scaling(scaling),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama/Mistral may declare attention_bias.
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        activation=check_activation(hf.get("hidden_act", "silu"), ("silu",)),
        pesc=_pesc_from_hf(hf.get("npsparse_pesc")),
        routed_ffn=_routed_ffn_from_hf(hf.get("npsparse_routed_ffn"), hf["intermediate_size"]),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The LLaMA-family keys of ``config.json`` for ``cfg`` (the inverse of :func:`config_from_hf`).

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict
    """
    out = {
        "architectures": [_HF_CLASSES[cfg.arch]],
        "model_type": cfg.arch,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": cfg.activation,
    }
    if cfg.arch == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = False
    if cfg.pesc is not None:  # npsparse's own key: transformers ignores it (and the experts)
        out["npsparse_pesc"] = dict(experts=cfg.pesc.experts, top_k=cfg.pesc.top_k,
                                    adapter_dim=cfg.pesc.adapter_dim, scale=cfg.pesc.scale)
    if cfg.routed_ffn is not None:  # npsparse's own key, as npsparse_pesc
        out["npsparse_routed_ffn"] = dict(blocks=cfg.routed_ffn.blocks,
                                          active=cfg.routed_ffn.active)
    return out


def _routed_ffn_from_hf(entry: dict | None, ffn_dim: int) -> RoutedFfnConfig | None:
    """``config.json``'s ``npsparse_routed_ffn`` (written by ``finetune --method routed-ffn``)."""
    if entry is None:
        return None
    try:
        routed = RoutedFfnConfig(int(entry["blocks"]), int(entry["active"]))
    except (KeyError, TypeError, ValueError) as err:
        raise NpsparseError(f"npsparse_routed_ffn in config.json is malformed ({err!r})") from None
    check_blocks(ffn_dim, routed.blocks, routed.active)
    return routed


def _pesc_from_hf(entry: dict | None) -> PescConfig | None:
    """``config.json``'s ``npsparse_pesc`` (written by ``finetune --method pesc``), checked."""
    if entry is None:
        return None
    try:
        pesc = PescConfig(int(entry["experts"]), int(entry["top_k"]), int(entry["adapter_dim"]),
                          float(entry.get("scale", PescConfig.scale)))
    except (KeyError, TypeError, ValueError) as err:
        raise NpsparseError(f"npsparse_pesc in config.json is malformed ({err!r})") from None
    check_routing(pesc.experts, pesc.top_k, pesc.adapter_dim)
    return pesc


def _freeze_scaling(scaling: dict | None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if kind not in ("linear", "llama3"):
        raise NpsparseError(
            f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)"
        )
    return tuple(sorted(scaling.items()))


Model = LlamaModel
