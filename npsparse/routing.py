"""PESC routing: a frozen FFN turned into a mixture of adapter experts (issue 16), as array code.

PESC (Wu et al. 2024, "Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts")
keeps one frozen FFN and gives each of ``E`` experts a small adapter on its output. A linear
router on the FFN's input picks the top-k experts per token:

    y = sum_{j<k} g_j(h) * (F + s * U_e act(D_e F)),   e = the j-th chosen expert of the token
      = F + s * sum_{j<k} g_j U_e act(D_e F)           (the g_j sum to 1; computed in this form)

``h [T, D]`` is the FFN's input, ``F [T, D]`` its output, ``z = h Wr^T [T, E]`` the router
logits and ``g`` the softmax over the k chosen logits. Shapes: T tokens, D model dim, E experts,
R adapter dim, k experts per token.

What the reference code does (wuhy68/Parameter-Efficient-MoE, ``camelidae/modeling_camelidae.py``):

- ``act`` is ``nn.GELU()`` in ``ParallelAdapterMLP``: the exact (erf) GELU, not the tanh
  approximation and not SiLU. npsparse's ``layers.gelu_erf`` casts to float32, which would spoil
  the float64 gradient checks, so the dtype-generic :func:`_gelu` here computes the same function.
- The router reads the FFN's input and the adapters read the FFN's output (``LlamaMLP.forward``
  passes ``down_proj`` as both the adapters' input and the residual, ``x`` to the router).
- Each adapter applies ``Dropout(0.1)`` to its input while training; it is left out here (the
  functions are deterministic; a caller may drop entries of ``F`` before the adapters).
- The config's defaults are ``moe_scaling`` 0.25 (``s``), ``adapter_dim`` 64, ``num_experts`` 8.
- Its ``load_balancing_loss_func`` is a pre-fix copy from transformers: it averages the top-k
  softmax, which is 1/k for every token, so the loss is a constant with no gradient (transformers
  issues #28093, #28255). :func:`balance_loss` is the Switch-Transformer loss instead.

Dispatch is grouped by expert: the (token, slot) pairs are sorted by expert (a stable sort, so
tokens stay in order) and each expert runs one matmul over all the pairs it serves.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from .errors import NpsparseError
from .models.layers import softmax


# ----------------------------------------------------------------------------- checks


def _check_top_k(experts: int, top_k: int) -> None:
    if experts < 1:
        raise NpsparseError(f"the number of experts must be at least 1, not {experts}")
    if top_k < 1:
        raise NpsparseError(f"top-k must be at least 1, not {top_k}")
    if top_k > experts:
        raise NpsparseError(f"top-k {top_k} is more than the {experts} experts")


def check_routing(experts: int, top_k: int, adapter_dim: int) -> None:
    """Raise a one-line :class:`~npsparse.errors.NpsparseError` for impossible PESC settings.

    Parameters
    ----------
    experts : int
        ``E``, the number of experts; at least 1.
    top_k : int
        ``k``, experts per token; from 1 to ``E``.
    adapter_dim : int
        ``R``, the adapters' inner dimension; at least 1.

    Raises
    ------
    NpsparseError
        Naming the first setting that is out of range.
    """
    _check_top_k(experts, top_k)
    if adapter_dim < 1:
        raise NpsparseError(f"the adapter dimension must be at least 1, not {adapter_dim}")


# ----------------------------------------------------------------------------- leaf functions


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU ``x * Phi(x)`` in the dtype of x (the reference's ``nn.GELU()``)."""
    return x * ndtr(x)


def _gelu_grad(x: np.ndarray) -> np.ndarray:
    """d/dx of ``x * Phi(x)``: ``Phi(x) + x * phi(x)``, phi the standard normal density."""
    density = np.exp(-0.5 * x * x) * x.dtype.type(1.0 / math.sqrt(2.0 * math.pi))
    return ndtr(x) + x * density


