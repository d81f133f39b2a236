"""Text sources for evaluation and calibration, and how each named text is split.

Two texts ship with every Python, so nothing is downloaded:

* ``"pydoc"``, the default: the standard library's own documentation, ``pydoc_data.topics``,
  the topics joined with ``"\\n\\n"`` in sorted key order.
* ``"stdlib"``: the source of a fixed list of pure-Python standard-library modules
  (:data:`STDLIB_FILES`), each file after a one-line header naming it, in sorted path order.
  The text is pinned by a SHA-256 per file and one of the whole text, made with Python
  :data:`STDLIB_PYTHON`; another patch release may change a file, which is refused with one line
  naming it. ``"stdlib-unchecked"`` is the same text without that check (the opt-out).

Each named text is split by key (topic or file path) into two disjoint parts, by one rule: the
keys that sort before a split key form the **eval** part, the others the **calib** part.
Calibration and training windows are drawn from the calib part only. For pydoc the split key is
``"specialnames"`` (62 topics, ~58% of the text in Python 3.11); for stdlib it is
:data:`STDLIB_SPLIT_PATH`. An eval part's token stream starts exactly like its whole text's, so
"the first N windows of the pydoc text" and "the first N windows of the eval part" are the same
tokens while N windows fit inside it.

Texts mix with ``+``: ``"pydoc+stdlib"`` names both domains (:func:`domains`); calibration and
training draw an equal share of their windows from each one's calib part, interleaved
(:func:`interleave`), and evaluation reports each domain on its own.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import numpy as np

from .errors import NpsparseError

PYDOC_SPLIT_KEY = "specialnames"

STDLIB_PYTHON = "3.11.7"  # the interpreter whose files the hashes below were made from
# Pure-Python modules present as these files in every CPython from 3.11 on, none generated or
# platform-specific, in sorted path order (the text's order); relative to
# sysconfig.get_paths()["stdlib"]. Value: SHA-256 of the file's text (UTF-8).
STDLIB_FILES = {
    "abc.py": "e558702a95cdce3febd289da021715d2b92bc43995b8a1bc58dfa1c3d8010287",
    "bisect.py": "e5b2ff166f48a06e70ae831d8c9b47283fcd0c254306eee12d3dae9c55e11526",
    "cmd.py": "fb82a8c4e44e5b559c88d516d79051534cec69a463df97defe05ac8a261f0a0d",
    "codeop.py": "353e35188867d3efb0d384ac4aacf36005037662632c2d4e0c5483f63f795eaa",
    "colorsys.py": "d9800f8e81d46e63ca6f2e7d6ac5f344d85afb92c3cf6d103b5f977f1ad66ac2",
    "contextlib.py": "d732c045bc7450997f97b2f79cfdb1546b68d2655e89ab3170f3b19b3930d83c",
    "copy.py": "27dcfc53a4b9d4fbc3d90c74e549eb6eca9301524d6d2fbff9a6589cf51b6fd5",
    "csv.py": "6c68a5186e3b85e6e267a7ef96479327a45ae2b40bf5e9f2017e4b2282b3f5b1",
    "filecmp.py": "178f19895fdd43d5d3865b2bfe9ae7b665611a30d29cfc23d44f01417774851c",
    "fileinput.py": "b0cd2a3f01c96f594b6038e52bd83d489bfa081cc757103c70aab4e5b2c4fe1f",
    "fnmatch.py": "6683da36e47af523f3f41e18ad244d837783e19e98911cc0b7415dea81494ebc",
    "functools.py": "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b",
    "getopt.py": "efafb88c7c978e96bd6c232b7fa10bf50cef5e7fb0fb7dc8e5bce44e19f8c92f",
    "gettext.py": "a5c249a522b6b8e3aa6f1b12a8bcc09508b99ad612b58d2fc973db27ea3b7cc3",
    "glob.py": "fa579f8a50a66313d34d339f10be0821c9b4fed6207e8ba8e29ed1c5e119f740",
    "graphlib.py": "7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65",
    "heapq.py": "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9",
    "hmac.py": "a4790b3cfd1b58875879621dbe8f4c0a30fb50a8582045b0d5c1a712afc8c36b",
    "html/parser.py": "2fc512ae95bed2746b5ba3fabb14fcebf3114ff808ce97d96214ddd613b253da",
    "json/__init__.py": "d5d41e2c29049515d295d81a6d40b4890fbec8d8482cfb401630f8ef2f77e4d5",
    "json/decoder.py": "9f02654649816145bc76f8c210a5fe3ba1de142d4d97a1c93105732e747c285b",
    "json/encoder.py": "7c358788fbb2a6a07f66f1f8446c52396f35fc201108f666d5be002d86f31af2",
    "json/scanner.py": "8604d9d03786d0d509abb49e9f069337278ea988c244069ae8ca2c89acc2cb08",
    "linecache.py": "e814839fc75010db274ae034f45b0fff7e529ccb702319048545fef84c2045b7",
    "numbers.py": "6d70991643a109e9c99e94d6ea2734a995fa8e89114a70ea09737413fa9ae292",
    "operator.py": "b2af20f67667203c1730e686cc5d0427becc94db4c97f1d3efe3ed2158473f6a",
    "pprint.py": "0b67dbc8af449d8ced3acd9df902e98c2dbc56c8f2a7a181c51cc72768db621f",
    "queue.py": "f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0",
    "quopri.py": "7070b61e5a582423a1bb405e3d23cb3e26c4faafcb142a8cbb88ec3f2d6104e9",
    "reprlib.py": "264433cc232332db871666b3bb6e4c2cb97b092cb8d5056a45ec2e53daea2b1c",
    "sched.py": "edfb309483d7cb05e06ad86d1fdeb819629f71402dc6710a1bec36c7afcaac50",
    "secrets.py": "86893f2e4d33e8d02f8cc1d1de7a436d395ae9c9d48ff3dc0225a9cca1601759",
    "shlex.py": "42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7",
    "tabnanny.py": "73bc1829f10634726db7a22f1cb5c06f76802d54cd7edba0ecff145156caa2f8",
    "textwrap.py": "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c",
    "timeit.py": "e6414bbc158ad2007fc17f892ec49cca67cbb6d4f90920f4267ddeb19f032a03",
    "zipapp.py": "776078e89fd7dadbce41678f8bacd3b493135e6d610911c867489415420de383",
}
STDLIB_SHA256 = "21f43f07ea25c7e3af8ccd4a8c3efc457ad20f2a892d1cfc143fd161fc8f0f3d"  # of "all"
# eval: the files before it, 67,861 of the text's 113,822 SmolLM2 tokens (60%; pydoc: 58%)
STDLIB_SPLIT_PATH = "json/decoder.py"
TEXTS = ("pydoc", "stdlib", "stdlib-unchecked")  # the named texts; mix them with "+"


def _split(pieces: dict[str, str], split_key: str, part: str, name: str) -> list[str]:
    """The pieces of one part, in key order: eval before ``split_key``, calib from it on."""
    keys = sorted(pieces)
    if part == "eval":
        keys = [k for k in keys if k < split_key]
    elif part == "calib":
        keys = [k for k in keys if k >= split_key]
    elif part != "all":
        raise ValueError(f"unknown {name} part {part!r}")
    return [pieces[k] for k in keys]


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

    return "\n\n".join(_split(topics, PYDOC_SPLIT_KEY, part, "pydoc"))


def _stdlib_source(path: str) -> str:
    """One file of the standard library, by its path relative to the library folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        return (root / path).read_text(encoding="utf-8")
    except OSError as err:
        raise NpsparseError(f"stdlib text: cannot read {root / path} ({err.strerror}); the "
                            f"hashes were made with Python {STDLIB_PYTHON}") from None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_stdlib(sources: dict[str, str], whole: str) -> None:
    """Refuse, naming the first changed file, a text that is not the one the hashes pin."""
    if _sha256(whole) == STDLIB_SHA256:
        return
    changed = [path for path, text in sources.items() if _sha256(text) != STDLIB_FILES[path]]
    if not changed:  # every file as recorded, so the code that joins them changed
        raise NpsparseError("stdlib text: its files match their hashes but the joined text does "
                            "not match STDLIB_SHA256, which must be remade")
    raise NpsparseError(
        f"stdlib text: {changed[0]} differs from the file hashed with Python {STDLIB_PYTHON} "
        f"({len(changed)} of {len(sources)} files differ; this is Python "
        f"{platform.python_version()}); use the text 'stdlib-unchecked' to take it as it is"
    )


