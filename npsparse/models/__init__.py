"""Forward passes, one module per architecture family, and the functions that pick one.

Which module runs which ``model_type`` is :mod:`npsparse.architectures`' registry.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..architectures import architecture
from ..config import ModelConfig
from ..io.weights import DictWeights, Weights
from .base import CausalLM, KVCache
from .llama import LlamaModel


def build_model(config: ModelConfig, weights: Mapping, load_blocks: bool = True) -> CausalLM:
    """The forward pass for ``config.arch`` over ``weights`` (Hugging Face names, float32).

    Parameters
    ----------
    config : ModelConfig
    weights : Weights or dict of str -> np.ndarray
    load_blocks : bool
        Build every decoder block now. With False, ``model.blocks`` is empty and blocks are built
        one at a time with ``model.load_block(i)`` (how pruning streams a large checkpoint).

    Returns
    -------
    CausalLM
    """
    if not isinstance(weights, Weights):
        weights = DictWeights(weights)
    return architecture(config.arch).Model(config, weights, load_blocks)


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every tensor a checkpoint of ``config.arch`` must hold, by Hugging Face name, with shape.

    Dispatches on ``config.arch`` to the architecture module's own ``expected_shapes``
    (:mod:`.llama`, :mod:`.gpt2`, :mod:`.opt` or a registered one), with its default name prefix.

    Parameters
    ----------
    config : ModelConfig
        The model's configuration; ``dim``, ``n_layers``, ``vocab_size`` and the head and FFN
        sizes fix the shapes.

    Returns
    -------
    dict of str -> tuple of int
        Tensor name -> shape as the checkpoint stores it (GPT-2's Conv1D weights as ``[K, N]``,
        every other weight as ``[N, K]``).
    """
    return architecture(config.arch).expected_shapes(config)


__all__ = ["CausalLM", "KVCache", "LlamaModel", "build_model", "expected_shapes"]
