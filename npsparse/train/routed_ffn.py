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

``--router-init oracle`` (MoEfication, Zhang et al. 2022) instead fits each router, before any
training, to predict which blocks the activation-norm oracle picks (:func:`fit_routers`).
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
ROUTER_INITS = ("random", "oracle")
FIT_WINDOWS = 8  # --router-init oracle: the first 8 training windows the run reads
FIT_SCALE = 0.1  # fitted logits: 0.1 times the predicted standardized log-norms
FIT_RIDGE = 1e-2  # ridge lambda, times the mean of diag(H^T H)


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


def fit_routers(model, windows: np.ndarray, routed: RoutedFfnConfig, *, scale: float = FIT_SCALE,
                ridge: float = FIT_RIDGE) -> dict[str, np.ndarray]:
    """Routers fitted to predict the activation-norm oracle's blocks (MoEfication's init).

    The dense model (plain FFNs, no router: each block's input comes from the dense forward of
    the blocks before it) runs over ``windows``; at every block the FFN input ``h [N, D]`` (the
    post-attention RMS-normed hidden state, what the router reads) and the per-block norms
    ``n_b = ||silu(h gate_b^T) * (h up_b^T)||`` (what :func:`~npsparse.ffn_routing.oracle_blocks`
    ranks) are collected. The target is the per-token standardized log-norm
    ``y_b = (log n_b - mean_b log n) / std_b log n`` ``[N, B]``: the logarithm makes the ranking
    target additive (a softmax compares logit differences, i.e. ratios of norms), the per-token
    centring removes what no softmax sees, and the per-token scaling gives every token the same
    weight in the fit. ``router^T`` solves the ridge normal equations
    ``(H^T H + lambda I) W = H^T Y`` accumulated in float64, ``lambda = ridge * mean diag(H^T H)``;
    the top-A of ``h router^T`` then approximates the oracle's top-A.

    The scale: the chosen blocks are multiplied by ``B * softmax(z)_b``, while the oracle (which
    does far better than random routers) weighs them 1. The standardized fit gives logits of
    spread up to 1 a token, whose top blocks would get weights of 2-3 at B = 8, scaling the FFN
    output up; so the fit is multiplied by ``scale`` (0.1): the logits spread by about 0.1, the
    chosen blocks' weights stay within ~10-20% of 1 (near the oracle's), the ranking is the
    fit's, and the softmax stays in its steep range, so the router keeps learning.

    Parameters
    ----------
    model : LlamaModel
        Plain FFNs (before :func:`with_routed_ffn`); not changed.
    windows : np.ndarray
        ``[n, T]`` token ids (finetune: the first :data:`FIT_WINDOWS` training windows the run
        reads, in its order).
    routed : RoutedFfnConfig
        ``B`` (``A`` does not enter the fit).
    scale : float
        Multiplies the fitted logits (see above).
    ridge : float
        Ridge lambda relative to the mean diagonal of ``H^T H``.

    Returns
    -------
    dict of str -> np.ndarray
        ``{prefix}.mlp.block_router.weight [B, D]`` per block, in the model's dtype, like
        :func:`router_tensors`; the same inputs give the same bits.
    """
    if model.config.routed_ffn is not None or model.config.pesc is not None:
        raise NpsparseError("routers are fitted on a model with plain FFNs")
    n_blocks, d = routed.blocks, model.config.dim
    check_blocks(model.config.ffn_dim, n_blocks, routed.active)
    n_layers = len(model.blocks)
    gram = np.zeros((n_layers, d, d))  # [L, D, D] float64: sum of h h^T
    cross = np.zeros((n_layers, d, n_blocks))  # [L, D, B] float64: sum of h y^T
    for ids in np.asarray(windows):
        x = model.embed(ids, 0)  # [T, D]
        for i, block in enumerate(model.blocks):
            tape = {}
            x = block(x, tape=tape)  # the dense forward: routing starts after init
            h = tape["h_mlp"].astype(np.float64)  # [T, D]
            act = tape["act"].astype(np.float64)  # [T, F]
            norms = np.linalg.norm(act.reshape(len(h), n_blocks, -1), axis=-1)  # [T, B]
            target = np.log(norms + 1e-12)
            target -= target.mean(axis=1, keepdims=True)
            target /= target.std(axis=1, keepdims=True) + 1e-12  # [T, B]; 0 at B = 1
            gram[i] += h.T @ h
            cross[i] += h.T @ target
    out = {}
    for i in range(n_layers):
        lam = ridge * np.trace(gram[i]) / d
        fitted = np.linalg.solve(gram[i] + lam * np.eye(d), cross[i])  # [D, B]
        out[f"{model.block_prefix(i)}.{ROUTER}"] = (scale * fitted.T).astype(
            model.embed_tokens.dtype)
    return out


def set_routers(model, tensors: dict) -> None:
    """Write router tensors (:func:`fit_routers`, :func:`router_tensors`) into a routed model.

    In place, into the live arrays the optimizer will train.

    Parameters
    ----------
    model : LlamaModel
        With routed FFNs.
    tensors : dict of str -> np.ndarray
        ``{prefix}.mlp.block_router.weight [B, D]`` per block.
    """
    for i, block in enumerate(model.blocks):
        block.ffn_router.router[...] = tensors[f"{model.block_prefix(i)}.{ROUTER}"]
