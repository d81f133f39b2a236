"""``finetune --method pesc``: every FFN becomes a PESC mixture of adapter experts (issue 16).

The base model is frozen; each block gets a router ``[E, D]`` and ``E`` adapters (down
``[E, R, D]``, up ``[E, D, R]``) that the engine differentiates like any weight
(:class:`~npsparse.models.pesc.PescExperts` in the block's body and backward). They start as:

- router ``N(0, 0.02^2)``: the reference's router is an ``nn.Linear`` that transformers'
  ``_init_weights`` draws with ``initializer_range`` 0.02;
- down ``N(0, 1/D)``, so the adapters' pre-activations start of the order of the FFN output;
- up zero, so ``y == F`` and the model at step 0 is the base model exactly (bit for bit).

Block ``i`` draws from ``default_rng([seed, i])``: the same seed gives the same model.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import PescConfig
from ..errors import NpsparseError
from ..io.weights import DictWeights
from ..models import build_model
from ..models.pesc import DOWN, ROUTER, UP
from ..routing import balance_loss, check_routing, expert_load

ROUTER_STD = 0.02  # transformers' initializer_range, how the reference's router starts
DEFAULT_SCALE = PescConfig.scale  # the reference's moe_scaling
DEFAULT_BALANCE = 0.01  # Switch Transformer's alpha (the reference's loss has no gradient: 0)


def check_pesc(experts: int, top_k: int, adapter_dim: int, scale: float) -> None:
    """Refuse impossible PESC settings with one line (before any model is loaded).

    ``--balance`` is checked where every loss weight is, in
    :meth:`npsparse.train.LossWeights.parse`, for PESC and the routed FFN alike.

    Parameters
    ----------
    experts, top_k, adapter_dim : int
        ``E`` at least 1, ``k`` from 1 to ``E``, ``R`` at least 1.
    scale : float
        The adapters' scale, finite.
    """
    check_routing(experts, top_k, adapter_dim)
    if not math.isfinite(scale):
        raise NpsparseError(f"--adapter-scale must be a finite number, got {scale}")


def pesc_tensors(model, pesc: PescConfig, seed: int) -> dict[str, np.ndarray]:
    """Fresh routers and adapters of every block, by Hugging Face name (see the module docstring).

    Parameters
    ----------
    model : LlamaModel
        Gives the block prefixes, ``D`` and the dtype (float32, or float64 in tests).
    pesc : PescConfig
    seed : int

    Returns
    -------
    dict of str -> np.ndarray
        ``{prefix}.mlp.router.weight [E, D]``, ``.mlp.adapters.down [E, R, D]``,
        ``.mlp.adapters.up [E, D, R]`` (zero) per block.
    """
    e, r, d = pesc.experts, pesc.adapter_dim, model.config.dim
    dtype = model.embed_tokens.dtype
    out = {}
    for i in range(model.config.n_layers):
        rng = np.random.default_rng([seed, i])
        prefix = model.block_prefix(i) + "."
        out[prefix + ROUTER] = (ROUTER_STD * rng.standard_normal((e, d))).astype(dtype)
        out[prefix + DOWN] = (rng.standard_normal((e, r, d)) / math.sqrt(d)).astype(dtype)
        out[prefix + UP] = np.zeros((e, d, r), dtype)
    return out


def with_pesc(model, pesc: PescConfig, seed: int):
    """The model with a fresh PESC mixture on every FFN, over the same base arrays (no copies).

    Parameters
    ----------
    model : LlamaModel
        Dense layers, no PESC yet.
    pesc : PescConfig
    seed : int

    Returns
    -------
    LlamaModel
        Its config has ``pesc``; at step 0 its outputs equal ``model``'s exactly.
    """
    if model.config.pesc is not None:
        raise NpsparseError("the model has PESC experts already; fine-tune them with --method "
                            "full, or start --method pesc from its base model")
    tensors = {**model.state_dict(), **pesc_tensors(model, pesc, seed)}
    weights = DictWeights(tensors, source=model.weights.source, dtype=model.embed_tokens.dtype)
    return build_model(model.config.replace(pesc=pesc), weights)


def pesc_names(model) -> list[str]:
    """Hugging Face names of every block's router and adapters (what ``--method pesc`` trains).

    Parameters
    ----------
    model : LlamaModel

    Returns
    -------
    list of str
    """
    return [f"{model.block_prefix(i)}.{name}" for i, block in enumerate(model.blocks)
            if block.moe is not None for name in block.moe.parameters()]


def routing_summary(model, windows: np.ndarray) -> dict:
    """How each PESC block routes the tokens of some windows (forward only).

    Parameters
    ----------
    model : LlamaModel
        With PESC blocks.
    windows : np.ndarray
        ``[n, T]`` token ids.

    Returns
    -------
    dict
        ``windows``, ``tokens`` and per block ``load`` (the fraction of the routed (token,
        slot) pairs each expert got, :func:`~npsparse.routing.expert_load`; ``1/E`` each when
        balanced) and ``balance`` (``E * sum_i f_i P_i``, 1 when balanced), means over windows.
    """
    n_experts = model.config.pesc.experts
    loads = np.zeros((len(model.blocks), n_experts))  # [L, E]
    balance = np.zeros(len(model.blocks))  # [L]
    for ids in windows:
        x = model.embed(ids, 0)  # [T, D]
        for i, block in enumerate(model.blocks):
            tape = {}
            x = block(x, tape=tape)
            logits, chosen = tape["moe"]["logits"], tape["moe"]["chosen"]  # [T, E], [T, k]
            loads[i] += expert_load(chosen, n_experts) / len(windows)
            balance[i] += balance_loss(logits, chosen, 1.0) / len(windows)
    blocks = [{"load": [float(f) for f in loads[i]], "balance": float(balance[i])}
              for i in range(len(model.blocks))]
    return {"windows": int(len(windows)), "tokens": int(np.size(windows)), "blocks": blocks}
