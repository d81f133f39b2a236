"""Packed model folders: a model saved with its linear layers already in a kernel format.

``npsparse pack MODEL --format F --out DIR`` writes DIR with ``config.json``, the tokenizer files,
``packed.json`` (what was packed, how, and how many bytes a token reads) and one safetensors file,
``npsparse-packed.safetensors``. That file holds every tensor the forward pass needs:

- each block linear layer (and the output head, unless it stays float32) as the arrays of its
  packed format, under ``<tensor name>::<array name>`` (``model.layers.0.mlp.up_proj.weight::bits``);
  the header's metadata maps each tensor name to its format, shape and options (``layers``) and
  carries the folder schema (``npsparse_packed``);
- everything else (embeddings, norms, biases) as float32 under its Hugging Face name, except a
  tied embedding table that a Q8_0 head holds exactly (the GGUF's own blocks): it is not stored
  twice; the header's ``embedding_from`` names the head, and loading dequantizes it from there.

Loading DIR (``npsparse.load(DIR)``, any CLI command) memory-maps that file and rebuilds each layer
with :func:`npsparse.kernels.from_arrays` over views of it: nothing is repacked and no dense copy is
made. :func:`npsparse.load` then copies the block layers' arrays, as stored, into the decode arena
(:mod:`npsparse.arena`: huge pages, q/k/v and gate/up stacked). Writing is atomic (temporary
folder, then rename). transformers cannot read such a folder; pruned models for other tools are
the plain folders ``npsparse prune`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import NpsparseError
from .hf_dir import HFCheckpoint, HFDirWriter, SafetensorsFile
from .weights import Weights

PACKED_FILE = "npsparse-packed.safetensors"
FOLDER_SCHEMA = 1
HEAD_NAME = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"


def is_packed_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder written by :func:`save_packed`.

    Parameters
    ----------
    path : str or Path
        Any path; a plain file or a missing path gives False.

    Returns
    -------
    bool
        Whether ``path`` holds ``npsparse-packed.safetensors`` (its contents are not checked).
    """
    return (Path(path) / PACKED_FILE).is_file()


