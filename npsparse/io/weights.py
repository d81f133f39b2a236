"""A flat, lazily loaded mapping of Hugging Face tensor names to float32 arrays (or, in a packed
folder, to the packed layers of its packed tensors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import NpsparseError


class Weights(Mapping):
    """Read-only ``name -> float32 array`` mapping; each tensor is read when first asked for.

    The exception is a packed folder's mapping (:class:`npsparse.io.packed.PackedWeights`), and
    a :class:`DictWeights` given layers (training a Monarch folder): there a packed tensor's name
    gives its packed layer (a :class:`~npsparse.linear.Linear` with ``to_dense()``), which is
    what the models are built from; use ``.layers`` to tell them apart.
    Nothing is cached here: a model keeps the arrays it builds, and a pruning driver can stream
    one block at a time from a memory-mapped checkpoint without holding the rest.

    Parameters
    ----------
    names : list of str
        Tensor names (Hugging Face convention).
    loader : callable
        ``loader(name) -> np.ndarray`` float32, possibly a read-only memory-mapped view.
    shapes : dict
        Shape of every tensor, known without reading it.
    source : Path
        The file or folder, named in error messages.
    """

    def __init__(self, names: list[str], loader: Callable[[str], np.ndarray], shapes: dict,
                 source: Path):
        self._names = list(names)
        self._set = set(self._names)
        self._loader = loader
        self.shapes = dict(shapes)
        self.source = Path(source)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._set:
            raise NpsparseError(f"{self.source}: tensor {name} is missing")
        return self._loader(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._set

    def get_checked(self, name: str, shape: tuple) -> np.ndarray:
        """The tensor ``name``, after checking it exists and has ``shape``.

        The values are checked too (all finite), which reads the whole tensor.

        Parameters
        ----------
        name : str
            Hugging Face tensor name.
        shape : tuple of int
            Expected shape, e.g. ``(N, K)`` for a linear weight or ``(V, D)`` for the embedding
            table.

        Returns
        -------
        np.ndarray
            float32 of ``shape``, as the loader gives it (possibly a read-only memory-mapped
            view).

        Raises
        ------
        NpsparseError
            If the tensor is missing, has another shape, or holds NaN or infinite values.
        """
        if name not in self._set:
            raise NpsparseError(f"{self.source}: tensor {name} is missing")
        have = tuple(self.shapes[name])
        if have != tuple(shape):
            raise NpsparseError(
                f"{self.source}: tensor {name} has shape {list(have)}, expected {list(shape)}"
            )
        array = self._loader(name)
        if not np.all(np.isfinite(array)):
            raise NpsparseError(f"{self.source}: tensor {name} contains NaN or infinite values")
        return array


class DictWeights(Weights):
    """A :class:`Weights` over arrays already in memory (tests, pruned models, training).

    Like a packed folder's mapping it may also hold layer objects (a Monarch model's trainable
    layers), listed in ``layers`` and returned as they are.

    Parameters
    ----------
    arrays : Mapping of str -> np.ndarray or layer
        Tensors by Hugging Face name; arrays are converted to ``dtype`` (not copied if they
        already are), layers (objects with ``to_dense``, ``shape`` ``(N, K)``) kept as given.
    source : str or Path
        Named in error messages.
    dtype : numpy dtype
        float32, or float64 for gradient checks.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str | Path = "<memory>",
                 dtype=np.float32):
        arrays = {k: v if hasattr(v, "to_dense") else np.asarray(v, dtype=dtype)
                  for k, v in arrays.items()}
        self.layers = {k: v for k, v in arrays.items() if not isinstance(v, np.ndarray)}
        super().__init__(
            names=list(arrays),
            loader=arrays.__getitem__,
            shapes={k: tuple(v.shape) for k, v in arrays.items()},
            source=Path(source),
        )

    def get_checked(self, name: str, shape: tuple):
        """The array (checked as :meth:`Weights.get_checked` does) or layer ``name``."""
        if name in self.layers:
            if tuple(self.layers[name].shape) != tuple(shape):
                raise NpsparseError(f"{self.source}: layer {name} has shape "
                                    f"{list(self.layers[name].shape)}, expected {list(shape)}")
            return self.layers[name]
        return super().get_checked(name, shape)
