"""One frozen model configuration, built from GGUF metadata or a Hugging Face ``config.json``.

Every default that a checkpoint may leave out is stated here, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .architectures import architecture, is_registered, names
from .errors import NpsparseError


@dataclass(frozen=True)
class PescConfig:
    """PESC's mixture of adapter experts on every FFN (issue 16; :mod:`npsparse.routing`).

    ``config.json`` holds it as ``npsparse_pesc``; the defaults are the reference's
    (wuhy68/Parameter-Efficient-MoE, camelidae: ``moe_scaling`` 0.25).

    Attributes
    ----------
    experts, top_k, adapter_dim : int
        ``E`` experts, ``k`` chosen per token, ``R`` the adapters' inner dimension.
    scale : float
        ``s``, the adapters' scale.
    """

    experts: int
    top_k: int
    adapter_dim: int
    scale: float = 0.25


@dataclass(frozen=True)
class RoutedFfnConfig:
    """SPT's routed FFN on every block (issue 16; :mod:`npsparse.ffn_routing`).

    ``config.json`` holds it as ``npsparse_routed_ffn``.

    Attributes
    ----------
    blocks, active : int
        ``B`` blocks of ``F / B`` FFN units, ``A`` of them active per token.
    """

    blocks: int
    active: int


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
    pesc : PescConfig or None
        Every FFN is a PESC mixture of adapter experts (LLaMA family only); None: plain FFNs.
    routed_ffn : RoutedFfnConfig or None
        Every FFN runs only its router's top-A blocks per token (LLaMA family only).
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
    pesc: PescConfig | None = None
    routed_ffn: RoutedFfnConfig | None = None

    def __post_init__(self):
        if not is_registered(self.arch):
            raise NpsparseError(
                f"architecture {self.arch!r} is not supported (supported: {', '.join(names())})"
            )
        if self.n_heads % self.n_kv_heads:
            raise NpsparseError(
                f"{self.n_heads} attention heads cannot be shared by {self.n_kv_heads} kv heads"
            )

    @property
    def family(self) -> str:
        """The forward pass this architecture runs (``"llama"`` for Llama, Mistral and Qwen2)."""
        return architecture(self.arch).FAMILY

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

        The architecture module's ``config_from_hf`` reads its own keys; the vocabulary size and
        special token ids are read here for all.

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
        if not is_registered(model_type):
            raise NpsparseError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(names())})"
            )
        try:
            fields = architecture(model_type).config_from_hf(hf, model_type)
            vocab_size = hf["vocab_size"]
        except KeyError as err:
            raise NpsparseError(f"{source}: missing key {err.args[0]!r}") from None
        return cls(arch=model_type, vocab_size=vocab_size,
                   bos_token_id=_first_id(hf.get("bos_token_id")),
                   eos_token_id=_first_id(hf.get("eos_token_id")), **fields)

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` contents that describe this model.

        The architecture module's ``config_to_hf`` writes its own keys; the vocabulary size,
        dtype and special token ids are common to all.
        """
        out = architecture(self.arch).config_to_hf(self)
        out.update({"vocab_size": self.vocab_size, "torch_dtype": "float32"})
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out

    def to_json(self) -> str:
        """This config as Hugging Face ``config.json`` text (:meth:`to_hf`, sorted keys)."""
        return json.dumps(self.to_hf(), indent=2, sort_keys=True)


def check_activation(name: str, allowed: tuple) -> str:
    """``name`` if it is one of the ``allowed`` activations, else a one-line error.

    Parameters
    ----------
    name : str
        The activation a ``config.json`` names.
    allowed : tuple of str
        Those the architecture's forward pass implements.

    Returns
    -------
    str
        ``name``.
    """
    if name not in allowed:
        raise NpsparseError(f"activation {name!r} is not supported here (supported: {allowed})")
    return name


def _first_id(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value
