"""Masked AdamW, the learning-rate schedule, and clipping by global norm.

A pruned weight must stay exactly zero through training, so a mask (``True`` = kept) multiplies
its gradient before anything else: the moments of a pruned position stay 0, its Adam update is
``0 / (0 + eps) = 0``, and decoupled weight decay keeps ``0`` at ``0``. Unstructured and N:M
patterns therefore survive bit for bit, and the clipping norm counts only kept weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import NpsparseError


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW's hyper-parameters (PyTorch's defaults but for the learning rate)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class AdamW:
    """AdamW (Loshchilov & Hutter) with bias correction and decoupled weight decay, masked.

    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``w <- w (1 - lr wd) - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)``, as
    ``torch.optim.AdamW`` computes it.

    Parameters
    ----------
    params : dict of str -> np.ndarray
        The arrays to update in place (float32 or float64), by name.
    masks : dict of str -> np.ndarray, optional
        Boolean masks (``True`` = kept) for some of them.
    settings : AdamWSettings
    """

    def __init__(self, params: dict, masks: dict | None = None,
                 settings: AdamWSettings = AdamWSettings()):
        self.params = params
        self.masks = dict(masks or {})
        for name, mask in self.masks.items():
            if mask.shape != params[name].shape or mask.dtype != np.bool_:
                raise NpsparseError(f"{name}: mask must be boolean of shape {params[name].shape}")
        self.settings = settings
        self.step_count = 0
        self.exp_avg = {n: np.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}

    def mask_gradients(self, grads: dict) -> None:
        """Zero, in place, the gradient of every pruned position.

        Parameters
        ----------
        grads : dict of str -> np.ndarray
            Gradients by parameter name.
        """
        for name, mask in self.masks.items():
            if name in grads:
                grads[name] *= mask

    def step(self, grads: dict, lr: float) -> None:
        """One update of every parameter from its (already masked and clipped) gradient.

        Parameters
        ----------
        grads : dict of str -> np.ndarray
            One gradient per parameter name (all of ``params``).
        lr : float
            This step's learning rate (the schedule's value).
        """
        b1, b2 = self.settings.betas
        eps, wd = self.settings.eps, self.settings.weight_decay
        self.step_count += 1
        t = self.step_count
        step_size = lr / (1 - b1**t)
        root_correction = math.sqrt(1 - b2**t)
        for name, w in self.params.items():
            g = grads[name]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            if wd:
                w *= 1 - lr * wd
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v)
            denom /= root_correction
            denom += eps
            w -= step_size * (m / denom)

    def state(self) -> dict[str, np.ndarray]:
        """Moments by ``exp_avg/NAME`` and ``exp_avg_sq/NAME`` (for a resumable checkpoint)."""
        out = {f"exp_avg/{n}": a for n, a in self.exp_avg.items()}
        out.update({f"exp_avg_sq/{n}": a for n, a in self.exp_avg_sq.items()})
        return out

    def load_state(self, arrays: dict, step_count: int) -> None:
        """Restore what :meth:`state` returned and the number of steps taken.

        Parameters
        ----------
        arrays : dict of str -> np.ndarray
            As :meth:`state` names them.
        step_count : int
            Steps taken so far (for the bias correction).
        """
        for name in self.params:
            self.exp_avg[name][...] = arrays[f"exp_avg/{name}"]
            self.exp_avg_sq[name][...] = arrays[f"exp_avg_sq/{name}"]
        self.step_count = step_count


def global_norm(grads: dict) -> float:
    """``sqrt(sum of squares)`` over every gradient, summed in float64.

    Parameters
    ----------
    grads : dict of str -> np.ndarray

    Returns
    -------
    float
    """
    return math.sqrt(sum(float(np.vdot(g.ravel(), g.ravel())) for g in grads.values()))


def clip_by_global_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient by ``max_norm / norm`` if their global norm exceeds ``max_norm``.

    Parameters
    ----------
    grads : dict of str -> np.ndarray
        Modified in place.
    max_norm : float
        0 or less: no clipping.

    Returns
    -------
    float
        The norm before clipping.
    """
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= factor
    return norm


DECAYS = ("linear", "cosine", "constant")  # learning-rate schedules after the warm-up


def learning_rate(step: int, total: int, peak: float, warmup: int, decay: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then decay to 0.

    Parameters
    ----------
    step : int
        1 .. total.
    total : int
        Number of optimizer steps.
    peak : float
        Learning rate at the end of warm-up.
    warmup : int
        Warm-up steps (``lr = peak * step / warmup`` while ``step <= warmup``).
    decay : {"linear", "cosine", "constant"}
        Shape of the decay from ``peak`` (the first step after warm-up) towards 0 (reached one
        step after ``total``, so the last step still learns).

    Returns
    -------
    float
    """
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup - 1) / max(1, total - warmup)  # 0 right after warm-up
    if decay == "linear":
        return peak * (1.0 - progress)
    if decay == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "constant":
        return peak
    raise NpsparseError(f"unknown learning-rate decay {decay!r} ({', '.join(DECAYS)})")
