"""``finetune --method routed-ffn``: every FFN runs only its router's top-A of B blocks (issue 16).

Each block gets a router ``[B, D]`` (:class:`~npsparse.models.routed_ffn.BlockRouter`); the
routers and the FFN weights (gate, up, down) train, attention, norms and embeddings stay frozen:
SPT fine-tunes the model, and the FFN's units are what the routing changes, so they adapt to
running A of B at a time while the rest keeps the base model.

The routers start as ``N(0, (0.02 / sqrt(D))^2)``, logits of about 0.02 times the FFN input's
RMS: with ``A = B`` every block's weight ``B * p`` is within a few percent of 1, so step 0 is
nearly the dense model. Not zero: a zero router ties every logit, so every token would choose
blocks ``0 .. A-1`` (ties go to the lower index), and the unchosen blocks' router rows would get
identical gradients and never separate. A zero router with ``A = B`` is the dense FFN exactly
(tested). Block ``i`` draws from ``default_rng([seed, i])``.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import RoutedFfnConfig
from ..errors import NpsparseError
from ..ffn_routing import check_blocks
from ..io.weights import DictWeights
from ..models import build_model
from ..models.routed_ffn import FFN, ROUTER
from ..routing import expert_load

ROUTER_STD = 0.02  # times 1/sqrt(D)


def router_tensors(model, routed: RoutedFfnConfig, seed: int) -> dict[str, np.ndarray]:
    """Fresh routers of every block by Hugging Face name (see the module docstring).

    Parameters
    ----------
    model : LlamaModel
    routed : RoutedFfnConfig
    seed : int

    Returns
    -------
    dict of str -> np.ndarray
        ``{prefix}.mlp.block_router.weight [B, D]`` per block, in the model's dtype.
    """
    d = model.config.dim
    out = {}
    for i in range(model.config.n_layers):
        rng = np.random.default_rng([seed, i])
        out[f"{model.block_prefix(i)}.{ROUTER}"] = (
            ROUTER_STD / math.sqrt(d) * rng.standard_normal((routed.blocks, d))
        ).astype(model.embed_tokens.dtype)
    return out


def with_routed_ffn(model, routed: RoutedFfnConfig, seed: int):
    """The model with a fresh router on every FFN, over the same base arrays (no copies).

    Parameters
    ----------
    model : LlamaModel
        Plain FFNs (no routed FFN, no PESC).
    routed : RoutedFfnConfig
    seed : int

    Returns
    -------
    LlamaModel
    """
    if model.config.routed_ffn is not None or model.config.pesc is not None:
        raise NpsparseError("the model's FFNs are routed or PESC already; start --method "
                            "routed-ffn from a model with plain FFNs")
    check_blocks(model.config.ffn_dim, routed.blocks, routed.active)
    tensors = {**model.state_dict(), **router_tensors(model, routed, seed)}
    weights = DictWeights(tensors, source=model.weights.source, dtype=model.embed_tokens.dtype)
    return build_model(model.config.replace(routed_ffn=routed), weights)


def routed_names(model) -> list[str]:
    """Hugging Face names of what ``--method routed-ffn`` trains: routers and FFN weights.

    Parameters
    ----------
    model : LlamaModel

    Returns
    -------
    list of str
    """
    return [f"{model.block_prefix(i)}.{name}" for i in range(len(model.blocks))
            for name in (ROUTER, *(f"{n}.weight" for n in FFN))]


def block_load(model, windows: np.ndarray) -> dict:
    """The fraction of routed (token, slot) pairs each FFN block gets, per layer (forward only).

    Parameters
    ----------
    model : LlamaModel
        With routed FFNs.
    windows : np.ndarray
        ``[n, T]`` token ids.

    Returns
    -------
    dict
        ``windows``, ``tokens`` and ``load``: per layer ``B`` fractions summing to 1 (``1/B``
        each when balanced), means over windows.
    """
    n_blocks = model.config.routed_ffn.blocks
    loads = np.zeros((len(model.blocks), n_blocks))  # [L, B]
    for ids in windows:
        x = model.embed(ids, 0)  # [T, D]
        for i, block in enumerate(model.blocks):
            tape = {}
            x = block(x, tape=tape)
            loads[i] += expert_load(tape["routed_ffn"]["chosen"], n_blocks) / len(windows)
    return {"windows": int(len(windows)), "tokens": int(np.size(windows)),
            "load": [[float(f) for f in layer] for layer in loads]}


def with_oracle_routing(model, routed: RoutedFfnConfig):
    """A plain-FFN model whose FFNs run the top-A of B blocks by activation norm, weight 1.

    The oracle a trained router is compared with (:func:`npsparse.ffn_routing.oracle_blocks`):
    it computes every block's activations to choose, so it saves no work. Forward only.

    Parameters
    ----------
    model : LlamaModel
        Plain FFNs; its arrays are shared, not copied.
    routed : RoutedFfnConfig

    Returns
    -------
    LlamaModel
        With ``A = B`` its outputs are the dense model's (sums in another order).
    """
    oracle = with_routed_ffn(model, routed, seed=0)
    for block in oracle.blocks:
        block.ffn_router.router[...] = 0  # unused: the oracle chooses
        block.ffn_router.oracle = True
    return oracle
