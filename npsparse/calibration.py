"""Calibration token windows: from the default text, any UTF-8 file, or a pinned ``.npy`` array.

Text is tokenized and ``nsamples`` windows of ``seqlen`` tokens are drawn at random start positions
(``numpy.random.default_rng(seed)``, overlaps allowed, as the references' samplers allow). A
``.npy`` int array of shape ``[nsamples, seqlen]`` is used exactly as given, which makes calibration
reproducible across implementations. The default text's calibration part is disjoint from its eval
part (see :mod:`npsparse.data`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import read_text
from .errors import NpsparseError


def calibration_windows(source: str | Path, tokenizer, vocab_size: int, *, nsamples: int = 32,
                        seqlen: int = 512, seed: int = 0) -> np.ndarray:
    """Token windows to calibrate on.

    Parameters
    ----------
    source : str or Path
        ``"pydoc"`` (calibration part of the default text), a UTF-8 text file, or a ``.npy`` file
        holding an integer array ``[nsamples, seqlen]``.
    tokenizer : Tokenizer
        Used for text sources.
    vocab_size : int
        Token ids must be below this.
    nsamples, seqlen, seed : int
        Number of windows, their length, and the sampler's seed (text sources only).

    Returns
    -------
    np.ndarray
        ``[nsamples, seqlen]`` int64.
    """
    if str(source).endswith(".npy"):
        return _pinned(Path(source), vocab_size)
    if nsamples < 1:
        raise NpsparseError(f"number of calibration samples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise NpsparseError(f"calibration window length {seqlen} is too short (at least 2)")
    tokens = tokenizer.encode(read_text(source, part="calib"))
    if len(tokens) < seqlen:
        raise NpsparseError(
            f"calibration text {source} has {len(tokens)} tokens, fewer than one window of {seqlen}"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seqlen + 1, size=nsamples)  # [nsamples]
    return np.stack([tokens[s:s + seqlen] for s in starts]).astype(np.int64)


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
