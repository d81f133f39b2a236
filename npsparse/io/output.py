"""Output folders: which existing folder a command may replace, and its temporary sibling.

Every command that writes a folder (``prune``, ``pack``, ``finetune``) fills a temporary sibling
``.NAME.partial-HOST-PID-XXXXXXXX`` and renames it to NAME at the end, replacing an existing NAME
only if npsparse wrote it: replacing deletes, so file names alone are not enough (a user's own
``config.json`` + ``model.safetensors`` folder looks the same), the folder's report
(``pruning.json``, ``packed.json`` or ``finetune.json``) must carry its npsparse marker. A run
killed outright (SIGKILL, power loss) leaves its temporary folder; the next run writing beside it
removes it once its process is gone. Write errors (disk full, read-only folder, file-size limit)
become one-line :class:`~npsparse.errors.NpsparseError` messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import NpsparseError

# Every file name an HFDirWriter output can hold (npsparse.io.packed adds its own two).
_WRITTEN = re.compile(r"(config|tokenizer|tokenizer_config|pruning|packed|finetune)\.json"
                      r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                      r"|npsparse-packed\.safetensors")
# The report every npsparse output folder holds, with the key that marks it as npsparse's own
# (written by npsparse.sequential, npsparse.io.packed and npsparse.train.finetune).
REPORT_MARKERS = {"pruning.json": "npsparse_pruning", "packed.json": "npsparse_packed",
                  "finetune.json": "npsparse_finetune"}


def npsparse_report(folder: Path) -> str | None:
    """The name of the npsparse report in ``folder``, if one is there and carries its marker.

    Parameters
    ----------
    folder : Path
        Any folder.

    Returns
    -------
    str or None
        A key of :data:`REPORT_MARKERS` whose file parses as a JSON object holding that file's
        marker key (e.g. ``pruning.json`` with ``"npsparse_pruning"``); None if there is none.
    """
    for name, marker in REPORT_MARKERS.items():
        try:
            report = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and marker in report:
            return name
    return None


def check_replaceable(out: Path) -> None:
    """Refuse an output folder that exists and is not an earlier npsparse output.

    Replacing ``out`` deletes it, so only an empty folder, or a folder npsparse wrote, may be
    replaced: it must hold a report with its marker (:func:`npsparse_report`) and nothing a
    writer would not have written (no other files, no subfolders). File names alone prove
    nothing: a user's own ``config.json`` + ``model.safetensors`` folder is refused.

    Parameters
    ----------
    out : Path
        Absolute destination path.

    Raises
    ------
    NpsparseError
        ``out`` is a file, or a folder that npsparse did not write.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise NpsparseError(f"{out}: exists and is not a folder; choose another output path")
    contents = sorted(p.name for p in out.iterdir())
    if not contents:
        return
    foreign = [name for name in contents
               if not ((out / name).is_file() and _WRITTEN.fullmatch(name))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise NpsparseError(f"{out}: the folder exists and holds what npsparse did not write "
                            f"({shown}); remove it or choose another output path")
    if npsparse_report(out) is None:
        raise NpsparseError(f"{out}: the folder exists and npsparse did not write it (no "
                            f"{', '.join(REPORT_MARKERS)} with its npsparse marker); remove it "
                            "or choose another output path")


def check_output_folder(out: str | Path, inputs=()) -> Path:
    """Check an output folder before any work: not an input, and replaceable if it exists.

    Call it first in every command that writes a folder (``prune``, ``pack``, ``finetune``).

    Parameters
    ----------
    out : str or Path
        Destination folder.
    inputs : iterable of str or Path
        What the command reads (model folders or files, teacher, data); names that are not an
        existing path (``"smollm2"``, ``"pydoc"``) are skipped.

    Returns
    -------
    Path
        ``out`` made absolute.

    Raises
    ------
    NpsparseError
        ``out`` is an input, lies inside an input folder or contains an input, or exists and
        may not be replaced (:func:`check_replaceable`).
    """
    out = Path(out).absolute()
    target = out.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise NpsparseError(f"--out {out} is the input {source} or inside it; writing it "
                                "would delete the input: choose another output path")
        if target in source.parents:
            raise NpsparseError(f"--out {out} contains the input {source}; writing it would "
                                "delete the input: choose another output path")
    check_replaceable(out)
    return out


def _host() -> str:
    """This machine's name as it appears in temporary folder names (letters, digits, dots)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete temporary folders that an earlier, killed run left beside ``out``.

    A writer's temporary folder is ``.NAME.partial-HOST-PID-XXXXXXXX`` and a replaced output
    waiting for deletion ``.NAME.old-HOST-PID``. One is stale, and removed, only if HOST is
    this machine and no process PID exists any more: a run still writing (here, or on another
    machine sharing the folder) is never touched, and a reused PID only delays the cleanup.

    Parameters
    ----------
    out : Path
        Absolute destination folder (it need not exist).

    Returns
    -------
    list of Path
        The folders removed.
    """
    if not out.parent.is_dir():
        return []
    owned = re.compile(re.escape(f".{out.name}.") + r"(partial|old)-"
                       + re.escape(_host()) + r"-(\d+)(-[A-Za-z0-9_]+)?")
    removed = []
    for path in out.parent.iterdir():
        found = owned.fullmatch(path.name)
        if not found or not path.is_dir() or path.is_symlink():
            continue
        if not _process_exists(int(found.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def retired_folder(out: Path) -> Path:
    """Where an existing ``out`` waits for deletion once its replacement is in place.

    Parameters
    ----------
    out : Path
        Absolute destination folder.

    Returns
    -------
    Path
        ``.NAME.old-HOST-PID`` beside ``out`` (removed by a later run if this one dies first).
    """
    return out.with_name(f".{out.name}.old-{_host()}-{os.getpid()}")


def partial_folder(out: Path) -> Path:
    """Create the temporary sibling folder a writer fills before renaming it to ``out``.

    Stale ones of killed runs are removed first (:func:`remove_stale_partials`); the name holds
    this machine and process, so a later run can tell whether this one is still alive.

    Parameters
    ----------
    out : Path
        Absolute destination folder; its parent is created if needed.

    Returns
    -------
    Path
        A new empty folder ``.NAME.partial-HOST-PID-XXXXXXXX`` beside ``out``.

    Raises
    ------
    NpsparseError
        The parent folder cannot be created or written.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_host()}-{os.getpid()}-",
                                     dir=out.parent))
    except OSError as err:
        raise NpsparseError(f"cannot write {out}: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    """One line for an OS or safetensors write error (no path: the caller names the output)."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(text.split())


@contextmanager
def writing(out: Path):
    """Turn an OS or safetensors error raised inside the block into a one-line NpsparseError.

    Disk full, file-size limit, read-only or immutable folder: ``cannot write OUT: reason``.

    Parameters
    ----------
    out : Path
        The output being written, for the message.

    Yields
    ------
    None
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise NpsparseError(f"cannot write {out}: {_reason(err)}") from None
