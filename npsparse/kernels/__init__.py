"""Packed weight formats and their Numba kernels, behind the :mod:`npsparse.linear` seam.

Every packed layer has ``shape == (N, K)``, ``layer(x)`` for ``x [T, K]`` float32 returning
``x @ W.T`` as ``[T, N]`` float32, ``to_dense()``, ``nbytes`` (bytes read per product), and
``to_arrays()`` / :func:`from_arrays` for serialisation without repacking.

==========  =============================================  ==========================
format      arrays                                         bytes/weight (density d)
==========  =============================================  ==========================
dense       float32 weight (:class:`~npsparse.linear.DenseLinear`)   4
bf16        bf16 bits                                      2
csr         values (bf16|fp32) + uint16|int32 cols         (2|4 + 2|4) d
bitmask     1 bit/position + values (bf16|int8+row scale)  1/8 + 2d  (int8: 1/8 + d)
panel       bitmask in 16-row x 2-column words + bf16      1/8 + 2d  (+ 8 bytes per 16 rows)
qpanel      16-row x 4-column words + int8 + group scales  1/8 + d + 4/group (lossy: int8 x, W)
nm          M-N values + ceil(log2 M)-bit positions/group  2:4 bf16: 1.125, 4:8: 1.1875
q8_0        int8 values + float16 scale per 32 (ggml)      1.0625 (lossy unless from a GGUF)
monarch     two block-diagonal factors (fp32|bf16)         (4|2) min(N,K) (N+K) / (b N K)
==========  =============================================  ==========================

``monarch`` (:mod:`.monarch`, ``blocks=b``) is not a mask format: packing projects ``W`` onto
Monarch matrices (lossy, see :mod:`npsparse.monarch`), and ``auto`` never picks it.

``panel`` (:mod:`.panel`) stores what ``bitmask`` stores, laid out for a kernel that computes 16
rows at once. ``auto`` weighs one of the two row-mask layouts, :data:`AUTO_ROW_MASK`, against
bf16, csr and nm: the two read nearly the same bytes, so bytes alone cannot choose between them.

Masks are boolean ``[N, K]`` with True = weight kept. An N:M pattern "2:4" prunes 2 of every 4
consecutive input columns (Wanda/SparseGPT ``prune_n:prune_m``).
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError
from ..linear import DenseLinear
from ..roofline import Bandwidth, measure_read_bandwidth
from ._layer import SCHEMA_VERSION, PackedLinear, check_weight_mask
from ._numba import set_threads
from .bf16 import BF16Linear, bf16_round, from_bf16, to_bf16
from .bitmask import BitmaskLinear
from .csr import CSRLinear, index_dtype
from .monarch import MonarchLinear
from .nm import NMLinear, index_bits, parse_pattern
from .panel import PanelLinear, panel_nbytes
from .qpanel import QPanelLinear
from .q8 import Q8Linear, dequantize_q8_0, q8_0_from_blocks, quantize_q8_0

FORMATS = {"dense": DenseLinear, "bf16": BF16Linear, "csr": CSRLinear, "bitmask": BitmaskLinear,
           "nm": NMLinear, "q8_0": Q8Linear, "monarch": MonarchLinear, "panel": PanelLinear,
           "qpanel": QPanelLinear}
NM_PATTERNS = ("2:4", "4:8")  # patterns choose_format tries
# The bitmask layout choose_format weighs ("panel" or "bitmask"). Both store 1 bit per position
# plus bf16 values (panel: 8 bytes per 16 rows of pointers instead of per row), so which one runs
# faster is a measurement, not a byte count: on Zen 4 panel was faster at every shape and density
# of `npsparse bench kernels` (bench/results/kernel_bench_panel.md, 2026-12-07).
AUTO_ROW_MASK = "panel"
ROW_MASKS = ("bitmask", "panel")


def pack(weight, mask=None, format: str = "auto", **options):
    """Pack a dense weight (times its keep mask) into one of :data:`FORMATS`.

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]`` float32 (other dtypes only if float32 holds the values exactly; monarch
        also takes float64, which it projects as given).
    mask : np.ndarray or None
        ``[N, K]`` bool, True = kept; ``None`` keeps the nonzeros of ``weight``.
    format : str
        ``"auto"`` (:func:`choose_format`), ``"dense"`` (float32), ``"bf16"``, ``"csr"``,
        ``"bitmask"``, ``"panel"``, ``"nm"``, ``"q8_0"`` (lossy: int8 per 32, see :mod:`.q8`) or
        ``"monarch"`` (lossy: the projection, see :mod:`.monarch`).
    **options
        ``values=`` ("bf16" | "fp32" for csr and monarch | "int8" for bitmask/nm),
        ``pattern=`` ("2:4", "4:8", ... for nm) and ``blocks=`` (monarch).

    Returns
    -------
    layer
        A :class:`~npsparse.linear.Linear` (``DenseLinear`` or a packed layer).
    """
    if format == "auto":
        if options:
            raise NpsparseError(f"format='auto' takes no options, got {sorted(options)}")
        format, options = choose_format(weight, mask)
    if format not in FORMATS:
        raise NpsparseError(f"unknown weight format {format!r}; choose from "
                            f"{', '.join(['auto', *FORMATS])}")
    if format == "dense":
        if options:
            raise NpsparseError(f"format='dense' takes no options, got {sorted(options)}")
        weight, keep = check_weight_mask(weight, mask)
        return DenseLinear(np.where(keep, weight, np.float32(0.0)))
    try:
        return FORMATS[format].pack(weight, mask, **options)
    except TypeError as error:  # an option this format does not have
        raise NpsparseError(f"format {format!r}: {error}") from None


def packed_nbytes(weight, mask=None, row_mask: str | None = None) -> dict[tuple[str, str], int]:
    """Bytes each lossless-to-bf16 candidate format would read, keyed (format, pattern or "").

    Every candidate stores bf16 values, so all of them give the same product; only the bytes
    differ. Row pointers count 8 bytes per row plus one (panel: per 16 rows plus one).

    Parameters
    ----------
    weight : array-like
        ``W [N, K]`` float32 (or exactly convertible).
    mask : array-like or None
        ``[N, K]`` bool, True = kept; ``None`` keeps the nonzeros of ``weight``.
    row_mask : {"panel", "bitmask"}, optional
        The bitmask layout to weigh; default :data:`AUTO_ROW_MASK`.

    Returns
    -------
    dict of (str, str) to int
        ``("bf16", "")`` (dense, ignores the mask), ``("csr", "")`` and ``(row_mask, "")``
        always; ``("nm", pattern)`` for each pattern of :data:`NM_PATTERNS` whose ``M`` divides
        ``K`` and that the mask fits (no group of ``M`` keeps more than ``M - N``).

    Raises
    ------
    NpsparseError
        A weight/mask shape or dtype problem, or a ``row_mask`` not in :data:`ROW_MASKS`.
    """
    row_mask = AUTO_ROW_MASK if row_mask is None else row_mask
    if row_mask not in ROW_MASKS:
        raise NpsparseError(f"row_mask must be one of {', '.join(ROW_MASKS)}, got {row_mask!r}")
    weight, keep = check_weight_mask(weight, mask)
    rows, k_cols = weight.shape
    nnz = int(keep.sum())
    row_ptr = 8 * (rows + 1)
    sizes = {
        ("bf16", ""): 2 * rows * k_cols,
        ("csr", ""): nnz * (2 + np.dtype(index_dtype(k_cols)).itemsize) + row_ptr,
    }
    if row_mask == "panel":
        sizes[("panel", "")] = panel_nbytes(rows, k_cols, nnz)
    else:
        sizes[("bitmask", "")] = 4 * rows * ((k_cols + 31) // 32) + 2 * nnz + row_ptr
    for pattern in NM_PATTERNS:
        n, m = parse_pattern(pattern)
        if k_cols % m:
            continue
        if (keep.reshape(rows, k_cols // m, m).sum(axis=2) > m - n).any():
            continue
        stored = rows * (k_cols // m) * (m - n)
        sizes[("nm", pattern)] = 2 * stored + rows * ((stored // rows * index_bits(m) + 7) // 8)
    return sizes


def choose_format(weight, mask=None, row_mask: str | None = None) -> tuple[str, dict]:
    """The format (with options) that reads the fewest bytes, all with bf16 values.

    int8 values are never chosen here: they change the weights (see :mod:`.bitmask`). Of the
    two bitmask layouts only ``row_mask`` is weighed (see :data:`AUTO_ROW_MASK`).

    Parameters
    ----------
    weight : np.ndarray
        ``W [N, K]`` float32.
    mask : np.ndarray or None
        ``[N, K]`` bool, True = kept; ``None`` keeps the nonzeros.
    row_mask : {"panel", "bitmask"}, optional
        Default :data:`AUTO_ROW_MASK`.

    Returns
    -------
    (format, options) : tuple of str and dict
        Arguments for :func:`pack`, e.g. ``("nm", {"pattern": "2:4", "values": "bf16"})``.
    """
    sizes = packed_nbytes(weight, mask, row_mask)
    (format, pattern), _ = min(sizes.items(), key=lambda item: item[1])
    if format == "bf16":
        return "bf16", {}
    if format == "nm":
        return "nm", {"pattern": pattern, "values": "bf16"}
    return format, {"values": "bf16"}


def to_arrays(layer) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Flat named arrays plus string metadata for any layer :func:`pack` returns.

    Parameters
    ----------
    layer : DenseLinear or packed layer

    Returns
    -------
    arrays : dict of str to np.ndarray
    metadata : dict of str to str
        ``format``, ``shape`` ("N,K"), ``schema`` and the format's options.
    """
    if isinstance(layer, DenseLinear):
        return ({"weight": layer.weight},
                {"format": "dense", "shape": f"{layer.shape[0]},{layer.shape[1]}",
                 "schema": str(SCHEMA_VERSION)})
    return layer.to_arrays()


