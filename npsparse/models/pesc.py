"""PESC's mixture of adapter experts as a part of a LLaMA block: its arrays, names and passes.

A block whose config has ``pesc`` (:class:`~npsparse.config.PescConfig`) keeps one
:class:`PescExperts`; its body adds ``moe(h, F) - F`` to the FFN output ``F`` (the math is
:func:`npsparse.routing.pesc_forward`). The arrays are named inside the block as the folder stores
them: ``mlp.router.weight [E, D]``, ``mlp.adapters.down [E, R, D]``, ``mlp.adapters.up [E, D, R]``.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..routing import pesc_backward, pesc_forward

ROUTER = "mlp.router.weight"
DOWN = "mlp.adapters.down"
UP = "mlp.adapters.up"


def pesc_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The shapes of one block's PESC arrays by name inside the block (empty without PESC).

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict of str -> tuple of int
        ``mlp.router.weight (E, D)``, ``mlp.adapters.down (E, R, D)``, ``mlp.adapters.up
        (E, D, R)``.
    """
    if cfg.pesc is None:
        return {}
    e, r, d = cfg.pesc.experts, cfg.pesc.adapter_dim, cfg.dim
    return {ROUTER: (e, d), DOWN: (e, r, d), UP: (e, d, r)}


class PescExperts:
    """The router and the adapters of one block, over live arrays (float32, or float64 in tests).

    Parameters
    ----------
    tensors : dict of str -> np.ndarray
        The block's tensors; the three of :func:`pesc_shapes` are used.
    cfg : ModelConfig
        With ``pesc`` set (``top_k``, ``scale``).
    """

    def __init__(self, tensors: dict, cfg: ModelConfig):
        self.router = tensors[ROUTER]  # [E, D]
        self.down = tensors[DOWN]  # [E, R, D]
        self.up = tensors[UP]  # [E, D, R]
        self.top_k = cfg.pesc.top_k
        self.scale = cfg.pesc.scale

    def __call__(self, h: np.ndarray, f: np.ndarray, tape: dict | None = None) -> np.ndarray:
        """``[T, D]``: the FFN output ``f`` plus the chosen experts' scaled adapters.

        Only the chosen experts' adapters run (one matmul pair per expert that any token
        chose: at one token, ``k`` of ``E``).
        """
        return pesc_forward(h, f, self.router, self.down, self.up, self.top_k, self.scale, tape)

    def backward(self, d_y: np.ndarray, tape: dict,
                 d_logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """Gradients through :meth:`__call__` (:func:`~npsparse.routing.pesc_backward`).

        Parameters
        ----------
        d_y : np.ndarray
            ``[T, D]`` gradient with respect to the output.
        tape : dict
            What ``__call__(h, f, tape)`` kept.
        d_logits : np.ndarray, optional
            ``[T, E]`` gradient of other loss terms (the balance loss) for the router logits.

        Returns
        -------
        (np.ndarray, np.ndarray, dict)
            ``d_h [T, D]`` (through the router), ``d_f [T, D]`` and the arrays' gradients by
            name inside the block (:data:`ROUTER`, :data:`DOWN`, :data:`UP`).
        """
        d_h, d_f, grads = pesc_backward(d_y, tape, d_logits)
        return d_h, d_f, {ROUTER: grads["router"], DOWN: grads["down"], UP: grads["up"]}

    def parameters(self) -> dict:
        """The live arrays by name inside the block."""
        return {ROUTER: self.router, DOWN: self.down, UP: self.up}
