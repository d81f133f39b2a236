"""What every packed format shares: input checks, the seam call, and array serialisation.

A packed layer is a small object holding a few named NumPy arrays. ``to_arrays()`` returns them
with string metadata (format, shape, schema version, options) that fits a safetensors header;
``from_arrays()`` rebuilds the layer from exactly those arrays without repacking, so memory-mapped
arrays stay memory-mapped.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError

SCHEMA_VERSION = 1


def as_float32(a, what: str) -> np.ndarray:
    """``a`` as float32, refusing conversions that would change a value (float64 0.1, say).

    Parameters
    ----------
    a : array-like
        Float, integer or boolean values.
    what : str
        Name used in the error message.

    Returns
    -------
    np.ndarray
        float32 (``a`` itself when it already is).

    Raises
    ------
    NpsparseError
        For non-numeric dtypes, or values float32 cannot hold exactly.
    """
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind not in "fiub":
        raise NpsparseError(f"{what} has dtype {a.dtype}; expected float32")
    if np.can_cast(a.dtype, np.float32, casting="safe"):
        return a.astype(np.float32)
    converted = a.astype(np.float32)
    same = converted.astype(a.dtype) == a
    if a.dtype.kind == "f":
        same |= np.isnan(a)
    if not np.all(same):
        raise NpsparseError(f"{what} has dtype {a.dtype} with values float32 cannot hold exactly; "
                            "convert it to float32 first")
    return converted


def check_weight_mask(weight, mask) -> tuple[np.ndarray, np.ndarray]:
    """Validate a weight and its keep mask for packing.

    Parameters
    ----------
    weight : array-like
        ``[N, K]``, float32 or exactly convertible to it.
    mask : array-like or None
        ``[N, K]`` bool or 0/1, True = kept; ``None`` keeps the nonzeros of ``weight``.

    Returns
    -------
    weight : np.ndarray
        ``[N, K]`` float32, C-contiguous.
    keep : np.ndarray
        ``[N, K]`` bool, C-contiguous.
    """
    weight = as_float32(weight, "weight")
    if weight.ndim != 2:
        raise NpsparseError(f"weight must be 2-D [N, K], got shape {weight.shape}")
    if mask is None:
        keep = weight != 0
    else:
        mask = np.asarray(mask)
        if mask.shape != weight.shape:
            raise NpsparseError(f"mask shape {mask.shape} does not match weight shape "
                                f"{weight.shape}")
        if mask.dtype == np.bool_:
            keep = mask
        elif mask.dtype.kind in "iuf" and np.all((mask == 0) | (mask == 1)):
            keep = mask != 0
        else:
            raise NpsparseError(f"mask has dtype {mask.dtype} with values other than 0/1; "
                                "pass a boolean mask (True = weight kept)")
    return np.ascontiguousarray(weight), np.ascontiguousarray(keep)


def check_x(x, k: int) -> np.ndarray:
    """Validate the activations of a product.

    Parameters
    ----------
    x : array-like
        ``[T, K]``, or ``[K]`` (one token).
    k : int
        The layer's input width ``K``.

    Returns
    -------
    np.ndarray
        ``[T, K]`` float32, C-contiguous (``x`` itself when it already is).
    """
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == k
            and x.flags.c_contiguous):  # the usual case, once per product in decode: no work
        return x
    x = as_float32(x, "x")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != k:
        raise NpsparseError(f"x has shape {x.shape}; expected [T, {k}]")
    return np.ascontiguousarray(x)


def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad activations on the right to a kernel's column multiple.

    Parameters
    ----------
    x : np.ndarray
        ``[T, K]`` float32.
    width : int
        ``>= K``.

    Returns
    -------
    np.ndarray
        ``[T, width]`` float32; ``x`` itself if ``width == K``.
    """
    if x.shape[1] == width:
        return x
    padded = np.zeros((x.shape[0], width), dtype=np.float32)
    padded[:, : x.shape[1]] = x
    return padded


