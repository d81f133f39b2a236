"""Read and write Hugging Face model directories: ``config.json``, safetensors, ``tokenizer.json``.

Reading memory-maps each safetensors file and views every tensor in place. The ``safetensors``
package's NumPy API cannot return bfloat16 (NumPy has no such dtype), and bf16 is what most
checkpoints ship, so the reader parses the documented header itself (8-byte little-endian length,
JSON table of dtype/shape/offsets) and widens bf16 to float32 per tensor. Writing uses
``safetensors.numpy.save_file``, atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import NpsparseError
from .output import (check_output_folder, check_replaceable, partial_folder, retired_folder,
                     writing)
from .weights import Weights

__all__ = ["HFCheckpoint", "HFDirWriter", "SafetensorsFile", "bf16_to_f32", "check_output_folder",
           "check_replaceable", "usual_mode", "write_hf_dir"]

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# Integer arrays appear only in npsparse's packed folders (sparse formats: bits, masks, indices).
_RAW_DTYPES = {**_DTYPES, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
               "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 stored as ``uint16`` to float32 (exact: bf16 is float32's top half).

    Parameters
    ----------
    bits : np.ndarray
        uint16 of any shape: bfloat16 bit patterns, as :meth:`SafetensorsFile.raw` returns them.

    Returns
    -------
    np.ndarray
        float32 of the same shape, a new array.
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file: header parsed, tensors viewed on demand.

    ``raw=True`` also accepts integer tensors (read with :meth:`raw`), as packed folders hold.
    """

    def __init__(self, path: Path, raw: bool = False):
        self.path = path
        dtypes = _RAW_DTYPES if raw else _DTYPES
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                raw = handle.read(8)
                if len(raw) < 8:
                    raise NpsparseError(f"{path}: file is too short to be safetensors")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > min(size - 8, 100_000_000):
                    raise NpsparseError(f"{path}: corrupt safetensors header length {header_len}")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise NpsparseError(f"{path}: unreadable safetensors file ({err})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.entries = header
        data_len = size - self.data_start
        for name, entry in header.items():
            dtype = entry.get("dtype")
            if dtype not in dtypes:
                raise NpsparseError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(dtypes[dtype]).itemsize
            if end - begin != expected:
                raise NpsparseError(f"{path}: tensor {name} has {end - begin} bytes, expected {expected}")
            if end > data_len:
                raise NpsparseError(f"{path}: file is truncated (tensor {name} ends past the end)")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if header else None

    def shape(self, name: str) -> tuple:
        """Shape of tensor ``name`` as the header lists it, without reading the data.

        Parameters
        ----------
        name : str
            A key of :attr:`entries` (a ``KeyError`` otherwise).

        Returns
        -------
        tuple of int
        """
        return tuple(self.entries[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored: a read-only view of the mapped file (BF16 as uint16 bits).

        Parameters
        ----------
        name : str
            A key of :attr:`entries` (a ``KeyError`` otherwise).

        Returns
        -------
        np.ndarray
            The header's shape, in the stored dtype (float32, float16 or float64; uint16 for BF16;
            the integer dtypes of a file opened with ``raw=True``). Nothing is copied.
        """
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin:self.data_start + end]
        return raw.view(_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def load(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32: a read-only view for F32, a widened copy otherwise.

        Parameters
        ----------
        name : str
            A key of :attr:`entries` (a ``KeyError`` otherwise).

        Returns
        -------
        np.ndarray
            float32 of the header's shape; BF16 is widened exactly (:func:`bf16_to_f32`), F16 and
            F64 are converted with :meth:`numpy.ndarray.astype`.
        """
        entry = self.entries[name]
        array = self.raw(name)
        if entry["dtype"] == "BF16":
            return bf16_to_f32(array)
        return array if array.dtype == np.float32 else array.astype(np.float32)


class HFCheckpoint:
    """A Hugging Face model directory opened for reading.

    Parameters
    ----------
    path : str or Path
        Folder with ``config.json`` and ``model.safetensors`` or sharded
        ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise NpsparseError(f"{self.path}: not a model directory (no config.json)")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise NpsparseError(f"{config_path}: invalid JSON ({err})") from None
        self.config = ModelConfig.from_hf(self.hf_config, source=str(config_path))
        self.files = {}
        owner = {}
        for file_path in self._safetensors_files():
            handle = SafetensorsFile(file_path)
            self.files[file_path.name] = handle
            for name in handle.entries:
                owner[name] = handle
        self._owner = owner
        self.weights = Weights(
            names=list(owner),
            loader=lambda name: owner[name].load(name),
            shapes={name: handle.shape(name) for name, handle in owner.items()},
            source=self.path,
        )

    def _safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise NpsparseError(f"{index}: invalid index ({err})") from None
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise NpsparseError(f"{index}: shard {missing[0]} is missing")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        if (self.path / "pytorch_model.bin").is_file():
            raise NpsparseError(
                f"{self.path}: only pytorch_model.bin found; npsparse reads safetensors only"
            )
        raise NpsparseError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    @property
    def tokenizer_path(self) -> Path | None:
        """The folder's ``tokenizer.json`` (Path), or None if it has none."""
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None

    @property
    def chat_template(self) -> str | None:
        """The ``chat_template`` (str) of the folder's ``tokenizer_config.json``, or None.

        None also when that file is missing, has no such key or is not valid JSON.
        """
        config = self.path / "tokenizer_config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text()).get("chat_template")
            except ValueError:
                return None
        return None


class HFDirWriter:
    """Write a Hugging Face model directory shard by shard, atomically.

    Everything goes into a temporary sibling folder that is renamed to ``out`` only by
    :meth:`finish`, so an interrupted run leaves no half-written ``out`` behind (use it as a
    context manager: on an exception the temporary folder is removed; one killed outright is
    removed by a later writer, see :func:`partial_folder`). An existing ``out`` is replaced if
    it is empty or an earlier npsparse output (see :func:`check_replaceable`); anything else is
    refused before any work is done. Write errors (disk full, read-only folder) raise a
    one-line :class:`~npsparse.errors.NpsparseError`.

    Parameters
    ----------
    out : str or Path
        Destination folder.

    Raises
    ------
    NpsparseError
        ``out`` exists and may not be replaced, or its parent folder cannot be written.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out).absolute()
        check_replaceable(self.out)
        self.tmp = partial_folder(self.out)
        self.shards: list[tuple[str, list[str]]] = []

    def __enter__(self) -> "HFDirWriter":
        return self

    def __exit__(self, kind, value, trace) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add_shard(self, tensors: dict) -> None:
        """Write one safetensors shard now (so its arrays can be freed).

        The shard goes into the temporary folder as ``shard-0000i.safetensors``; :meth:`finish`
        renames it (``model.safetensors`` if it is the only one, else
        ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``).

        Parameters
        ----------
        tensors : dict of str -> np.ndarray
            Hugging Face names to arrays of any shape; written as contiguous float32 (converted
            if needed).
        """
        name = f"shard-{len(self.shards):05d}.safetensors"
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        self.save_tensors(name, arrays, {"format": "pt"})
        self.shards.append((name, list(arrays)))

    def save_tensors(self, name: str, tensors: dict, metadata: dict) -> None:
        """Write one safetensors file ``name`` into the temporary folder as it is.

        Parameters
        ----------
        name : str
            File name, e.g. ``"npsparse-packed.safetensors"``.
        tensors : dict of str -> np.ndarray
            Contiguous arrays of any dtype safetensors stores.
        metadata : dict of str -> str
            The header's ``__metadata__``.

        Raises
        ------
        NpsparseError
            The file cannot be written (disk full, file-size limit, ...).
        """
        from safetensors.numpy import save_file

        with writing(self.out):
            save_file(tensors, str(self.tmp / name), metadata=metadata)

    def finish(self, config: ModelConfig, *, tokenizer_json: str | None,
               extra_files: dict | None = None, chat_template: str | None = None) -> Path:
        """Name the shards, write config, tokenizer and extra files, and move into place.

        Files written straight into ``self.tmp`` (a packed folder's weights) move along.

        Parameters
        ----------
        config : ModelConfig
            Written as ``config.json``.
        tokenizer_json : str or None
            Serialized ``tokenizers`` tokenizer, written as ``tokenizer.json`` unless None.
        extra_files : dict of str -> str, optional
            Further text files by name (e.g. ``pruning.json``, ``packed.json``).
        chat_template : str, optional
            Stored in ``tokenizer_config.json``, which is always written.

        Returns
        -------
        Path
            ``out``, now complete (an existing ``out`` has been replaced).

        Raises
        ------
        NpsparseError
            A file cannot be written or the folder cannot be renamed into place.
        """
        with writing(self.out):
            return self._finish(config, tokenizer_json, extra_files or {}, chat_template)

    def _finish(self, config, tokenizer_json, extra_files, chat_template) -> Path:
        if len(self.shards) == 1:
            (self.tmp / self.shards[0][0]).rename(self.tmp / "model.safetensors")
        elif self.shards:
            weight_map = {}
            total = len(self.shards)
            for i, (name, tensor_names) in enumerate(self.shards):
                final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                (self.tmp / name).rename(self.tmp / final)
                weight_map.update({t: final for t in tensor_names})
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (self.tmp / "config.json").write_text(config.to_json() + "\n")
        if tokenizer_json is not None:
            (self.tmp / "tokenizer.json").write_text(tokenizer_json)
        tok_config = {"clean_up_tokenization_spaces": False,
                      "tokenizer_class": "PreTrainedTokenizerFast"}
        if chat_template:
            tok_config["chat_template"] = chat_template
        (self.tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        for name, text in extra_files.items():
            (self.tmp / name).write_text(text)
        _default_permissions(self.tmp)
        if self.out.exists():
            old = retired_folder(self.out)
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.out)
        return self.out


def usual_mode(mode: int) -> int:
    """``mode`` with the process umask applied, as ``open``/``mkdir`` would create it.

    ``tempfile`` makes private (0600/0700) files and folders; outputs renamed from them get this
    mode instead.

    Parameters
    ----------
    mode : int
        0o666 for a file, 0o777 for a folder.

    Returns
    -------
    int
    """
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the output the usual umask permissions."""
    folder.chmod(usual_mode(0o777))
    file_mode = usual_mode(0o666)
    for path in folder.iterdir():
        path.chmod(file_mode)


def write_hf_dir(out: str | Path, config: ModelConfig, tensors: dict, *, tokenizer_json: str | None,
                 extra_files: dict | None = None, chat_template: str | None = None) -> Path:
    """Write a Hugging Face model directory (one ``model.safetensors``) atomically.

    Parameters
    ----------
    out : str or Path
        Destination folder; an existing one is replaced if :func:`check_replaceable` allows it.
    config : ModelConfig
        Written as ``config.json``.
    tensors : dict of str -> np.ndarray
        Hugging Face names to arrays, written as float32.
    tokenizer_json : str or None
        Serialized ``tokenizers`` tokenizer, written as ``tokenizer.json``.
    extra_files : dict of str -> str, optional
        Further text files (e.g. ``pruning.json``).
    chat_template : str, optional
        Stored in ``tokenizer_config.json``.
    """
    with HFDirWriter(out) as writer:
        writer.add_shard(tensors)
        return writer.finish(config, tokenizer_json=tokenizer_json, extra_files=extra_files,
                             chat_template=chat_template)
