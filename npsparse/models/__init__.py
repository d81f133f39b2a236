"""Forward passes, one module per architecture family, and the functions that pick one.

Which module runs which ``model_type`` is :mod:`npsparse.architectures`' registry.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from ..architectures import architecture
from ..config import ModelConfig
from ..errors import NpsparseError
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


def select_layers(names, patterns=None) -> list[str]:
    """The linear layer names that any of ``patterns`` selects, in model order.

    Parameters
    ----------
    names : iterable of str
        Every block linear layer of a model (``model.linears()``), e.g.
        ``model.layers.3.mlp.up_proj``.
    patterns : list of str, optional
        Shell-style patterns (``"model.layers.2?.mlp.*"``, ``"*.self_attn.o_proj"``) or name
        prefixes ending at a dot (``"model.layers.3"`` = every layer of block 3). None selects
        every name.

    Returns
    -------
    list of str

    Raises
    ------
    NpsparseError
        A pattern that selects nothing (one line, with an example of the names).
    """
    names = list(names)
    if patterns is None:
        return names
    chosen = set()
    for pattern in patterns:
        found = {n for n in names
                 if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern.rstrip(".") + ".")}
        if not found:
            example = names[0] if names else "none"
            raise NpsparseError(f"no linear layer matches {pattern!r} (names look like "
                                f"{example!r})")
        chosen |= found
    return [n for n in names if n in chosen]


__all__ = ["CausalLM", "KVCache", "LlamaModel", "build_model", "expected_shapes",
           "select_layers"]