def _softmax_backward(d_p: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Backward of ``p = softmax(z)`` over the last axis: ``p * (d_p - sum(d_p * p))``."""
    return p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k experts with the largest logits per token, and their gates.

    Ties go to the lower expert index (a stable sort of ``-logits``), so equal logits always
    choose the same experts.

    Parameters
    ----------
    logits : np.ndarray
        ``[T, E]`` router logits, float32 or float64.
    k : int
        Experts per token, from 1 to ``E``.

    Returns
    -------
    chosen : np.ndarray
        ``[T, k]`` int64 expert indices, by decreasing logit (then increasing index).
    gates : np.ndarray
        ``[T, k]`` in the dtype of ``logits``: the softmax over the chosen logits, each row
        positive and summing to 1.
    """
    _check_top_k(logits.shape[1], k)
    order = np.argsort(-logits, axis=-1, kind="stable")  # [T, E]
    chosen = order[:, :k].astype(np.int64)  # [T, k]
    gates = softmax(np.take_along_axis(logits, chosen, axis=-1))  # [T, k]
    return chosen, gates


def group_by_expert(chosen: np.ndarray, experts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Which (token, slot) pairs each expert serves, so it can run one matmul over them.

    Parameters
    ----------
    chosen : np.ndarray
        ``[T, k]`` int64 expert indices from :func:`route`.
    experts : int
        ``E``.

    Returns
    -------
    list of (np.ndarray, np.ndarray)
        ``E`` pairs ``(tokens, slots)``, int64 arrays ``[n_e]`` with ``chosen[tokens, slots] ==
        e``; tokens increasing. An expert that no token chose gets two empty arrays. A token
        picks an expert at most once, so ``tokens`` has no repeats.
    """
    top_k = chosen.shape[1]
    flat = chosen.reshape(-1)  # [T*k], pair p = t*k + j
    order = np.argsort(flat, kind="stable")  # [T*k] pairs grouped by expert
    counts = np.bincount(flat, minlength=experts)  # [E]
    groups = np.split(order, np.cumsum(counts)[:-1])  # E arrays of pair indices
    return [(pairs // top_k, pairs % top_k) for pairs in groups]


def expert_load(chosen: np.ndarray, experts: int) -> np.ndarray:
    """Fraction of the routed (token, slot) pairs that each expert receives.

    Parameters
    ----------
    chosen : np.ndarray
        ``[T, k]`` int64 expert indices.
    experts : int
        ``E``.

    Returns
    -------
    np.ndarray
        ``[E]`` float64, summing to 1 (``1/E`` each for perfectly balanced routing).
    """
    counts = np.bincount(chosen.reshape(-1), minlength=experts)  # [E]
    return counts / chosen.size


# ----------------------------------------------------------------------------- the PESC layer


def pesc_forward(h: np.ndarray, f: np.ndarray, router: np.ndarray, down: np.ndarray,
                 up: np.ndarray, k: int, scale: float = 1.0,
                 tape: dict | None = None) -> np.ndarray:
    """PESC's mixture of adapters on a frozen FFN: ``y = F + s * sum_j g_j U_e act(D_e F)``.

    ``act`` is the exact GELU, as the reference's adapters (see the module docstring).

    Parameters
    ----------
    h : np.ndarray
        ``[T, D]`` the FFN's input, which the router reads.
    f : np.ndarray
        ``[T, D]`` the frozen FFN's output, which the adapters read.
    router : np.ndarray
        ``[E, D]`` router weight ``Wr``; logits ``z = h Wr^T``.
    down : np.ndarray
        ``[E, R, D]`` the adapters' down projections ``D_e``.
    up : np.ndarray
        ``[E, D, R]`` the adapters' up projections ``U_e`` (zero at the start of training, so
        that ``y == F`` exactly).
    k : int
        Experts per token, from 1 to ``E``.
    scale : float
        ``s``, the adapters' scale (the reference's ``moe_scaling``, 0.25 there).
    tape : dict, optional
        Filled with what :func:`pesc_backward` needs: the inputs, ``logits [T, E]``, ``chosen
        [T, k]``, ``gates [T, k]``, ``groups`` (:func:`group_by_expert`) and per expert the
        adapter's pre-activation ``[n_e, R]``, activation ``[n_e, R]`` and output ``[n_e, D]``
        (None for an expert no token chose: its adapter does not run).

    Returns
    -------
    np.ndarray
        ``[T, D]`` in the dtype of the inputs.
    """
    n_experts = router.shape[0]
    check_routing(n_experts, k, down.shape[1])
    logits = h @ router.T  # [T, E]
    chosen, gates = route(logits, k)  # [T, k], [T, k]
    groups = group_by_expert(chosen, n_experts)
    mixed = np.zeros_like(f)  # [T, D], sum_j g_j U_e act(D_e F)
    pre, act, out = [], [], []
    for e, (tokens, slots) in enumerate(groups):
        if tokens.size == 0:  # no token chose e: its adapter is not run (decode: k of E run)
            pre.append(None)
            act.append(None)
            out.append(None)
            continue
        pre_e = f[tokens] @ down[e].T  # [n_e, R]
        act_e = _gelu(pre_e)  # [n_e, R]
        out_e = act_e @ up[e].T  # [n_e, D]
        mixed[tokens] += gates[tokens, slots][:, None] * out_e  # tokens unique within e
        pre.append(pre_e)
        act.append(act_e)
        out.append(out_e)
    if tape is not None:
        tape.update(h=h, f=f, router=router, down=down, up=up, scale=scale, logits=logits,
                    chosen=chosen, gates=gates, groups=groups, pre=pre, act=act, out=out)
    return f + scale * mixed  # [T, D]


def pesc_backward(d_y: np.ndarray, tape: dict,
                  d_logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Gradients of a scalar loss through :func:`pesc_forward`.

    The top-k choice is piecewise constant, so the router learns only through the gates: with
    ``a_j = U_e act(D_e F)`` of slot j, ``dL/dg_j = s <dL/dy, a_j>`` and the gates' softmax
    backward gives ``dL/dz`` on the chosen logits (zero on the others). The ``F`` term of each
    slot adds the same ``<dL/dy, F>`` to every ``dL/dg_j``, which the softmax backward cancels
    (the gates sum to 1), so ``dL/dF`` from it is ``dL/dy`` itself.

    Parameters
    ----------
    d_y : np.ndarray
        ``[T, D]`` gradient with respect to the output.
    tape : dict
        Filled by :func:`pesc_forward`.
    d_logits : np.ndarray, optional
        ``[T, E]`` gradient of other loss terms with respect to the router logits (for example
        :func:`balance_loss_backward`), added before the router's own backward.

    Returns
    -------
    d_h : np.ndarray
        ``[T, D]`` gradient with respect to the router's input (only through the router).
    d_f : np.ndarray
        ``[T, D]`` gradient with respect to the frozen FFN's output.
    grads : dict
        ``"router" [E, D]``, ``"down" [E, R, D]``, ``"up" [E, D, R]``.
    """
    scale, gates, chosen = tape["scale"], tape["gates"], tape["chosen"]
    router, down, up = tape["router"], tape["down"], tape["up"]
    d_f = d_y.copy()  # [T, D], the F term
    d_gates = np.zeros_like(gates)  # [T, k]
    d_down, d_up = np.zeros_like(down), np.zeros_like(up)  # [E, R, D], [E, D, R]
    for e, (tokens, slots) in enumerate(tape["groups"]):
        if tokens.size == 0:  # not run in the forward: zero gradients
            continue
        d_y_e = d_y[tokens]  # [n_e, D]
        g_e = gates[tokens, slots][:, None]  # [n_e, 1]
        d_gates[tokens, slots] = scale * np.sum(d_y_e * tape["out"][e], axis=1)
        d_out = scale * g_e * d_y_e  # [n_e, D]
        d_up[e] = d_out.T @ tape["act"][e]  # [D, R]
        d_pre = (d_out @ up[e]) * _gelu_grad(tape["pre"][e])  # [n_e, R]
        d_down[e] = d_pre.T @ tape["f"][tokens]  # [R, D]
        d_f[tokens] += d_pre @ down[e]  # tokens unique within e
    d_z = np.zeros_like(tape["logits"]) if d_logits is None else d_logits.copy()  # [T, E]
    np.put_along_axis(d_z, chosen, np.take_along_axis(d_z, chosen, axis=1)
                      + _softmax_backward(d_gates, gates), axis=1)
    d_h = d_z @ router  # [T, D]
    d_router = d_z.T @ tape["h"]  # [E, D]
    return d_h, d_f, {"router": d_router, "down": d_down, "up": d_up}


