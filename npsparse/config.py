"""One frozen model configuration, built from GGUF metadata or a Hugging Face ``config.json``.

Every default that a checkpoint may leave out is stated here, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import NpsparseError

# Architectures npsparse runs, by the family its forward pass lives in.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GPT_FAMILY = ("gpt2", "opt")
ARCHITECTURES = LLAMA_FAMILY + GPT_FAMILY


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    Attributes
    ----------
    arch : str
        ``"llama"``, ``"mistral"``, ``"qwen2"`` (LLaMA family: RMSNorm, RoPE, SwiGLU, GQA),
        ``"gpt2"`` or ``"opt"`` (LayerNorm, learned positions, GELU/ReLU MLP).
    vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim : int
        Sizes: ``V``, ``D``, layers, query heads ``H``, key/value heads ``KV``, ``hd``, ``F``.
    norm_eps : float
        Epsilon of RMSNorm / LayerNorm.
    max_position : int
        Longest sequence the model was trained for (learned position tables have this many rows).
    rope_theta : float
        RoPE base (LLaMA family only).
    rope_scaling : tuple of (key, value) pairs or None
        Hugging Face ``rope_scaling`` as sorted items; ``"linear"`` and ``"llama3"`` are supported.
    tie_embeddings : bool
        The output head reuses the token embedding matrix.
    qkv_bias : bool
        Attention q/k/v projections carry a bias (Qwen2, GPT-2, OPT).
    activation : str
        MLP non-linearity: ``"silu"`` (SwiGLU gate), ``"gelu_new"`` (GPT-2), ``"relu"`` (OPT).
    norm_before : bool
        OPT's ``do_layer_norm_before``; pre-norm for every other architecture.
    embed_proj_dim : int
        OPT's ``word_embed_proj_dim`` (equals ``dim`` unless the model projects in and out).
    bos_token_id, eos_token_id : int or None
        Special token ids, when known.
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    max_position: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    activation: str = "silu"
    norm_before: bool = True
    embed_proj_dim: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise NpsparseError(
                f"architecture {self.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        if self.n_heads % self.n_kv_heads:
            raise NpsparseError(
                f"{self.n_heads} attention heads cannot be shared by {self.n_kv_heads} kv heads"
            )

    @property
    def family(self) -> str:
        """``"llama"`` for the LLaMA family, else the architecture name."""
        return "llama" if self.arch in LLAMA_FAMILY else self.arch

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (the config itself is frozen).

        Parameters
        ----------
        **changes
            Field names and their new values.

        Returns
        -------
        ModelConfig
        """
        return dataclasses.replace(self, **changes)

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed Hugging Face ``config.json``.

        Parameters
        ----------
        hf : dict
            The parsed file.
        source : str
            Where it came from, for error messages.

        Returns
        -------
        ModelConfig

        Raises
        ------
        NpsparseError
            For an unsupported ``model_type``, activation or RoPE scaling, a missing key, or
            head counts that do not divide.
        """
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise NpsparseError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        try:
            if model_type in LLAMA_FAMILY:
                return cls._llama_from_hf(hf, model_type)
            if model_type == "gpt2":
                return cls._gpt2_from_hf(hf)
            return cls._opt_from_hf(hf)
        except KeyError as err:
            raise NpsparseError(f"{source}: missing key {err.args[0]!r}") from None

    @classmethod
    def _llama_from_hf(cls, hf: dict, model_type: str) -> "ModelConfig":
        n_heads = hf["num_attention_heads"]
        dim = hf["hidden_size"]
        # transformers >= 5 writes "rope_parameters" (theta and scaling together); older
        # configs have top-level "rope_theta" and "rope_scaling".
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        return cls(
            arch=model_type,
            vocab_size=hf["vocab_size"],
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
            activation=_check_activation(hf.get("hidden_act", "silu"), ("silu",)),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )

    @classmethod
    def _gpt2_from_hf(cls, hf: dict) -> "ModelConfig":
        dim = hf["n_embd"]
        n_heads = hf["n_head"]
        return cls(
            arch="gpt2",
            vocab_size=hf["vocab_size"],
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
            activation=_check_activation(
                hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu", "relu")
            ),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )

    @classmethod
    def _opt_from_hf(cls, hf: dict) -> "ModelConfig":
        dim = hf["hidden_size"]
        n_heads = hf["num_attention_heads"]
        if not hf.get("enable_bias", True):
            raise NpsparseError("config.json: OPT with enable_bias=false is not supported")
        return cls(
            arch="opt",
            vocab_size=hf["vocab_size"],
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
            activation=_check_activation(hf.get("activation_function", "relu"), ("relu", "gelu")),
            norm_before=bool(hf.get("do_layer_norm_before", True)),
            embed_proj_dim=hf.get("word_embed_proj_dim") or dim,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` contents that describe this model."""
        common = {"vocab_size": self.vocab_size, "torch_dtype": "float32"}
        if self.bos_token_id is not None:
            common["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            common["eos_token_id"] = self.eos_token_id
        if self.family == "llama":
            archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM"}
            out = {
                "architectures": [archs[self.arch]],
                "model_type": self.arch,
                "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim,
                "intermediate_size": self.ffn_dim,
                "rms_norm_eps": self.norm_eps,
                "max_position_embeddings": self.max_position,
                "rope_theta": self.rope_theta,
                "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
                "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": self.activation,
            }
            if self.arch == "llama":
                out["attention_bias"] = self.qkv_bias
                out["mlp_bias"] = False
            return {**out, **common}
        if self.arch == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": self.dim,
                "n_layer": self.n_layers,
                "n_head": self.n_heads,
                "n_inner": self.ffn_dim,
                "n_positions": self.max_position,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.activation,
                "tie_word_embeddings": self.tie_embeddings,
                **common,
            }
        return {
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_position,
            "do_layer_norm_before": self.norm_before,
            "word_embed_proj_dim": self.embed_proj_dim,
            "activation_function": self.activation,
            "enable_bias": True,
            "tie_word_embeddings": self.tie_embeddings,
            **common,
        }

    def to_json(self) -> str:
        """This config as Hugging Face ``config.json`` text (:meth:`to_hf`, sorted keys)."""
        return json.dumps(self.to_hf(), indent=2, sort_keys=True)


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


def _check_activation(name: str, allowed: tuple) -> str:
    if name not in allowed:
        raise NpsparseError(f"activation {name!r} is not supported here (supported: {allowed})")
    return name


def _first_id(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value
