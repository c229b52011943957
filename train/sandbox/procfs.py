"""What the trusted parent reads about processes from /proc: the kernel's own accounting, which a
process cannot forge about itself."""
from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int            # clock ticks after boot
    cpu_seconds: float    # its own user+system time
    children_cpu_seconds: float  # of the children it reaped
    rss_mb: float


def read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return Proc(pid=pid, ppid=int(fields[1]), state=fields[0], start=int(fields[19]),
                cpu_seconds=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
                children_cpu_seconds=(int(fields[13]) + int(fields[14])) / CLOCK_TICKS,
                rss_mb=int(fields[21]) * PAGE_MB)


def private_mb(proc: Proc) -> float:
    """Memory this process holds alone: its private pages, not those it still shares with the parent
    it was forked from (a fork of a harness that imported torch maps hundreds of MB it never
    touches). Falls back to the resident size where smaps_rollup cannot be read."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            kib = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        return kib / 1024
    except (OSError, ValueError, IndexError):
        return proc.rss_mb


def children(pid: int) -> list[int]:
    """The children of `pid` (of all its threads), from the kernel's own list: a walk from one
    process costs what its tree holds, not what the machine runs."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def no_new_privs(pid: int) -> bool:
    """Whether `pid` runs with no_new_privs: set by confine() and inherited for good, it marks an
    orphan adopted by this process as one of a sandbox's."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split() == ["NoNewPrivs:", "1"] for line in f)
    except OSError:
        return False


def threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))
