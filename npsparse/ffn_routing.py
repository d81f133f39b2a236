"""SPT's routed FFN (issue 16) as array code: a router runs A of B blocks of FFN units a token.

SPT (Gui et al. 2023, "SPT: Fine-Tuning Transformer-based Language Models Efficiently with
Sparsification") splits the SwiGLU FFN's ``F`` hidden units into ``B`` contiguous blocks of
``Fb = F / B`` units; a router ``Wr [B, D]`` on the FFN input picks the top-A blocks per token:

    y = sum_{j<A} w_j * down_b(silu(gate_b h) * up_b h),   b = the j-th chosen block of the token
    w = B * softmax(h Wr^T)[chosen]                         (softmax over all B logits)

``gate_b``/``up_b`` are rows ``b*Fb .. (b+1)*Fb`` of ``gate_proj``/``up_proj`` and ``down_b`` the
same columns of ``down_proj``. Shapes: T tokens, D model dim, F FFN dim, B blocks, A active.

The weights: in the reference prototype (ytgui/SPT-proto) the router's probabilities never scale
the output, so the loss gives the router no gradient. Here the chosen blocks are scaled by ``B``
times their probability under the softmax over *all* B logits (Switch Transformer's gate, times B):
a uniform router gives weight 1 to every active block, so with ``A = B`` and a zero router the
output is the dense FFN (sums in another order). The softmax over the chosen logits alone
(Mixtral's renormalised gates, times A) would be constant at ``A = 1``: no router gradient there.
The price: as the router grows confident, the chosen blocks' weights sum to up to ``B`` (``A``
when uniform); the loss sees and trains that scale.

Dispatch is grouped by block (:func:`npsparse.routing.group_by_expert`): each block runs one
matmul triple over the tokens that chose it; at one token (decode) only the A chosen blocks'
rows of gate/up and columns of down are read. :func:`routed_ffn_loop` is the naive reference.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from .errors import NpsparseError
from .models.layers import softmax
from .routing import _softmax_backward, group_by_expert


def check_blocks(ffn_dim: int, blocks: int, active: int) -> None:
    """Raise a one-line :class:`~npsparse.errors.NpsparseError` for impossible settings.

    Parameters
    ----------
    ffn_dim : int
        ``F``, the FFN's hidden units.
    blocks : int
        ``B``, at least 1 and dividing ``F``.
    active : int
        ``A``, blocks active per token, from 1 to ``B``.
    """
    if blocks < 1:
        raise NpsparseError(f"the number of FFN blocks must be at least 1, not {blocks}")
    if active < 1:
        raise NpsparseError(f"the active blocks must be at least 1, not {active}")
    if active > blocks:
        raise NpsparseError(f"{active} active blocks is more than the {blocks} blocks")
    if ffn_dim % blocks:
        raise NpsparseError(f"{blocks} blocks do not divide the FFN's {ffn_dim} hidden units")


def _silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` in the dtype of x (float64 in gradient checks)."""
    return x * expit(x)


def _swiglu_backward(d_act, gate, up):
    """Backward of ``silu(gate) * up``: ``(d_gate, d_up)``."""
    s = expit(gate)
    return d_act * up * s * (1 + gate * (1 - s)), d_act * gate * s


