"""Text sources for evaluation and calibration, and how the default text is split.

The default text is the Python standard library's own documentation, ``pydoc_data.topics``: the
topics joined with ``"\\n\\n"`` in sorted key order. It is split by topic into two disjoint parts:

* **eval**: the topics whose key sorts before ``"specialnames"`` (62 topics, ~58% of the text in
  Python 3.11). Its token stream starts exactly like the whole text's, so "the first N windows of
  the pydoc text" and "the first N windows of the eval part" are the same tokens while N windows fit
  inside it.
* **calib**: the topics from ``"specialnames"`` on. Calibration windows are drawn from here only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import NpsparseError

PYDOC_SPLIT_KEY = "specialnames"


def pydoc_text(part: str = "all") -> str:
    """The default text: the Python standard library's own documentation.

    Parameters
    ----------
    part : {"all", "eval", "calib"}
        ``pydoc_data.topics`` joined with ``"\\n\\n"`` in sorted key order (``"all"``), or the
        topics whose key sorts before ``specialnames`` (``"eval"``) or from it on (``"calib"``):
        two disjoint parts, so calibration never sees evaluation text.

    Returns
    -------
    str
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "eval":
        keys = [k for k in keys if k < PYDOC_SPLIT_KEY]
    elif part == "calib":
        keys = [k for k in keys if k >= PYDOC_SPLIT_KEY]
    elif part != "all":
        raise ValueError(f"unknown pydoc part {part!r}")
    return "\n\n".join(topics[k] for k in keys)


def read_text(source: str | Path, part: str = "eval") -> str:
    """The text to evaluate or calibrate on.

    Parameters
    ----------
    source : str or Path
        ``"pydoc"`` (the default text, see :func:`pydoc_text`) or a UTF-8 text file.
    part : {"eval", "calib", "all"}
        The part of the default text; ignored for a file.

    Returns
    -------
    str

    Raises
    ------
    NpsparseError
        A missing, unreadable, non-UTF-8 or empty file.
    """
    if str(source) == "pydoc":
        return pydoc_text(part)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NpsparseError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise NpsparseError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise NpsparseError(f"{path}: cannot read ({err.strerror})") from None
    if not text.strip():
        raise NpsparseError(f"{path}: the file is empty")
    return text


def windows(tokens: np.ndarray, seqlen: int, count: int | None = None) -> np.ndarray:
    """The first ``count`` non-overlapping ``seqlen``-token windows of ``tokens`` (tail dropped).

    Parameters
    ----------
    tokens : np.ndarray
        ``[n]`` token ids.
    seqlen : int
        Window length, at least 2.
    count : int, optional
        How many windows; default: as many as fit.

    Returns
    -------
    np.ndarray
        ``[count, seqlen]`` int64.

    Raises
    ------
    NpsparseError
        ``seqlen < 2``, or the text holds less than one window.
    """
    if seqlen < 2:
        raise NpsparseError(f"window length {seqlen} is too short: it must be at least 2")
    available = len(tokens) // seqlen
    if available == 0:
        raise NpsparseError(
            f"the text has {len(tokens)} tokens, fewer than one window of {seqlen}"
        )
    if count is None:
        count = available
    if count < 1:
        raise NpsparseError(f"number of windows must be at least 1, got {count}")
    if count > available:
        raise NpsparseError(
            f"asked for {count} windows of {seqlen} tokens but the text has only {available} "
            f"({len(tokens)} tokens)"
        )
    return np.asarray(tokens[: count * seqlen], dtype=np.int64).reshape(count, seqlen)


def token_hash(tokens: np.ndarray) -> str:
    """SHA-256 of token ids, to pin down exactly what was evaluated.

    Parameters
    ----------
    tokens : np.ndarray
        Integer token ids of any shape (hashed as little-endian int64, C order).

    Returns
    -------
    str
        64 hex digits.
    """
    data = np.ascontiguousarray(tokens, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()