def stdlib_text(part: str = "all", *, check: bool = True) -> str:
    """The second named text: the source of a fixed list of standard-library modules.

    Parameters
    ----------
    part : {"all", "eval", "calib"}
        The files of :data:`STDLIB_FILES` in sorted path order, each after a header line
        ``# file: PATH`` and joined with ``"\\n"`` (``"all"``), or the files whose path sorts
        before :data:`STDLIB_SPLIT_PATH` (``"eval"``) or from it on (``"calib"``).
    check : bool
        Compare the whole text with :data:`STDLIB_SHA256` (made with Python
        :data:`STDLIB_PYTHON`). ``False`` is the explicit opt-out, for a Python whose files
        differ; the text source ``"stdlib-unchecked"`` passes it.

    Returns
    -------
    str

    Raises
    ------
    NpsparseError
        A file is missing, or (with ``check``) the text differs from the pinned one; the message
        names the first file whose own hash differs.
    """
    sources = {path: _stdlib_source(path) for path in STDLIB_FILES}
    pieces = {path: f"# file: {path}\n{text}" for path, text in sources.items()}
    if check:
        _check_stdlib(sources, "\n".join(_split(pieces, STDLIB_SPLIT_PATH, "all", "stdlib")))
    return "\n".join(_split(pieces, STDLIB_SPLIT_PATH, part, "stdlib"))


