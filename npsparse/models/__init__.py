"""Forward passes, one module per architecture family, and the function that picks one."""

from __future__ import annotations

from collections.abc import Mapping

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
    if config.family == "llama":
        return LlamaModel(config, weights, load_blocks)
    if config.arch == "gpt2":
        from .gpt2 import GPT2Model

        return GPT2Model(config, weights, load_blocks)
    from .opt import OPTModel

    return OPTModel(config, weights, load_blocks)


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every tensor a checkpoint of ``config.arch`` must hold, by Hugging Face name, with shape.

    Dispatches on ``config.family`` to the architecture module's own ``expected_shapes``
    (:mod:`.llama`, :mod:`.gpt2` or :mod:`.opt`), with that module's default name prefix.

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
    from . import gpt2, llama, opt

    module = {"llama": llama, "gpt2": gpt2, "opt": opt}[config.family]
    return module.expected_shapes(config)


__all__ = ["CausalLM", "KVCache", "LlamaModel", "build_model", "expected_shapes"]
