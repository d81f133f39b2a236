"""Calibration token windows: from the default text, any UTF-8 file, or a pinned ``.npy`` array.

Text is tokenized and ``nsamples`` windows of ``seqlen`` tokens are drawn at random start positions
(``numpy.random.default_rng(seed)``, overlaps allowed, as the references' samplers allow). A
``.npy`` int array of shape ``[nsamples, seqlen]`` is used exactly as given, which makes calibration
reproducible across implementations. A named text's calibration part is disjoint from its eval
part (see :mod:`npsparse.data`). A mix of named texts (``"pydoc+stdlib"``) draws a near-equal share
of the windows from each, with the one generator in the mix's order, and interleaves them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import domains, interleave, read_text
from .errors import NpsparseError

NSAMPLES = 32  # calibration windows drawn from a text source unless told otherwise
SEQLEN = 512  # and their length in tokens


def calibration_shape(source: str | Path, nsamples: int | None = None,
                      seqlen: int | None = None) -> tuple[int, int]:
    """The ``(nsamples, seqlen)`` that calibrating on ``source`` uses.

    For a text source, the values given, or :data:`NSAMPLES` and :data:`SEQLEN`. A ``.npy`` file
    fixes both by its shape, and a given value that disagrees with it is an error rather than
    silently ignored. Reads only the array's header, so settings can be checked before a model
    loads.

    Parameters
    ----------
    source : str or Path
        As :func:`calibration_windows`.
    nsamples, seqlen : int, optional
        Explicit values (None: the default, or the file's own).

    Returns
    -------
    (int, int)

    Raises
    ------
    NpsparseError
        An explicit value disagrees with a ``.npy`` file's shape.
    """
    if not str(source).endswith(".npy"):
        domains(source)  # refuses a mix of anything but named texts
        return nsamples or NSAMPLES, seqlen or SEQLEN
    try:
        shape = np.load(source, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError):  # calibration_windows words an unreadable file itself
        return nsamples or NSAMPLES, seqlen or SEQLEN
    if len(shape) != 2:
        return nsamples or NSAMPLES, seqlen or SEQLEN
    for what, given, actual in (("nsamples", nsamples, shape[0]), ("seqlen", seqlen, shape[1])):
        if given is not None and given != actual:
            raise NpsparseError(f"{source} holds {shape[0]} windows of {shape[1]} tokens, so "
                                f"{what} {given} cannot apply (leave it out)")
    return int(shape[0]), int(shape[1])


def calibration_windows(source: str | Path, tokenizer, vocab_size: int, *,
                        nsamples: int | None = None, seqlen: int | None = None,
                        seed: int = 0) -> np.ndarray:
    """Token windows to calibrate on.

    Parameters
    ----------
    source : str or Path
        A named text (``"pydoc"``, ``"stdlib"``: its calibration part), a mix of them
        (``"pydoc+stdlib"``: :func:`shares` of ``nsamples`` from each, interleaved), a UTF-8
        text file, or a ``.npy`` file holding an integer array ``[nsamples, seqlen]``.
    tokenizer : Tokenizer
        Used for text sources.
    vocab_size : int
        Token ids must be below this.
    nsamples, seqlen : int, optional
        Number of windows and their length (defaults :data:`NSAMPLES`, :data:`SEQLEN`; a
        ``.npy`` file's own shape, which an explicit value must match).
    seed : int
        The sampler's seed (text sources only).

    Returns
    -------
    np.ndarray
        ``[nsamples, seqlen]`` int64.
    """
    nsamples, seqlen = calibration_shape(source, nsamples, seqlen)
    if str(source).endswith(".npy"):
        return _pinned(Path(source), vocab_size)
    if nsamples < 1:
        raise NpsparseError(f"number of calibration samples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise NpsparseError(f"calibration window length {seqlen} is too short (at least 2)")
    names = domains(source)
    rng = np.random.default_rng(seed)  # one generator, drawn from domain after domain
    groups = [_random_windows(tokenizer.encode(read_text(name, part="calib")), name, count,
                              seqlen, rng)
              for name, count in zip(names, shares(nsamples, len(names)))]
    return interleave(groups)


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts, the larger ones first.

    Parameters
    ----------
    total, parts : int
        ``parts`` at least 1.

    Returns
    -------
    list of int
        ``parts`` counts summing to ``total``, e.g. ``[4, 3]`` for 7 and 2.
    """
    return [total // parts + (i < total % parts) for i in range(parts)]


def _random_windows(tokens: np.ndarray, name, count: int, seqlen: int, rng) -> np.ndarray:
    """``count`` windows at random starts in one text: ``[count, seqlen]`` int64."""
    if len(tokens) < seqlen:
        raise NpsparseError(
            f"calibration text {name} has {len(tokens)} tokens, fewer than one window of {seqlen}"
        )
    starts = rng.integers(0, len(tokens) - seqlen + 1, size=count)  # [count]
    rows = [tokens[s:s + seqlen] for s in starts]
    return np.array(rows, dtype=np.int64).reshape(count, seqlen)


def _pinned(path: Path, vocab_size: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise NpsparseError(f"{path}: no such file") from None
    except (ValueError, OSError) as err:
        raise NpsparseError(f"{path}: not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 2:
        raise NpsparseError(f"{path}: expected token ids of shape [nsamples, seqlen], got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise NpsparseError(f"{path}: token ids must be integers, got {array.dtype}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise NpsparseError(f"{path}: token ids must lie in [0, {vocab_size})")
    return array.astype(np.int64)