def domains(source: str | Path) -> list:
    """The texts a source stands for: each named text of a ``+`` mix, else the source itself.

    Parameters
    ----------
    source : str or Path
        A named text (:data:`TEXTS`), a mix of them such as ``"pydoc+stdlib"``, or a file.

    Returns
    -------
    list
        ``["pydoc", "stdlib"]`` for ``"pydoc+stdlib"``; ``[source]`` for anything else (an
        existing file whose name holds ``+`` is a file).

    Raises
    ------
    NpsparseError
        A mix names something other than a named text, or one twice.
    """
    name = str(source)
    if "+" not in name or Path(name).exists():
        return [source]
    parts = name.split("+")
    unknown = [p for p in parts if p not in TEXTS]
    if unknown:
        raise NpsparseError(f"{name}: {unknown[0]!r} is not a named text ({', '.join(TEXTS)}); "
                            "only named texts mix with '+'")
    if len(set(parts)) < len(parts):
        raise NpsparseError(f"{name}: a text is named twice")
    return parts


def eval_domains(items) -> list:
    """The texts to evaluate, one perplexity each, from command-line items.

    Parameters
    ----------
    items : iterable of str
        Named texts, files, comma lists of them (``"pydoc,stdlib"``) or mixes
        (``"pydoc+stdlib"``, which stands for each of its texts).

    Returns
    -------
    list of str
        In the order given, each once.

    Raises
    ------
    NpsparseError
        As :func:`domains`, or an item is neither a named text nor an existing file.
    """
    if isinstance(items, (str, Path)):
        items = [items]
    found = []
    for item in map(str, items):
        pieces = [item] if Path(item).exists() else [p for p in item.split(",") if p]
        for piece in pieces:
            for name in domains(piece):
                if name not in TEXTS and not Path(name).exists():
                    raise NpsparseError(f"{name}: no such file, nor a named text "
                                        f"({', '.join(TEXTS)})")
                if name not in found:
                    found.append(name)
    if not found:
        raise NpsparseError("no text to evaluate")
    return found


def read_text(source: str | Path, part: str = "eval") -> str:
    """The text to evaluate or calibrate on.

    Parameters
    ----------
    source : str or Path
        A named text: ``"pydoc"`` (the default, see :func:`pydoc_text`), ``"stdlib"`` or
        ``"stdlib-unchecked"`` (see :func:`stdlib_text`); or a UTF-8 text file. A mix
        (``"pydoc+stdlib"``) has one text per domain: read each of :func:`domains`.
    part : {"eval", "calib", "all"}
        The part of a named text; ignored for a file.

    Returns
    -------
    str

    Raises
    ------
    NpsparseError
        A missing, unreadable, non-UTF-8 or empty file; a mix; a changed stdlib file.
    """
    name = str(source)
    if name == "pydoc":
        return pydoc_text(part)
    if name in ("stdlib", "stdlib-unchecked"):
        return stdlib_text(part, check=name == "stdlib")
    if len(domains(source)) > 1:
        raise NpsparseError(f"{name} mixes several texts; read each of them on its own")
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


def interleave(groups) -> np.ndarray:
    """Rows of several domains taken in turn: the first of each, then the second of each, ...

    Parameters
    ----------
    groups : sequence of np.ndarray
        ``[n_i, L]`` windows per domain; a shorter group simply runs out first.

    Returns
    -------
    np.ndarray
        ``[sum n_i, L]``, row ``k`` of group ``g`` before row ``k + 1`` of any group.
    """
    order = sorted((k, g) for g, rows in enumerate(groups) for k in range(len(rows)))
    return np.stack([groups[g][k] for k, g in order])


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