def save_packed(llm, out: str | Path, info: dict | None = None,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write ``llm`` (already packed with :func:`npsparse.packing.apply_format`) to folder ``out``.

    Parameters
    ----------
    llm : LLM
        A loaded model whose layers are in the formats to save (dense ones are saved float32).
    out : str or Path
        Destination folder; an existing earlier output is replaced atomically, any other
        existing folder refused (:func:`npsparse.io.hf_dir.check_replaceable`).
    info : dict, optional
        Extra fields for ``packed.json`` (e.g. the ``apply_format`` report).
    extra_files : dict of str -> str, optional
        More text files for the folder by name (a fine-tuned Monarch model's
        ``finetune.json``).

    Returns
    -------
    Path
    """
    from ..kernels import to_arrays
    from ..linear import DenseLinear

    model = llm.model
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}

    def add_layer(name: str, layer, hf_shape) -> None:
        arrays, metadata = to_arrays(layer)
        layers[name] = {**metadata, "hf_shape": [int(s) for s in hf_shape]}
        for key, array in arrays.items():
            tensors[f"{name}::{key}"] = np.ascontiguousarray(array)

    linears = model.linears()
    for i, block in enumerate(model.blocks):
        prefix = model.block_prefix(i) + "."
        for name, array in block.state().items():  # dense views of the linears are dropped below
            full = prefix + name
            layer = linears.get(full[: -len(".weight")]) if full.endswith(".weight") else None
            if layer is None:
                tensors[full] = np.ascontiguousarray(array, dtype=np.float32)
            else:
                add_layer(full, layer, array.shape)
    outer = model.outer_state()
    embed_in_head = _embedding_in_head(model, outer)
    for name, array in outer.items():
        if name != HEAD_NAME and not (name == EMBED_NAME and embed_in_head):
            tensors[name] = np.ascontiguousarray(array, dtype=np.float32)
    if not isinstance(model.head, DenseLinear):
        add_layer(HEAD_NAME, model.head, model.head.shape)
    elif HEAD_NAME in outer:
        tensors[HEAD_NAME] = np.ascontiguousarray(outer[HEAD_NAME], dtype=np.float32)

    report = {"npsparse_packed": FOLDER_SCHEMA, "source": str(llm.path),
              "weight_bytes_per_token": model.weight_bytes(),
              "formats": _count(layers), **(info or {})}
    metadata = {"npsparse_packed": str(FOLDER_SCHEMA), "layers": json.dumps(layers)}
    if embed_in_head:
        metadata["embedding_from"] = HEAD_NAME
    tokenizer = llm.tokenizer
    with HFDirWriter(out) as writer:
        writer.save_tensors(PACKED_FILE, tensors, metadata)
        return writer.finish(llm.config, tokenizer_json=tokenizer.to_json(),
                             chat_template=tokenizer.chat_template,
                             extra_files={"packed.json": json.dumps(report, indent=1) + "\n",
                                          **(extra_files or {})})


def _embedding_in_head(model, outer: dict) -> bool:
    """Whether the tied embedding table equals the (Q8_0) head's values exactly."""
    from ..kernels import Q8Linear

    if not (model.config.tie_embeddings and isinstance(model.head, Q8Linear)):
        return False
    embed = outer.get(EMBED_NAME)
    return embed is not None and np.array_equal(model.head.to_dense(), embed)


def _count(layers: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for meta in layers.values():
        counts[meta["format"]] = counts.get(meta["format"], 0) + 1
    return counts


class PackedWeights(Weights):
    """The float32 tensors of a packed folder, plus its packed layers under their tensor names.

    ``get_checked(name, shape)`` returns a packed layer (a :class:`~npsparse.linear.Linear`) for
    a packed tensor name, after checking the shape the checkpoint tensor had (``hf_shape``).
    ``embedding_from`` names a packed head whose values are the embedding table (float32).
    """

    def __init__(self, handle: SafetensorsFile, layers: dict[str, dict], source: Path,
                 embedding_from: str | None = None):
        self.handle = handle
        self.layers = layers
        self.embedding_from = embedding_from
        plain = [n for n in handle.entries if "::" not in n]
        shapes = {n: handle.shape(n) for n in plain}
        shapes.update({n: tuple(meta["hf_shape"]) for n, meta in layers.items()})
        if embedding_from is not None:
            plain.append(EMBED_NAME)
            shapes[EMBED_NAME] = tuple(layers[embedding_from]["hf_shape"])
        super().__init__(plain + list(layers), self._load, shapes, source)

    def _load(self, name: str):
        if name in self.layers:
            return self.layer(name)
        if name == EMBED_NAME and self.embedding_from is not None:
            return self.layer(self.embedding_from).to_dense()  # [V, D] float32, exact
        return self.handle.load(name)

    def layer(self, name: str):
        """The packed layer stored under tensor name ``name``, over memory-mapped arrays.

        Parameters
        ----------
        name : str
            A key of :attr:`layers`, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

        Returns
        -------
        Linear
            A kernel-format layer of shape ``[N, K]`` rebuilt by
            :func:`npsparse.kernels.from_arrays` over read-only views of the file: nothing is
            repacked or copied.

        Raises
        ------
        NpsparseError
            If the stored arrays and metadata do not make a valid layer (unknown format or
            schema, wrong shape); the message names the folder and ``name``.
        """
        from ..kernels import from_arrays

        meta = self.layers[name]
        prefix = name + "::"
        arrays = {key[len(prefix):]: self.handle.raw(key) for key in self.handle.entries
                  if key.startswith(prefix)}
        metadata = {k: v for k, v in meta.items() if k != "hf_shape"}
        try:
            return from_arrays(arrays, metadata)
        except NpsparseError as err:
            raise NpsparseError(f"{self.source}: {name}: {err}") from None

    def get_checked(self, name: str, shape: tuple):
        """The packed layer or float32 tensor ``name``, after checking the shape it had.

        Parameters
        ----------
        name : str
            Hugging Face tensor name.
        shape : tuple of int
            Expected shape of the checkpoint tensor, e.g. ``(N, K)``; for a packed layer it is
            compared with the stored ``hf_shape``.

        Returns
        -------
        Linear or np.ndarray
            For a packed name the layer (see :meth:`layer`); otherwise the float32 array, as
            :meth:`Weights.get_checked` returns it.

        Raises
        ------
        NpsparseError
            If a packed layer's shape differs, or as :meth:`layer` and
            :meth:`Weights.get_checked` raise.
        """
        if name in self.layers:
            have = tuple(self.layers[name]["hf_shape"])
            if have != tuple(shape):
                raise NpsparseError(f"{self.source}: packed layer {name} has shape {list(have)}, "
                                    f"expected {list(shape)}")
            return self.layer(name)
        return super().get_checked(name, shape)


class PackedCheckpoint(HFCheckpoint):
    """A folder written by :func:`save_packed`, opened for reading (see the module docstring).

    ``weights`` is a :class:`PackedWeights`; ``head`` is the packed output head, or None when the
    head was saved float32.
    """

    def _safetensors_files(self) -> list[Path]:
        return []  # the packed file is opened below, with its integer arrays allowed

    def __init__(self, path: str | Path):
        super().__init__(path)
        handle = SafetensorsFile(self.path / PACKED_FILE, raw=True)
        schema = handle.metadata.get("npsparse_packed")
        if schema != str(FOLDER_SCHEMA):
            raise NpsparseError(f"{self.path}: packed folder schema {schema!r}; this npsparse "
                                f"reads schema {FOLDER_SCHEMA}")
        try:
            layers = json.loads(handle.metadata.get("layers", "{}"))
        except ValueError as err:
            raise NpsparseError(f"{self.path}: corrupt packed layer table ({err})") from None
        _check_layer_table(layers, self.path)
        embedding_from = handle.metadata.get("embedding_from")
        if embedding_from is not None and (embedding_from not in layers
                                           or EMBED_NAME in handle.entries):
            raise NpsparseError(f"{self.path}: the embedding is said to come from "
                                f"{embedding_from!r}, which is not a packed layer of the folder "
                                "(or the embedding is stored as well)")
        self.files = {PACKED_FILE: handle}
        self.weights = PackedWeights(handle, layers, self.path, embedding_from)
        self.head = self.weights.layer(HEAD_NAME) if HEAD_NAME in layers else None
        if self.head is not None and self.head.shape[0] != self.config.vocab_size:
            raise NpsparseError(f"{self.path}: packed output head has {self.head.shape[0]} rows, "
                                f"the vocabulary {self.config.vocab_size}")


def _check_layer_table(layers, path: Path) -> None:
    """Each entry: a dict whose ``shape`` ("N,K") and ``hf_shape`` agree (GPT-2's Conv1D stores
    its weight as ``[K, N]``, so either order)."""
    if not isinstance(layers, dict):
        raise NpsparseError(f"{path}: corrupt packed layer table (not a JSON object)")
    for name, meta in layers.items():
        try:
            shape = [int(s) for s in meta["shape"].split(",")]
            hf_shape = [int(s) for s in meta["hf_shape"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise NpsparseError(f"{path}: corrupt packed layer table entry {name} (it needs "
                                "shape 'N,K' and hf_shape [N, K])") from None
        if len(shape) != 2 or hf_shape not in (shape, shape[::-1]) or min(shape) < 1:
            raise NpsparseError(f"{path}: packed layer {name} has shape {shape} and hf_shape "
                                f"{hf_shape}; they must hold the same two sizes")
