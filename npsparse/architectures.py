"""Which module runs each architecture: one registry line per Hugging Face ``model_type``.

An architecture module (:mod:`npsparse.models.llama`, :mod:`~npsparse.models.gpt2`,
:mod:`~npsparse.models.opt`) provides, at module level:

- ``FAMILY``: the name of the forward pass it implements (``"llama"`` for Llama, Mistral and
  Qwen2, which share one);
- ``Model``: its :class:`~npsparse.models.base.CausalLM` subclass, built as
  ``Model(config, weights, load_blocks)``;
- ``expected_shapes(config)``: every tensor a checkpoint must hold, by name, with its shape;
- ``config_from_hf(hf, model_type)`` and ``config_to_hf(config)``: the mapping between a Hugging
  Face ``config.json`` and :class:`~npsparse.config.ModelConfig`.

Modules are named here by import path and imported on first use, so reading a config does not
load every forward pass, and this module imports nothing from the package (no import cycle).
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES: dict[str, str | ModuleType] = {
    "llama": "npsparse.models.llama",
    "mistral": "npsparse.models.llama",
    "qwen2": "npsparse.models.llama",
    "gpt2": "npsparse.models.gpt2",
    "opt": "npsparse.models.opt",
}

_REQUIRED = ("FAMILY", "Model", "expected_shapes", "config_from_hf", "config_to_hf")


def register_architecture(model_type: str, module: str | ModuleType) -> None:
    """Run ``model_type`` checkpoints with ``module`` (a module object or its import path).

    Parameters
    ----------
    model_type : str
        The Hugging Face ``model_type`` (and :attr:`ModelConfig.arch`) it answers to.
    module : str or module
        An architecture module as described above; a path is imported when first needed.
    """
    _MODULES[model_type] = module


def names() -> tuple[str, ...]:
    """Every registered ``model_type``, in registration order."""
    return tuple(_MODULES)


def is_registered(model_type) -> bool:
    """Whether ``model_type`` has an architecture module.

    Parameters
    ----------
    model_type : object
        Usually a string read from a checkpoint (anything else is simply not registered).
    """
    return isinstance(model_type, str) and model_type in _MODULES


def architecture(model_type: str) -> ModuleType:
    """The module that runs ``model_type`` (imported now if it was registered by path).

    Parameters
    ----------
    model_type : str
        A registered ``model_type``.

    Returns
    -------
    module
        With ``FAMILY``, ``Model``, ``expected_shapes``, ``config_from_hf`` and ``config_to_hf``.

    Raises
    ------
    KeyError
        ``model_type`` is not registered (callers check :func:`is_registered` first and word
        their own error).
    AttributeError
        The module lacks one of the required names.
    """
    module = _MODULES[model_type]
    if isinstance(module, str):
        module = _MODULES[model_type] = importlib.import_module(module)
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise AttributeError(f"architecture module {module.__name__} for {model_type!r} lacks "
                             f"{', '.join(missing)}")
    return module
