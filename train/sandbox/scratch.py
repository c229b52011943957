"""Scratch folders that outlive nobody.

As root a sandboxed child mounts a tmpfs on its scratch, and the trusted parent unmounts it in
close(). A parent killed with SIGKILL (the launcher's backstop past the hard limit, a Slurm cancel,
the OOM killer) never gets there: the tmpfs, with whatever the trial wrote in it (weights, up to
`disk_mb`), stays mounted and holds memory until the node reboots, one more with every such trial.

So each scratch has an owner file beside it, and its maker holds an flock on that file for the
scratch's whole life. The kernel drops the lock when the maker dies, however it dies, and the next
process on the host that makes a scratch first removes every scratch whose owner file it can lock.
A lock, not a pid in the name: pids are reused, and mean nothing to a process in another PID
namespace (containers, or Slurm jobs, that share /tmp). The sandboxed child never holds the lock:
confine() closes every descriptor it was not told to keep.

The child's cgroup is named after its scratch (cgroup.py), so the sweep that removes a dead maker's
scratch also removes its cgroups, killing whatever of the trial still runs in them; the owner file
goes last, so a cgroup that cannot go yet is tried again by the next sweep. The orchestrator sweeps
its host when a study starts and when it ends (`sweep()` with no argument: the temporary folder
trials inherit), so what a harness killed outright left (the launcher's backstop, an operator's
kill -9, an OOM kill, the last trial of a study) goes with the study, not at the next trial.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .cgroup import Cgroup
from .limits import unmount_scratch

PREFIX = "arena-"
OWNER_SUFFIX = ".owner"
_swept: set[Path] = set()  # once per process and folder: a harness makes several scratches


class Scratch:
    """An empty folder for one sandboxed child, removed (and unmounted) by close() or, if this
    process dies first, by the next sweep."""

    def __init__(self, role: str, parent: str | os.PathLike | None = None):
        parent = Path(parent or tempfile.gettempdir()).resolve()
        if parent not in _swept:
            sweep(parent)
            _swept.add(parent)
        while True:
            fd, owner = tempfile.mkstemp(prefix=f"{PREFIX}{role}-", suffix=OWNER_SUFFIX, dir=parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, owner):
                break
            os.close(fd)  # a sweep took the file between its creation and the lock: make another
        self._fd, self.owner = fd, Path(owner)
        self.path = self.owner.with_name(self.owner.name[:-len(OWNER_SUFFIX)])
        self.path.mkdir(mode=0o700)

    def close(self) -> None:
        if self._fd is None:
            return
        _remove(self.path, self.owner)  # a cgroup that cannot go yet keeps the owner file: the next sweep's
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sweep(parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove the scratches under `parent` (the temporary folder by default) whose makers are dead,
    with their mounts and cgroups; returns them."""
    removed = []
    for owner in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*{OWNER_SUFFIX}"):
        try:
            fd = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its maker is alive
                continue
            if not _same_file(fd, owner):  # removed and made again meanwhile
                continue
            folder = owner.with_name(owner.name[:-len(OWNER_SUFFIX)])
            if os.fstat(fd).st_uid != os.geteuid() or not _real_folder(folder):
                continue  # /tmp is everyone's: never follow a name another user made
            _remove(folder, owner)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _remove(folder: Path, owner: Path) -> None:
    """Folder and cgroups first, owner file last (under the lock): a crash in between, or a cgroup
    that will not go yet, leaves an owner file that the next sweep finishes."""
    unmount_scratch(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if _remove_cgroups(folder.name):
        owner.unlink(missing_ok=True)


def _remove_cgroups(scratch_name: str) -> bool:
    """The cgroups of the children that used this scratch (`cgroup_name`); True if none is left."""
    if os.geteuid() != 0:
        return True
    try:
        parents = Cgroup.parents()
    except OSError:
        return True
    names = {d.name for parent in parents.values() for d in parent.glob(f"{scratch_name}-*") if d.is_dir()}
    return all([Cgroup.locate(name).empty_and_remove() for name in names])


def _real_folder(folder: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(folder).st_mode)
    except FileNotFoundError:
        return True  # the maker died before it made the folder: only the owner file is left
    except OSError:
        return False


def _same_file(fd: int, path: str | os.PathLike) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
