"""SPT's routed FFN as a part of a LLaMA block: its router, names and passes.

A block whose config has ``routed_ffn`` (:class:`~npsparse.config.RoutedFfnConfig`) keeps one
:class:`BlockRouter`; its body computes the FFN through it (the math is
:func:`npsparse.ffn_routing.routed_ffn_forward`) from the block's own ``mlp.gate_proj``,
``mlp.up_proj`` and ``mlp.down_proj`` weights, which must be dense (a packed layer is refused:
the blocks slice its rows). The router is stored as ``mlp.block_router.weight [B, D]``.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import NpsparseError
from ..ffn_routing import routed_ffn_backward, routed_ffn_forward
from ..linear import DenseLinear

ROUTER = "mlp.block_router.weight"
FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def routed_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """``{mlp.block_router.weight: (B, D)}`` for a routed-FFN config, else empty.

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict of str -> tuple of int
    """
    if cfg.routed_ffn is None:
        return {}
    return {ROUTER: (cfg.routed_ffn.blocks, cfg.dim)}


def dense_ffn_weights(linears: dict) -> list[np.ndarray]:
    """The live ``[F, D]``, ``[F, D]``, ``[D, F]`` weights of gate, up and down (dense only).

    Parameters
    ----------
    linears : dict of str -> linear layer
        A block's linears.

    Returns
    -------
    list of np.ndarray
    """
    out = []
    for name in FFN:
        layer = linears[name]
        if not isinstance(layer, DenseLinear):
            raise NpsparseError(f"a routed FFN slices dense weights; {name} is "
                                f"{type(layer).__name__} (run it unpacked)")
        out.append(layer.weight)
    return out


class BlockRouter:
    """The router of one routed FFN, over a live array (float32, or float64 in tests).

    Parameters
    ----------
    tensors : dict of str -> np.ndarray
        The block's tensors; :data:`ROUTER` is used.
    cfg : ModelConfig
        With ``routed_ffn`` set (``active``).
    """

    def __init__(self, tensors: dict, cfg: ModelConfig):
        self.router = tensors[ROUTER]  # [B, D]
        self.active = cfg.routed_ffn.active
        self.oracle = False  # True: choose by activation norm, weight 1 (eval only)

    def __call__(self, h: np.ndarray, linears: dict, tape: dict | None = None) -> np.ndarray:
        """``[T, D]``: the FFN of ``h [T, D]`` over the active blocks only."""
        gate_w, up_w, down_w = dense_ffn_weights(linears)
        return routed_ffn_forward(h, gate_w, up_w, down_w, self.router, self.active, tape,
                                  oracle=self.oracle)

    def backward(self, d_y: np.ndarray, tape: dict,
                 d_logits: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Gradients through :meth:`__call__`.

        Parameters
        ----------
        d_y : np.ndarray
            ``[T, D]`` gradient with respect to the output.
        tape : dict
            What ``__call__(h, linears, tape)`` kept.
        d_logits : np.ndarray, optional
            ``[T, B]`` gradient of the balance loss with respect to the router logits.

        Returns
        -------
        (np.ndarray, dict)
            ``d_h [T, D]`` and the gradients by name inside the block (the router and the
            three FFN weights).
        """
        if self.oracle:
            raise NpsparseError("the oracle's routing is forward only (it has no gradient)")
        d_h, grads = routed_ffn_backward(d_y, tape, d_logits)
        return d_h, {ROUTER: grads["router"], "mlp.gate_proj.weight": grads["gate"],
                     "mlp.up_proj.weight": grads["up"], "mlp.down_proj.weight": grads["down"]}

    def parameters(self) -> dict:
        """The router by name inside the block (the FFN weights are the block's linears)."""
        return {ROUTER: self.router}
