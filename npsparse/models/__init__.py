"""Forward passes, one module per architecture family, and the function that picks one."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import ModelConfig
from ..io.weights import DictWeights, Weights
from .base import CausalLM, KVCache
from .llama import LlamaModel


def build_model(config: ModelConfig, weights: Mapping) -> CausalLM:
    """The forward pass for ``config.arch`` over ``weights`` (Hugging Face names, float32).

    Parameters
    ----------
    config : ModelConfig
    weights : Weights or dict of str -> np.ndarray

    Returns
    -------
    CausalLM
    """
    if not isinstance(weights, Weights):
        weights = DictWeights(weights)
    if config.family == "llama":
        return LlamaModel(config, weights)
    if config.arch == "gpt2":
        from .gpt2 import GPT2Model

        return GPT2Model(config, weights)
    from .opt import OPTModel

    return OPTModel(config, weights)


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every tensor a checkpoint of ``config.arch`` must hold, by Hugging Face name, with shape."""
    from . import gpt2, llama, opt

    module = {"llama": llama, "gpt2": gpt2, "opt": opt}[config.family]
    return module.expected_shapes(config)


__all__ = ["CausalLM", "KVCache", "LlamaModel", "build_model", "expected_shapes"]