def from_arrays(arrays: dict[str, np.ndarray], metadata: dict[str, str]):
    """Rebuild a layer from :func:`to_arrays` output, without repacking or copying.

    Parameters
    ----------
    arrays : dict of str to np.ndarray
        May be read-only / memory-mapped.
    metadata : dict of str to str

    Returns
    -------
    layer
    """
    format = metadata.get("format")
    if format not in FORMATS:
        raise NpsparseError(f"unknown weight format {format!r} in metadata; expected one of "
                            f"{', '.join(FORMATS)}")
    if metadata.get("schema") != str(SCHEMA_VERSION):
        raise NpsparseError(f"packed {format} layer has schema {metadata.get('schema')!r}; this "
                            f"npsparse reads schema {SCHEMA_VERSION}")
    if format == "dense":
        return DenseLinear(arrays["weight"])
    layer = FORMATS[format].from_arrays(arrays, metadata)
    if "shape" in metadata:
        n_rows, k_cols = (int(s) for s in metadata["shape"].split(","))
        if layer.shape != (n_rows, k_cols):
            raise NpsparseError(f"packed {format} arrays have shape {layer.shape}, metadata says "
                                f"{(n_rows, k_cols)}")
    return layer


__all__ = [
    "AUTO_ROW_MASK", "FORMATS", "ROW_MASKS", "Bandwidth", "BF16Linear", "BitmaskLinear",
    "CSRLinear", "MonarchLinear",
    "NMLinear", "PackedLinear", "PanelLinear", "Q8Linear", "bf16_round", "choose_format",
    "dequantize_q8_0", "from_arrays", "from_bf16", "measure_read_bandwidth", "pack", "packed_nbytes",
    "q8_0_from_blocks", "quantize_q8_0", "set_threads", "to_arrays", "to_bf16",
]
