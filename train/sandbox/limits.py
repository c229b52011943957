"""The per-process limits confine() sets, and the size-limited scratch folder.

Process count: RLIMIT_NPROC counts every process of the user, so it is set to what the user runs
now plus `max_processes` (in a cgroup, pids.max holds the tree exactly). Disk: as root the scratch
becomes a tmpfs of `disk_mb` (the kernel refuses a byte more, and it counts against the trial's
memory cgroup, since it lives in memory); otherwise RLIMIT_FSIZE caps any one file and the trusted
parent's watcher the folder. Memory: a cgroup as root; otherwise oom_score_adj 1000 makes the
sandbox the kernel OOM killer's first victim, and the watcher holds `memory_mb` for the tree.
"""
from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path

from . import procfs

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 2


def set_rlimits(policy, uid: int) -> None:
    """Set before the uid changes: RLIMIT_NPROC then applies to `uid`'s count (uid 0 is exempt
    from it in the kernel, so as root only a cgroup holds the process count)."""
    def cap(limit, value):
        soft, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))

    # No core dump: a file one would land outside the scratch, and a core_pattern pipe ignores a
    # limit of 0; 1 is the value the kernel reads as "never" for both.
    cap(resource.RLIMIT_CORE, 1)
    cap(resource.RLIMIT_FSIZE, policy.disk_mb * 2**20)
    if uid != 0:  # the kernel never applies RLIMIT_NPROC to uid 0; counting would cost ~15 ms
        cap(resource.RLIMIT_NPROC, _user_tasks(uid) + policy.max_processes)
    if policy.cpu_seconds:
        soft = int(policy.cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 5))  # SIGXCPU, then SIGKILL 5 s later


def _user_tasks(uid: int) -> int:
    """Threads count against RLIMIT_NPROC too; this is every task of `uid`."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += procfs.threads(entry.name)
            except OSError:
                pass
    return count


def raise_oom_score() -> None:
    """Make this tree the first thing the kernel OOM killer takes (as root the floor is locked: a
    sandboxed process cannot lower it back)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def mount_scratch(scratch: Path, size_mb: int, uid: int, gid: int) -> bool:
    """As root: make the (empty) scratch a tmpfs of `size_mb`, owned by the sandbox's user. False
    where that is not possible (not root, not empty, no mount rights in a container)."""
    if os.geteuid() != 0 or any(scratch.iterdir()) or scratch_is_tmpfs(scratch):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={size_mb}m,mode=0700,uid={uid},gid={gid}".encode()
    return libc.mount(b"tmpfs", os.fsencode(scratch), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                      options) == 0


def scratch_is_tmpfs(scratch: Path) -> bool:
    target = os.fsencode(Path(scratch).resolve())
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if fields[4] == target and fields[fields.index(b"-") + 1] == b"tmpfs":
                    return True
    except OSError:
        pass
    return False


def unmount_scratch(scratch: Path) -> None:
    if scratch_is_tmpfs(scratch):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(Path(scratch).resolve()), ctypes.c_int(MNT_DETACH))


def tree_size_mb(folder: Path) -> float:
    """Disk blocks under `folder`, links not followed (the candidate owns what is in it)."""
    total = 0
    for directory, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20
