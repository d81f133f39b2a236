"""A model's block weights under adapters for a fine-tuning run (``finetune --method ...``).

:class:`AdaptedModel` puts one :class:`~npsparse.train.adapters.Adapter` on every block linear
weight and does the three things a training step needs around the engine: write the effective
weights into the model's live arrays before the forward, turn the engine's ``dL/dW_eff`` into
the adapters' gradients (plus SaRA's nuclear-norm penalty), and write the merged weights at the
end. The optimizer then sees only the adapters' arrays, named ``WEIGHT_NAME/ARRAY``.

What trains: only the adapters' arrays; the norms, biases and embedding stay frozen, so the
trainable count is the adapters' alone.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError
from ..prune.patterns import Pattern
from .adapters import PST, Adapter, LoRA, SaRA

# "full": every kept weight trains (no adapter); "pesc": routed adapter experts on the FFN
# outputs (npsparse.train.pesc), "routed-ffn": routed blocks of FFN units
# (npsparse.train.routed_ffn), not adapters of the weights
METHODS = ("full", "lora", "pst", "sara", "pesc", "routed-ffn")


def block_weight_names(model) -> list[str]:
    """Hugging Face names of every block linear weight, in block order.

    Parameters
    ----------
    model : LlamaModel

    Returns
    -------
    list of str
    """
    return [f"{model.block_prefix(i)}.{name}.weight"
            for i, block in enumerate(model.blocks) for name in block.linears]


class AdaptedModel:
    """Adapters on every block linear weight of a model.

    Parameters
    ----------
    params : dict of str -> np.ndarray
        The model's live arrays (:func:`~npsparse.train.engine.parameters`).
    names : list of str
        The weights to adapt.
    method : {"lora", "pst", "sara"}
    pattern : str, optional
        PST's target: a sparsity (``"0.5"``) or N:M (``"2:4"``).
    rank : int
        LoRA's and PST's rank.
    fraction : float, optional
        SaRA's trained share of each matrix.
    nuclear : float
        SaRA's nuclear-norm weight (the reference's ``lambda_rank``).
    masks : dict of str -> np.ndarray, optional
        Keep masks of a pruned model (LoRA and SaRA keep its zeros; PST refuses one).
    seed : int
        Seeds the factors (matrix ``i`` draws from ``default_rng([seed, i])``) and the matrix
        SaRA penalises at each step.
    """

    def __init__(self, params: dict, names: list[str], method: str, *,
                 pattern: str | None = None, rank: int = 8, fraction: float | None = None,
                 nuclear: float = 0.0, masks: dict | None = None, seed: int = 0):
        masks = masks or {}
        if method == "pst" and masks:
            raise NpsparseError("PST prunes a dense model while it trains; give it the dense "
                                "model, not a pruned folder")
        self.method, self.nuclear, self.seed = method, nuclear, seed
        self.names = list(names)
        self.adapters: dict[str, Adapter] = {}
        target = Pattern.parse(pattern) if method == "pst" else None
        self.pattern = target  # PST's final pattern
        for i, name in enumerate(self.names):
            weight, keep = params[name], masks.get(name)
            rng = np.random.default_rng([seed, i])
            if method == "lora":
                adapter = LoRA(weight, rank, keep=keep, rng=rng)
            elif method == "pst":
                target.check_width(weight.shape[1], name)
                adapter = PST(weight, target, rank, rng=rng)
            elif method == "sara":
                adapter = SaRA(weight, fraction, keep)
            else:
                raise NpsparseError(f"unknown method {method!r} ({', '.join(METHODS)})")
            self.adapters[name] = adapter

    def params(self) -> dict[str, np.ndarray]:
        """Every adapter's trainable arrays, as ``WEIGHT_NAME/ARRAY`` (live, for the optimizer).

        Returns
        -------
        dict of str -> np.ndarray
        """
        return {f"{name}/{key}": array for name, adapter in self.adapters.items()
                for key, array in adapter.params().items()}

    def state(self) -> dict[str, np.ndarray]:
        """Every adapter's :meth:`~npsparse.train.adapters.Adapter.state`, as ``WEIGHT_NAME/KEY``.

        With the step and the seed this is all a resumed run needs: every random draw is keyed
        by ``(seed, matrix)`` or ``(seed, step)``, so no generator state is kept.

        Returns
        -------
        dict of str -> np.ndarray
        """
        return {f"{name}/{key}": array for name, adapter in self.adapters.items()
                for key, array in adapter.state().items()}

    def load_state(self, arrays: dict) -> None:
        """Restore what :meth:`state` returned (then build the optimizer on :meth:`params`).

        Parameters
        ----------
        arrays : dict of str -> np.ndarray
            By the names of :meth:`state`.
        """
        for name, adapter in self.adapters.items():
            adapter.load_state({key: arrays[f"{name}/{key}"] for key in adapter.state()})

    def write(self, params: dict, step: int, total: int) -> None:
        """Write every effective weight for optimizer step ``step`` into the model's arrays.

        Parameters
        ----------
        params : dict of str -> np.ndarray
            The model's live arrays.
        step, total : int
            Step (0-based) and number of steps (PST's schedule).
        """
        for name, adapter in self.adapters.items():
            params[name][...] = adapter.effective(step, total)

    def gradients(self, weight_grads: dict, step: int) -> tuple[dict, float]:
        """The adapters' gradients from the weights', plus SaRA's penalty on one matrix.

        Parameters
        ----------
        weight_grads : dict of str -> np.ndarray
            ``dL/dW_eff`` by weight name (the engine's accumulators).
        step : int
            0-based step: SaRA penalises matrix ``default_rng([seed, step])`` picks.

        Returns
        -------
        (dict, float)
            Gradients by the names of :meth:`params`, and the penalty's value (0 unless SaRA).
        """
        grads = {}
        for name, adapter in self.adapters.items():
            for key, grad in adapter.backward(weight_grads[name]).items():
                grads[f"{name}/{key}"] = grad
        penalty = 0.0
        if self.method == "sara" and self.nuclear:
            chosen = self.names[np.random.default_rng([self.seed, step]).integers(len(self.names))]
            penalty, subgradient = self.adapters[chosen].nuclear_penalty(self.nuclear)
            grads[f"{chosen}/delta"] += subgradient.astype(grads[f"{chosen}/delta"].dtype)
        return grads, penalty

    def reselect_step(self, total: int) -> int | None:
        """The 0-based step before which SaRA re-selects (half-way), else None.

        Parameters
        ----------
        total : int

        Returns
        -------
        int or None
        """
        return total // 2 if self.method == "sara" and total >= 2 else None

    def reselect(self) -> int:
        """SaRA's one re-selection on every matrix (the optimizer must then start afresh).

        Returns
        -------
        int
            Entries frozen in all.
        """
        return sum(adapter.reselect() for adapter in self.adapters.values())

    def merge_into(self, params: dict) -> None:
        """Write every merged weight (PST: at its final, exact mask) into the model's arrays.

        Parameters
        ----------
        params : dict of str -> np.ndarray
        """
        for name, adapter in self.adapters.items():
            params[name][...] = adapter.merged()

    def layer_sparsity(self, params: dict) -> dict:
        """Fraction of zeros of every adapted weight (after :meth:`merge_into`).

        Parameters
        ----------
        params : dict of str -> np.ndarray

        Returns
        -------
        dict of str -> {"sparsity": float}
        """
        return {name: {"sparsity": float(np.mean(params[name] == 0))} for name in self.names}
