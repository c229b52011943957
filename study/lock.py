"""One owner per study: a lock on the study folder, held for the orchestrator's whole life.

Two copies of one study would run every trial twice in one folder and interleave two journals, so
the second copy refuses in one line that names the owner. The lock is a POSIX record lock
(`fcntl.lockf`) on `owner.lock`: the kernel drops it when its process dies, however it dies, so a
stale lock (a `kill -9`, a node that rebooted) never blocks a resume; and on NFS it goes through
the network lock manager (NLM, or NFSv4's own locking), so it also holds between an orchestrator on
a login node and a second copy started on another host of a Slurm cluster. The file's text (host,
pid, start time) is only for the message: ownership is the lock itself, never the file's presence.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "owner.lock"
_HELD: set[Path] = set()  # POSIX locks do not exclude a second owner inside the same process


class StudyLocked(RuntimeError):
    """Another live process owns the study."""


class StudyLock:
    def __init__(self, study_dir: str | os.PathLike):
        self.path = Path(study_dir).resolve() / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "StudyLock":
        if self.path in _HELD:
            raise StudyLocked(f"{self.path.parent} is already open in this process (pid {os.getpid()})")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise StudyLocked(f"{self.path.parent} is in use by {owner(self.path)}; wait for it to end or "
                              "stop it (a dead owner holds no lock, so a resume is never blocked)") from None
        self._fd = fd
        try:  # only for the refusal message: a full disk must not cost the lock itself
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        except OSError:
            pass
        _HELD.add(self.path)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Closing the descriptor drops the lock; the file stays (unlinking it would let a waiting
        opener lock an orphaned inode while a third process creates a new one)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _HELD.discard(self.path)

    def __enter__(self) -> "StudyLock":
        """A scope that releases the lock if it was acquired in it (where the folder is made)."""
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner(path: Path, wait_s: float = 2.0) -> str:
    """'host H, pid P (since T)' from the lock file, for the refusal message. The owner writes its
    name just after it takes the lock, so a copy started at the same instant may find the file empty
    or half-written: it waits a moment for the name rather than refuse without one."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(path.read_text())
            return f"another run of this study (host {info['host']}, pid {info['pid']}, since {info['since']})"
        except (OSError, ValueError, KeyError):
            if time.monotonic() >= deadline:
                return "another run of this study (its owner has not written its name yet)"
            time.sleep(0.05)
