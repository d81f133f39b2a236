"""GPT-2: LayerNorm, learned positions, fused q/k/v projection, GELU MLP, tied output head.

Shapes: T tokens, D model dim, H heads, F FFN dim, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig, check_activation
from ..linear import DenseLinear, as_linear
from .base import CausalLM
from .layers import ACTIVATIONS, layer_norm, multi_head_attention

# Block tensors: name -> shape as the checkpoint stores it. GPT-2 uses Conv1D layers whose weight
# is [in, out], the transpose of nn.Linear's [out, in] (transformers' pytorch_utils.Conv1D).
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _block_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f = cfg.dim, cfg.ffn_dim
    return {
        "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
        "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,),
    }


def expected_shapes(cfg: ModelConfig, prefix: str = "transformer.") -> dict[str, tuple]:
    """Every tensor a GPT-2 checkpoint must have, with its shape (Conv1D weights as [in, out]).

    Parameters
    ----------
    cfg : ModelConfig
        A GPT-2 configuration.
    prefix : str
        Prefix of every name: ``"transformer."`` (Hugging Face) or ``""`` (the original OpenAI
        conversion).

    Returns
    -------
    dict of str -> tuple of int
        Name -> stored shape: ``wte`` ``(V, D)``, ``wpe`` ``(max_position, D)``, ``ln_f`` and
        per block ``ln_1``/``ln_2`` ``(D,)``, ``c_attn`` ``(D, 3D)``, ``attn.c_proj`` ``(D, D)``,
        ``c_fc`` ``(D, F)``, ``mlp.c_proj`` ``(F, D)`` and their biases. ``lm_head`` is
        not required: GPT-2 ties the head to ``wte``.
    """
    d = cfg.dim
    out = {prefix + "wte.weight": (cfg.vocab_size, d), prefix + "wpe.weight": (cfg.max_position, d),
           prefix + "ln_f.weight": (d,), prefix + "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        out.update({f"{prefix}h.{i}.{k}": s for k, s in _block_shapes(cfg).items()})
    return out


class GPT2Block:
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    input_groups = tuple((name,) for name in _CONV1D)

    def __init__(self, cfg: ModelConfig, tensors: dict):
        self.cfg = cfg
        self.norms = {k: tensors[k]
                      for k in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")}
        # Conv1D stores [in, out]; the seam wants [out, in], so transpose once here.
        self.linears = {name: as_linear(tensors[name + ".weight"], transpose=True)
                        for name in _CONV1D}
        self.bias = {name: tensors[name + ".bias"] for name in _CONV1D}
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x: np.ndarray, start: int, cache_k=None, cache_v=None) -> np.ndarray:
        cfg, lin, bias, n = self.cfg, self.linears, self.bias, self.norms
        h = layer_norm(x, n["ln_1.weight"], n["ln_1.bias"], cfg.norm_eps)  # [T, D]
        qkv = lin["attn.c_attn"](h) + bias["attn.c_attn"]  # [T, 3D]
        q, k, v = np.split(qkv, 3, axis=1)  # each [T, D]
        att = multi_head_attention(q, k, v, cfg.n_heads, cfg.n_heads, start, cache_k, cache_v)
        x = x + lin["attn.c_proj"](att) + bias["attn.c_proj"]  # [T, D]
        h = layer_norm(x, n["ln_2.weight"], n["ln_2.bias"], cfg.norm_eps)
        h = self.act(lin["mlp.c_fc"](h) + bias["mlp.c_fc"])  # [T, F]
        return x + lin["mlp.c_proj"](h) + bias["mlp.c_proj"]  # [T, D]

    def state(self) -> dict:
        """The block's tensors under their names inside the block, as the checkpoint stores them.

        Returns
        -------
        dict of str -> np.ndarray
            float32 ``ln_1``/``ln_2`` weights and biases ``[D]``; every Conv1D weight densified and
            transposed back to the stored ``[K, N]`` (``c_attn`` ``[D, 3D]``, ``c_fc``
            ``[D, F]`` ...), and its bias ``[N]``.
        """
        out = dict(self.norms)
        for name in _CONV1D:
            out[name + ".weight"] = np.ascontiguousarray(self.linears[name].to_dense().T)
            out[name + ".bias"] = self.bias[name]
        return out


class GPT2Model(CausalLM):
    """GPT-2 over Hugging Face weights (with or without the ``transformer.`` prefix).

    Parameters
    ----------
    config : ModelConfig
    weights : Weights
    """

    learned_positions = True

    def __init__(self, config: ModelConfig, weights, load_blocks: bool = True):
        self.config = config
        self.weights = weights
        # Checkpoints from the original OpenAI conversion name tensors without "transformer.".
        self.prefix = "transformer." if "transformer.wte.weight" in weights else ""
        p, d = self.prefix, config.dim
        get = weights.get_checked
        self.wte = get(p + "wte.weight", (config.vocab_size, d))  # [V, D]
        self.wpe = get(p + "wpe.weight", (config.max_position, d))  # [P, D]
        self.ln_f = (get(p + "ln_f.weight", (d,)), get(p + "ln_f.bias", (d,)))
        self.blocks = [self.load_block(i) for i in range(config.n_layers)] if load_blocks else []
        self.tied = config.tie_embeddings or "lm_head.weight" not in weights
        if self.tied:
            self.head = DenseLinear(self.wte)
        else:
            self.head = as_linear(get("lm_head.weight", (config.vocab_size, d)))

    def block_prefix(self, i: int) -> str:
        """GPT-2 names block ``i`` ``transformer.h.{i}`` (``h.{i}`` without the prefix)."""
        return f"{self.prefix}h.{i}"

    def load_block(self, i: int) -> GPT2Block:
        """Read block ``i``'s twelve tensors and build it (Conv1D weights are transposed once)."""
        get, prefix = self.weights.get_checked, self.block_prefix(i)
        return GPT2Block(self.config, {k: get(f"{prefix}.{k}", shape)
                                       for k, shape in _block_shapes(self.config).items()})

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Token embeddings plus learned position embeddings of positions ``start .. start+T-1``."""
        return self.wte[ids] + self.wpe[start:start + len(ids)]  # [T, D]

    def final(self, x: np.ndarray) -> np.ndarray:
        """LayerNorm ``ln_f``, then the head (tied to ``wte`` unless ``lm_head`` is stored)."""
        return self.head(layer_norm(x, *self.ln_f, self.config.norm_eps))  # [T, V]

    def outer_state(self) -> dict[str, np.ndarray]:
        """``wte``, ``wpe`` and ``ln_f`` under the checkpoint's prefix; ``lm_head`` if untied.

        Returns
        -------
        dict of str -> np.ndarray
            float32 ``wte.weight`` ``[V, D]``, ``wpe.weight`` ``[max_position, D]``,
            ``ln_f.weight``/``ln_f.bias`` ``[D]``, and ``lm_head.weight`` ``[V, D]`` only when the
            head is not tied to ``wte``.
        """
        p = self.prefix
        out = {p + "wte.weight": self.wte, p + "wpe.weight": self.wpe,
               p + "ln_f.weight": self.ln_f[0], p + "ln_f.bias": self.ln_f[1]}
        if not self.tied:
            out["lm_head.weight"] = self.head.to_dense()
        return out


# -- the Hugging Face config.json mapping (see npsparse.architectures) ---------------------------

FAMILY = "gpt2"
Model = GPT2Model


def config_from_hf(hf: dict, model_type: str) -> dict:
    """The :class:`~npsparse.config.ModelConfig` fields a GPT-2 ``config.json`` sets.

    Parameters
    ----------
    hf : dict
        The parsed ``config.json``.
    model_type : str
        ``"gpt2"``.

    Returns
    -------
    dict
        Field name -> value (vocabulary size and special token ids are read by
        :meth:`ModelConfig.from_hf` itself).
    """
    dim = hf["n_embd"]
    n_heads = hf["n_head"]
    return dict(
        dim=dim,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        ffn_dim=hf.get("n_inner") or 4 * dim,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        max_position=hf.get("n_positions", 1024),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        activation=check_activation(hf.get("activation_function", "gelu_new"),
                                    ("gelu_new", "gelu", "relu")),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The GPT-2 keys of ``config.json`` for ``cfg`` (the inverse of :func:`config_from_hf`).

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_dim,
        "n_positions": cfg.max_position,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": cfg.activation,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