def row_pointers(counts: np.ndarray) -> np.ndarray:
    """Start of each row's entries, and the total: ``[0, c0, c0 + c1, ...]``, [N+1] int64.

    Parameters
    ----------
    counts : np.ndarray
        ``[N]`` integers, the number of stored entries of each row.
    """
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def pack_words(bits: np.ndarray, width: int) -> np.ndarray:
    """Bits along the last axis -> one unsigned word each: ``[..., width]`` bool -> ``[...]``.

    Parameters
    ----------
    bits : np.ndarray
        ``[..., width]`` bool; ``bits[..., i]`` becomes bit ``i`` of its word.
    width : int
        32 or 64.

    Returns
    -------
    np.ndarray
        ``[...]`` uint32 or uint64 (native byte order).
    """
    as_bytes = np.packbits(bits, axis=-1, bitorder="little")  # [..., width / 8]
    little = np.ascontiguousarray(as_bytes).view(f"<u{width // 8}")
    return little.reshape(bits.shape[:-1]).astype(np.dtype(f"uint{width}"))


def unpack_words(words: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_words`: ``[...]`` words -> ``[..., width]`` bool.

    Parameters
    ----------
    words : np.ndarray
        uint32 or uint64 words.
    width : int
        Their width in bits, 32 or 64.

    Returns
    -------
    np.ndarray
        ``[..., width]`` bool, bit ``i`` of each word at index ``i``.
    """
    little = np.ascontiguousarray(words.astype(f"<u{width // 8}"))
    as_bytes = little.view(np.uint8).reshape(*words.shape, width // 8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little").astype(np.bool_)


def check_option(value, allowed, what: str) -> None:
    """One-line error unless ``value`` is a key of ``allowed`` (a format's option table).

    Parameters
    ----------
    value
        The option given (``values="int8"``, say).
    allowed : dict or set
        The accepted settings.
    what : str
        Its name in the message (``"bitmask values"``).

    Raises
    ------
    NpsparseError
        ``"<what> must be one of [...], got <value>"``.
    """
    if value not in allowed:
        raise NpsparseError(f"{what} must be one of {sorted(allowed)}, got {value!r}")


def check_arrays(arrays: dict, expected: dict[str, tuple[np.dtype, int]], fmt: str) -> None:
    """Check a packed layer's arrays before rebuilding it.

    Parameters
    ----------
    arrays : dict of str to np.ndarray
    expected : dict of str to (dtype, int)
        Required array names with their dtype and number of dimensions.
    fmt : str
        Format name for the error message.

    Raises
    ------
    NpsparseError
        One line naming the first missing or mistyped array.
    """
    for name, (dtype, ndim) in expected.items():
        if name not in arrays:
            raise NpsparseError(f"{fmt} layer needs array {name!r}; got {sorted(arrays)}")
        a = arrays[name]
        if a.dtype != dtype or a.ndim != ndim:
            raise NpsparseError(f"{fmt} array {name!r} must be {ndim}-D {np.dtype(dtype)}, "
                                f"got {a.ndim}-D {a.dtype}")


def check_shapes(arrays: dict, shapes: dict[str, tuple[int, ...]], fmt: str) -> None:
    """Check that each named array has exactly the shape the layer's size implies.

    Parameters
    ----------
    arrays : dict of str to np.ndarray
    shapes : dict of str to tuple of int
        Expected shape of each name to check.
    fmt : str
        Format name for the error message.

    Raises
    ------
    NpsparseError
        One line naming the first array of another shape.
    """
    for name, shape in shapes.items():
        if arrays[name].shape != tuple(shape):
            raise NpsparseError(f"{fmt} array {name!r} has shape {list(arrays[name].shape)}, "
                                f"expected {list(shape)}")


def check_row_pointers(row_ptr: np.ndarray, rows: int, nnz: int, fmt: str) -> None:
    """Check CSR-style row starts: ``[0, ..., nnz]``, ``rows + 1`` of them, never decreasing.

    The kernels index the value (and column) arrays with them unchecked, so one out of range
    reads outside the arrays (a crash, or garbage).

    Parameters
    ----------
    row_ptr : np.ndarray
        ``[rows + 1]`` int64.
    rows : int
        Number of rows ``N``.
    nnz : int
        Length of the value array.
    fmt : str
        Format name for the error message.

    Raises
    ------
    NpsparseError
        One line saying what is wrong.
    """
    if row_ptr.shape != (rows + 1,):
        raise NpsparseError(f"{fmt} array 'row_ptr' has shape {list(row_ptr.shape)}, expected "
                            f"[{rows + 1}]")
    if row_ptr[0] != 0 or row_ptr[-1] != nnz:
        raise NpsparseError(f"{fmt} array 'row_ptr' runs from {row_ptr[0]} to {row_ptr[-1]}; "
                            f"it must run from 0 to the {nnz} stored values")
    if np.any(row_ptr[1:] < row_ptr[:-1]):
        raise NpsparseError(f"{fmt} array 'row_ptr' decreases; row starts must not decrease")


class PackedLinear:
    """Base of the packed formats: the :class:`npsparse.linear.Linear` seam plus serialisation.

    Subclasses set ``FORMAT``, hold their arrays in ``self.arrays`` and implement ``_matmul``
    (fast kernels), ``matmul_naive`` (the reference), ``to_dense`` and ``_options``.
    """

    FORMAT = ""
    STACKABLE = True  # two layers' arrays concatenated are the layer of their stacked rows
    POINTER = "row_ptr"  # the array of starts that stacking offsets (npsparse.arena)
    ROW_BLOCK = 1  # parts stack only if each one but the last has a multiple of this many rows
    TRAINABLE = False  # fine-tuning trains its arrays (parameters(), backward(d_y, x))

    def __init__(self, arrays: dict[str, np.ndarray], shape: tuple[int, int]):
        self.arrays = arrays
        self.shape = (int(shape[0]), int(shape[1]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``y [T, N] = x [T, K] @ W.T`` in float32 with the fast kernels."""
        return self._matmul(check_x(x, self.shape[1]))

    def matmul_naive(self, x: np.ndarray) -> np.ndarray:
        """The same product as ``__call__``, computed by the plain reference kernel.

        A scalar loop over the stored format, written to be read, not to be fast: the oracle
        the fast kernels are tested against, and their fallback for shapes they do not take.

        Parameters
        ----------
        x : np.ndarray
            ``[T, K]`` float32.

        Returns
        -------
        np.ndarray
            ``[T, N]`` float32.
        """
        raise NotImplementedError

    def _matmul(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_dense(self) -> np.ndarray:
        """The weight this layer multiplies by, unpacked.

        Returns
        -------
        np.ndarray
            ``W [N, K]`` float32, zeros where nothing is stored; values as stored (bf16 values
            widened exactly, int8 values times their row scale).
        """
        raise NotImplementedError

    def _options(self) -> dict[str, str]:
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes of packed arrays read per product (all of them)."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def nnz(self) -> int:
        """Number of stored values (kept weights, plus N:M fillers where a group keeps fewer)."""
        raise NotImplementedError

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Flat ``{name: array}`` plus string metadata (``format``, ``shape``, ``schema``, options).

        Returns
        -------
        arrays : dict of str to np.ndarray
            The packed arrays themselves (not copies).
        metadata : dict of str to str
            Enough to rebuild the layer with :func:`npsparse.kernels.from_arrays`.
        """
        metadata = {"format": self.FORMAT, "shape": f"{self.shape[0]},{self.shape[1]}",
                    "schema": str(SCHEMA_VERSION)}
        metadata.update(self._options())
        return dict(self.arrays), metadata

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], metadata: dict[str, str]):
        """Rebuild a layer from :meth:`to_arrays` output, without copying or repacking.

        Parameters
        ----------
        arrays : dict of str to np.ndarray
            The format's arrays (read-only, memory-mapped arrays are fine).
        metadata : dict of str to str
            At least ``shape`` (``"N,K"``) and the format's options.

        Returns
        -------
        PackedLinear

        Raises
        ------
        NpsparseError
            If an array is missing or has the wrong dtype or rank, or an option is unknown.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self._options().items())
        return (f"{type(self).__name__}(shape={self.shape}{options}, "
                f"{self.nbytes / (self.shape[0] * self.shape[1]):.3f} bytes/weight)")
