"""Is the study folder usable? Faults of the study's own storage are the infrastructure's, never the
candidate's.

A full disk or a folder turned read-only fails whatever writes next: the journal, a trial folder,
Optuna's database, or the harness saving weights. The last one surfaces as a trial that "crashed",
and recording it so would blame the candidate and carry on into a study that can no longer keep
its records. So a trial that comes back failing, or a searcher error, is checked against the
folder itself (a real write and fsync, plus the free space), and a storage fault stops the study
with one line and a non-zero exit code.
"""
from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
from pathlib import Path

MIN_FREE_BYTES = 64 * 2**20  # below this a trial's weights and logs may not fit: the disk is full
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_SQLITE_STORAGE = ("readonly database", "disk is full", "unable to open database file", "disk i/o error")


class StudyStorageError(RuntimeError):
    """The study folder cannot keep the study's records: stop, loudly."""


def problem(folder: str | os.PathLike, what: str = "study folder") -> str | None:
    """One line saying why `folder` cannot take the study's writes, or None if it can."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        return describe(e, folder, what) or f"{what} unusable ({folder}: {e.strerror or e})"
    free = _free_bytes(folder)
    if free is not None and free < MIN_FREE_BYTES:
        return f"no space left on the {what}'s filesystem ({folder}: {free / 2**20:.1f} MiB free)"
    return None


def describe(e: BaseException, folder: str | os.PathLike, what: str = "study folder") -> str | None:
    """The one line for a storage fault anywhere in `e`'s chain (an OSError, or SQLite's own words
    for Optuna's database), or None if `e` is not one."""
    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return f"no space left on the {what}'s filesystem ({folder})"
        if isinstance(cause, OSError) and cause.errno in _NOT_WRITABLE:
            return f"{what} not writable ({folder}: {cause.strerror})"
        if isinstance(cause, sqlite3.OperationalError) and any(s in str(cause).lower() for s in _SQLITE_STORAGE):
            return f"{what} not writable ({folder}: Optuna's database says {str(cause)!r})"
    return None


def fault(e: BaseException, folder: str | os.PathLike) -> str | None:
    """The one line for `e` if it is a storage fault of the study, else None: a full or read-only
    filesystem wherever it struck, a refused write only inside the study folder (a permission error
    on, say, a baseline file elsewhere is a configuration error, not the study folder's)."""
    why = describe(e, folder)
    for cause in _chain(e):
        if (isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM)
                and cause.filename is not None and not _inside(cause.filename, folder)):
            return None
    return why


def _inside(filename, folder: str | os.PathLike) -> bool:
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(Path(folder).resolve())
    except (TypeError, ValueError, OSError):
        return False


def mentions_no_space(text: str | None) -> bool:
    """A failing trial's log says a write ran out of space (the harness saving weights, say)."""
    return bool(text) and ("No space left on device" in text or "Disk quota exceeded" in text)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