# ----------------------------------------------------------------------------- load balance


def balance_loss(logits: np.ndarray, chosen: np.ndarray, alpha: float) -> float:
    """Switch-Transformer load-balancing loss ``alpha * E * sum_i f_i P_i``.

    ``f_i`` is the fraction of the ``T*k`` routed (token, slot) pairs that go to expert i
    (:func:`expert_load`, summing to 1, not differentiable) and ``P_i`` the mean over tokens of
    the softmax over all ``E`` logits. Balanced routing gives exactly ``alpha``, routing that
    favours the experts the router already prefers gives more. This is ``1/k`` times
    transformers' fixed ``load_balancing_loss_func``, which sums ``f`` over the k slots (each
    slot's fractions sum to 1, so its balanced value is ``k``).

    Parameters
    ----------
    logits : np.ndarray
        ``[T, E]`` router logits.
    chosen : np.ndarray
        ``[T, k]`` int64 experts chosen from them (:func:`route`).
    alpha : float
        The loss's weight.

    Returns
    -------
    float
        The loss.
    """
    n_experts = logits.shape[1]
    load = expert_load(chosen, n_experts)  # [E]
    mean_probs = np.mean(softmax(logits), axis=0)  # [E]
    return float(alpha * n_experts * np.sum(load * mean_probs))


def balance_loss_backward(logits: np.ndarray, chosen: np.ndarray, alpha: float,
                          d_loss: float = 1.0) -> np.ndarray:
    """Gradient of :func:`balance_loss` with respect to the logits (through ``P`` only).

    ``dL/dP_i = alpha * E * f_i``, each token's softmax contributes ``1/T`` of ``P``.

    Parameters
    ----------
    logits : np.ndarray
        ``[T, E]`` router logits.
    chosen : np.ndarray
        ``[T, k]`` int64 chosen experts.
    alpha : float
        The loss's weight.
    d_loss : float
        Gradient of the total loss with respect to this term (1 when it is added as is).

    Returns
    -------
    np.ndarray
        ``[T, E]`` in the dtype of ``logits``; pass it to :func:`pesc_backward` as
        ``d_logits`` to reach the router and its input.
    """
    n_tok, n_experts = logits.shape
    load = expert_load(chosen, n_experts).astype(logits.dtype)  # [E]
    probs = softmax(logits)  # [T, E]
    d_probs = np.broadcast_to(d_loss * alpha * n_experts * load / n_tok, probs.shape)  # [T, E]
    return _softmax_backward(d_probs, probs).astype(logits.dtype, copy=False)