def route_blocks(logits: np.ndarray, active: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-A blocks per token (ties to the lower index) and their weights ``B * p``.

    Parameters
    ----------
    logits : np.ndarray
        ``[T, B]`` router logits.
    active : int
        ``A``.

    Returns
    -------
    chosen : np.ndarray
        ``[T, A]`` int64 block indices, by decreasing logit (then increasing index).
    weights : np.ndarray
        ``[T, A]``: ``B`` times the softmax over all B logits, at the chosen blocks.
    probs : np.ndarray
        ``[T, B]`` that softmax.
    """
    n_blocks = logits.shape[1]
    check_blocks(n_blocks, n_blocks, active)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :active].astype(np.int64)  # [T, A]
    probs = softmax(logits)  # [T, B]
    weights = n_blocks * np.take_along_axis(probs, chosen, axis=-1)  # [T, A]
    return chosen, weights, probs


def oracle_blocks(h: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, blocks: int,
                  active: int) -> np.ndarray:
    """The top-A blocks per token by the norm of their activations ``silu(gate_b h) * up_b h``.

    The oracle a router is compared with (it computes the whole FFN's activations to choose).

    Parameters
    ----------
    h : np.ndarray
        ``[T, D]`` the FFN's input.
    gate_w, up_w : np.ndarray
        ``[F, D]`` ``gate_proj`` and ``up_proj`` weights.
    blocks, active : int
        ``B``, ``A``.

    Returns
    -------
    np.ndarray
        ``[T, A]`` int64, by decreasing norm; ties to the lower index.
    """
    check_blocks(gate_w.shape[0], blocks, active)
    act = _silu(h @ gate_w.T) * (h @ up_w.T)  # [T, F]
    norms = np.linalg.norm(act.reshape(len(h), blocks, -1), axis=-1)  # [T, B]
    return np.argsort(-norms, axis=-1, kind="stable")[:, :active].astype(np.int64)


def routed_ffn_forward(h: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray,
                       router: np.ndarray, active: int, tape: dict | None = None,
                       oracle: bool = False) -> np.ndarray:
    """The routed FFN ``y = sum_j w_j down_b(silu(gate_b h) * up_b h)`` (module docstring).

    Parameters
    ----------
    h : np.ndarray
        ``[T, D]`` the FFN's input.
    gate_w, up_w : np.ndarray
        ``[F, D]``.
    down_w : np.ndarray
        ``[D, F]``.
    router : np.ndarray
        ``[B, D]`` router weight ``Wr``; logits ``h Wr^T``.
    active : int
        ``A``, blocks per token.
    tape : dict, optional
        Filled with what :func:`routed_ffn_backward` needs (the inputs, ``logits``, ``probs``,
        ``chosen``, ``weights``, ``groups`` and per block its tokens' gate, up, act and output;
        None for a block no token chose).
    oracle : bool
        Choose blocks by activation norm (:func:`oracle_blocks`) with weight 1 instead of the
        router (forward only: no tape).

    Returns
    -------
    np.ndarray
        ``[T, D]`` in the dtype of the inputs.
    """
    n_blocks = router.shape[0]
    check_blocks(gate_w.shape[0], n_blocks, active)
    width = gate_w.shape[0] // n_blocks  # Fb
    logits = h @ router.T  # [T, B]
    chosen, weights, probs = route_blocks(logits, active)  # [T, A], [T, A], [T, B]
    if oracle:
        chosen = oracle_blocks(h, gate_w, up_w, n_blocks, active)
        weights = np.ones_like(weights)
        tape = None
    groups = group_by_expert(chosen, n_blocks)
    y = np.zeros((h.shape[0], down_w.shape[0]), h.dtype)  # [T, D]
    kept = []
    for b, (tokens, slots) in enumerate(groups):
        if tokens.size == 0:  # no token chose b: its rows are not read
            kept.append(None)
            continue
        cols = slice(b * width, (b + 1) * width)
        h_b = h[tokens]  # [n_b, D]
        gate = h_b @ gate_w[cols].T  # [n_b, Fb]
        up = h_b @ up_w[cols].T  # [n_b, Fb]
        act = _silu(gate) * up  # [n_b, Fb]
        out = act @ down_w[:, cols].T  # [n_b, D]
        y[tokens] += weights[tokens, slots][:, None] * out  # tokens unique within b
        kept.append((gate, up, act, out))
    if tape is not None:
        tape.update(h=h, gate_w=gate_w, up_w=up_w, down_w=down_w, router=router, width=width,
                    logits=logits, probs=probs, chosen=chosen, weights=weights, groups=groups,
                    kept=kept)
    return y


def routed_ffn_backward(d_y: np.ndarray, tape: dict,
                        d_logits: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Gradients of a scalar loss through :func:`routed_ffn_forward`.

    The top-A choice is piecewise constant; the router learns through the weights: ``dL/dw_j =
    <dL/dy, out_j>``, ``dL/dp_b = B dL/dw_j`` at the chosen blocks (0 elsewhere), then the
    softmax's backward over all B logits.

    Parameters
    ----------
    d_y : np.ndarray
        ``[T, D]`` gradient with respect to the output.
    tape : dict
        Filled by :func:`routed_ffn_forward`.
    d_logits : np.ndarray, optional
        ``[T, B]`` gradient of other loss terms with respect to the router logits (the balance
        loss, :func:`npsparse.routing.balance_loss_backward`), added before the router's and
        the input's gradients are formed.

    Returns
    -------
    d_h : np.ndarray
        ``[T, D]`` through the blocks and the router.
    grads : dict
        ``"gate" [F, D]``, ``"up" [F, D]``, ``"down" [D, F]``, ``"router" [B, D]`` (zero where
        no token read them).
    """
    h, width, weights = tape["h"], tape["width"], tape["weights"]
    gate_w, up_w, down_w = tape["gate_w"], tape["up_w"], tape["down_w"]
    d_h = np.zeros_like(h)  # [T, D]
    d_gate_w, d_up_w, d_down_w = (np.zeros_like(gate_w), np.zeros_like(up_w),
                                  np.zeros_like(down_w))
    d_weights = np.zeros_like(weights)  # [T, A]
    for b, (tokens, slots) in enumerate(tape["groups"]):
        if tape["kept"][b] is None:
            continue
        gate, up, act, out = tape["kept"][b]
        cols = slice(b * width, (b + 1) * width)
        d_y_b = d_y[tokens]  # [n_b, D]
        d_weights[tokens, slots] = np.sum(d_y_b * out, axis=1)
        d_out = weights[tokens, slots][:, None] * d_y_b  # [n_b, D]
        d_down_w[:, cols] = d_out.T @ act  # [D, Fb]
        d_gate, d_up = _swiglu_backward(d_out @ down_w[:, cols], gate, up)  # [n_b, Fb] each
        h_b = h[tokens]
        d_gate_w[cols] = d_gate.T @ h_b  # [Fb, D]
        d_up_w[cols] = d_up.T @ h_b  # [Fb, D]
        d_h[tokens] += d_gate @ gate_w[cols] + d_up @ up_w[cols]  # tokens unique within b
    n_blocks = tape["probs"].shape[1]
    d_probs = np.zeros_like(tape["probs"])  # [T, B]
    np.put_along_axis(d_probs, tape["chosen"], n_blocks * d_weights, axis=1)
    d_z = _softmax_backward(d_probs, tape["probs"])  # [T, B]
    if d_logits is not None:
        d_z = d_z + d_logits
    d_h += d_z @ tape["router"]
    grads = {"gate": d_gate_w, "up": d_up_w, "down": d_down_w, "router": d_z.T @ h}
    return d_h, grads


def routed_ffn_loop(h: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray,
                    router: np.ndarray, active: int) -> np.ndarray:
    """Naive reference of :func:`routed_ffn_forward`: token by token, block by block.

    Parameters
    ----------
    h, gate_w, up_w, down_w, router, active
        As :func:`routed_ffn_forward`.

    Returns
    -------
    np.ndarray
        ``[T, D]``.
    """
    n_blocks = router.shape[0]
    width = gate_w.shape[0] // n_blocks
    y = np.zeros((h.shape[0], down_w.shape[0]), h.dtype)
    for t in range(h.shape[0]):
        logits = router @ h[t]  # [B]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = sorted(range(n_blocks), key=lambda b: (-logits[b], b))  # ties: lower index
        for b in order[:active]:
            rows = range(b * width, (b + 1) * width)
            act = np.array([_silu(gate_w[r] @ h[t]) * (up_w[r] @ h[t]) for r in rows])
            y[t] += n_blocks * probs[b] * (down_w[:, b * width:(b + 1) * width] @ act)
    return y
