"""OPT: LayerNorm (pre- or post-), learned positions offset by 2, ReLU MLP, optional projections.

Shapes: T tokens, D model dim, E word-embedding dim (``word_embed_proj_dim``), F FFN dim,
V vocabulary.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig, check_activation
from ..errors import NpsparseError
from ..linear import as_linear
from .base import CausalLM
from .layers import ACTIVATIONS, layer_norm, multi_head_attention

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "fc1", "fc2")
_NORMS = ("self_attn_layer_norm", "final_layer_norm")

# OPT's learned position table has 2 extra leading rows: position p uses row p + 2
# (transformers' OPTLearnedPositionalEmbedding, kept from fairseq's padding-index convention).
POSITION_OFFSET = 2


def _block_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f = cfg.dim, cfg.ffn_dim
    out = {f"{norm}.{part}": (d,) for norm in _NORMS for part in ("weight", "bias")}
    for name in LINEAR_NAMES:
        n_out, n_in = {"fc1": (f, d), "fc2": (d, f)}.get(name, (d, d))
        out[name + ".weight"] = (n_out, n_in)
        out[name + ".bias"] = (n_out,)
    return out


def expected_shapes(cfg: ModelConfig, prefix: str = "model.decoder.") -> dict[str, tuple]:
    """Every tensor an OPT checkpoint must have (with tied head), with its shape.

    Parameters
    ----------
    cfg : ModelConfig
        An OPT configuration.
    prefix : str
        Prefix of every name: ``"model.decoder."`` (Hugging Face) or ``"decoder."``.

    Returns
    -------
    dict of str -> tuple of int
        Name -> ``(N, K)`` or ``(D,)``: ``embed_tokens`` ``(V, E)``, ``embed_positions``
        ``(max_position + 2, D)`` (:data:`POSITION_OFFSET`), ``project_in`` ``(D, E)`` and
        ``project_out`` ``(E, D)`` only when ``E != D``, ``final_layer_norm`` only for pre-norm
        models; per block the two LayerNorms ``(D,)``, q/k/v/out projections ``(D, D)``,
        ``fc1`` ``(F, D)``, ``fc2`` ``(D, F)``, each with its bias ``(N,)``.
    """
    d, e = cfg.dim, cfg.embed_proj_dim or cfg.dim
    out = {prefix + "embed_tokens.weight": (cfg.vocab_size, e),
           prefix + "embed_positions.weight": (cfg.max_position + POSITION_OFFSET, d)}
    if e != d:
        out[prefix + "project_in.weight"] = (d, e)
        out[prefix + "project_out.weight"] = (e, d)
    if cfg.norm_before:
        out[prefix + "final_layer_norm.weight"] = (d,)
        out[prefix + "final_layer_norm.bias"] = (d,)
    for i in range(cfg.n_layers):
        out.update({f"{prefix}layers.{i}.{k}": s for k, s in _block_shapes(cfg).items()})
    return out


class OPTBlock:
    """Pre-norm: ``x + attn(ln(x))``, ``x + mlp(ln(x))``; post-norm (OPT-350m): ``ln(x + f(x))``."""

    # Linear layers that read the same input (calibration statistics are collected once per group).
    input_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    ("self_attn.out_proj",), ("fc1",), ("fc2",))

    def __init__(self, cfg: ModelConfig, tensors: dict):
        self.cfg = cfg
        self.norms = {k: tensors[k] for k in tensors if k.split(".")[0] in _NORMS}
        self.linears = {name: as_linear(tensors[name + ".weight"]) for name in LINEAR_NAMES}
        self.bias = {name: tensors[name + ".bias"] for name in LINEAR_NAMES}
        self.act = ACTIVATIONS[cfg.activation]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(x, self.norms[name + ".weight"], self.norms[name + ".bias"],
                          self.cfg.norm_eps)

    def _proj(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.linears[name](x) + self.bias[name]

    def attention(self, h, start, cache_k, cache_v) -> np.ndarray:
        """Self-attention: q/k/v projections with biases, ``H`` heads, ``out_proj`` with bias.

        Parameters
        ----------
        h : np.ndarray
            ``[T, D]`` float32: the normed input (pre-norm) or the raw block input (post-norm).
        start : int
            Position of the first token.
        cache_k, cache_v : np.ndarray or None
            This layer's ``[H, capacity, hd]`` float32 cache (OPT has ``KV = H``); positions
            ``start .. start+T-1`` are written. None attends over the new tokens only.

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32, before the residual is added.
        """
        q, k, v = (self._proj(f"self_attn.{n}_proj", h) for n in "qkv")  # [T, D] each
        n_heads = self.cfg.n_heads
        out = multi_head_attention(q, k, v, n_heads, n_heads, start, cache_k, cache_v)
        return self._proj("self_attn.out_proj", out)  # [T, D]

    def mlp(self, h: np.ndarray) -> np.ndarray:
        """``fc2(act(fc1(h)))`` with biases; ``act`` is ``config.activation`` (ReLU for OPT).

        Parameters
        ----------
        h : np.ndarray
            ``[T, D]`` float32 input (normed for pre-norm models).

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32, before the residual is added (the ``[T, F]`` hidden activation
            is internal).
        """
        return self._proj("fc2", self.act(self._proj("fc1", h)))  # [T, D]

    def __call__(self, x: np.ndarray, start: int, cache_k=None, cache_v=None) -> np.ndarray:
        if self.cfg.norm_before:
            x = x + self.attention(self._norm(x, "self_attn_layer_norm"), start, cache_k, cache_v)
            return x + self.mlp(self._norm(x, "final_layer_norm"))
        x = self._norm(x + self.attention(x, start, cache_k, cache_v), "self_attn_layer_norm")
        return self._norm(x + self.mlp(x), "final_layer_norm")

    def state(self) -> dict:
        """The block's tensors under their names inside the block (``fc1.weight`` ...).

        Returns
        -------
        dict of str -> np.ndarray
            float32 LayerNorm weights and biases ``[D]``, every linear weight densified to
            ``[N, K]``, and every linear bias ``[N]``.
        """
        out = dict(self.norms)
        for name in LINEAR_NAMES:
            out[name + ".weight"] = self.linears[name].to_dense()
            out[name + ".bias"] = self.bias[name]
        return out


class OPTModel(CausalLM):
    """OPT over Hugging Face weights (``model.decoder.*``, or ``decoder.*`` without the prefix).

    Parameters
    ----------
    config : ModelConfig
    weights : Weights
    """

    learned_positions = True

    def __init__(self, config: ModelConfig, weights, load_blocks: bool = True):
        self.config = config
        self.weights = weights
        nested = "model.decoder.embed_tokens.weight" in weights
        self.prefix = "model.decoder." if nested else "decoder."
        p, d, e = self.prefix, config.dim, config.embed_proj_dim or config.dim
        get = weights.get_checked
        self.tensors = {
            "embed_tokens.weight": get(p + "embed_tokens.weight", (config.vocab_size, e)),
            "embed_positions.weight": get(p + "embed_positions.weight",
                                          (config.max_position + POSITION_OFFSET, d)),
        }
        # project_in/out exist when the word embeddings are narrower than the model (OPT-350m).
        if e != d:
            self.tensors["project_in.weight"] = get(p + "project_in.weight", (d, e))
            self.tensors["project_out.weight"] = get(p + "project_out.weight", (e, d))
        # The final LayerNorm exists only for pre-norm models.
        if config.norm_before:
            for part in ("weight", "bias"):
                self.tensors[f"final_layer_norm.{part}"] = get(f"{p}final_layer_norm.{part}", (d,))
        self.blocks = [self.load_block(i) for i in range(config.n_layers)] if load_blocks else []
        self.tied = config.tie_embeddings or "lm_head.weight" not in weights
        embed = self.tensors["embed_tokens.weight"]
        self.head = as_linear(embed if self.tied else get("lm_head.weight", embed.shape))

    def block_prefix(self, i: int) -> str:
        """OPT names block ``i`` ``model.decoder.layers.{i}`` (or ``decoder.layers.{i}``)."""
        return f"{self.prefix}layers.{i}"

    def load_block(self, i: int) -> OPTBlock:
        """Read block ``i``'s two LayerNorms and six biased linear layers and build it."""
        get, prefix = self.weights.get_checked, self.block_prefix(i)
        return OPTBlock(self.config, {k: get(f"{prefix}.{k}", shape)
                                      for k, shape in _block_shapes(self.config).items()})

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Token embeddings (projected in to ``D`` if narrower) plus learned positions.

        Position ``p`` reads row ``p + 2`` of ``embed_positions`` (:data:`POSITION_OFFSET`).
        """
        x = self.tensors["embed_tokens.weight"][ids]  # [T, E]
        if "project_in.weight" in self.tensors:
            x = x @ self.tensors["project_in.weight"].T  # [T, D]
        rows = np.arange(start, start + len(ids)) + POSITION_OFFSET
        return x + self.tensors["embed_positions.weight"][rows]  # [T, D]

    def final(self, x: np.ndarray) -> np.ndarray:
        """Final LayerNorm (pre-norm models only), ``project_out`` to ``E`` if any, then head."""
        t = self.tensors
        if "final_layer_norm.weight" in t:
            x = layer_norm(x, t["final_layer_norm.weight"], t["final_layer_norm.bias"],
                           self.config.norm_eps)
        if "project_out.weight" in t:
            x = x @ t["project_out.weight"].T  # [T, E]
        return self.head(x)  # [T, V]

    def outer_state(self) -> dict[str, np.ndarray]:
        """The tensors outside the blocks, under the checkpoint's prefix; ``lm_head`` if untied.

        Returns
        -------
        dict of str -> np.ndarray
            float32 ``embed_tokens.weight`` ``[V, E]``, ``embed_positions.weight``
            ``[max_position + 2, D]``, ``project_in.weight`` ``[D, E]`` and
            ``project_out.weight`` ``[E, D]`` when present, ``final_layer_norm`` ``[D]`` for
            pre-norm models, and ``lm_head.weight`` ``[V, E]`` (dense) when the head is not tied.
        """
        out = {self.prefix + k: v for k, v in self.tensors.items()}
        if not self.tied:
            out["lm_head.weight"] = self.head.to_dense()
        return out


# -- the Hugging Face config.json mapping (see npsparse.architectures) ---------------------------

FAMILY = "opt"
Model = OPTModel


def config_from_hf(hf: dict, model_type: str) -> dict:
    """The :class:`~npsparse.config.ModelConfig` fields an OPT ``config.json`` sets.

    Parameters
    ----------
    hf : dict
        The parsed ``config.json``.
    model_type : str
        ``"opt"``.

    Returns
    -------
    dict
        Field name -> value (vocabulary size and special token ids are read by
        :meth:`ModelConfig.from_hf` itself).
    """
    dim = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    if not hf.get("enable_bias", True):
        raise NpsparseError("config.json: OPT with enable_bias=false is not supported")
    return dict(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        ffn_dim=hf["ffn_dim"],
        norm_eps=1e-5,  # OPT's LayerNorms use PyTorch's default epsilon
        max_position=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        activation=check_activation(hf.get("activation_function", "relu"), ("relu", "gelu")),
        norm_before=bool(hf.get("do_layer_norm_before", True)),
        embed_proj_dim=hf.get("word_embed_proj_dim") or dim,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The OPT keys of ``config.json`` for ``cfg`` (the inverse of :func:`config_from_hf`).

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict
    """
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "ffn_dim": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_position,
        "do_layer_norm_before": cfg.norm_before,
        "word_embed_proj_dim": cfg.embed_proj_dim,
        "activation_function": cfg.activation,
        "enable_bias": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
