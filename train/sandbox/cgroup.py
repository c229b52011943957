"""A cgroup per trial, when this process may make one (root, writable cgroupfs): the kernel then
holds the memory and process-count limits for the whole tree, counts its CPU time, remembers its
peak memory and counts what its memory limit killed, and lists every process in it, whatever it
did to its parentage or session. Both cgroup v2 and the v1 memory/pids/cpuacct hierarchies.

The child creates and joins its cgroup itself (while still root, before confinement); the trusted
parent finds it by its name. The name is the child's scratch folder's (`Scratch`: unique on the
host, and its owner file tells a live trial from a dead one) plus the child's pid, never a pid
alone: a cgroup left behind by a harness that died could otherwise be joined by a later trial
whose child got the same pid, which would then inherit its peak memory and OOM-kill count (and so
be called `oom`). A cgroup of that name that exists already is removed before it is made anew.
The cgroups of a harness that died are removed by the next sweep of its scratch folders
(scratch.py), which kills whatever is still in them. Nothing in the tree can leave its cgroup: the
files that move processes belong to root and lie outside the sandbox's Landlock rules.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpuacct")


def cgroup_name(scratch: str | os.PathLike, pid: int) -> str:
    """The cgroup of the sandboxed child `pid` whose scratch folder is `scratch`."""
    name = Path(scratch).name
    return f"{name if name.startswith('arena-') else 'arena-' + name}-{pid}"


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and '' for the v2 tree."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


class Cgroup:
    """The cgroup directories of one trial: either one v2 directory, or one per v1 controller."""

    def __init__(self, dirs: dict[str, Path], v2: bool):
        self.dirs, self.v2 = dirs, v2

    @classmethod
    def locate(cls, name: str) -> Cgroup:
        """Where the cgroup `name` of a child of this process would be (it may not exist)."""
        parents = cls.parents()
        return cls({c: parent / name for c, parent in parents.items()}, v2="" in parents)

    @staticmethod
    def parents() -> dict[str, Path]:
        """The folders this process's children's cgroups go in: one per v1 controller, or the v2 one."""
        own = _own_paths()
        v1 = {c: ROOT / c / own[c].lstrip("/") for c in V1_CONTROLLERS
              if c in own and (ROOT / c / "cgroup.procs").exists()}
        if len(v1) == len(V1_CONTROLLERS):
            return v1
        base = ROOT / "unified" if (ROOT / "unified" / "cgroup.controllers").exists() else ROOT
        return {"": base / own.get("", "/").lstrip("/")}

    @classmethod
    def create(cls, name: str, memory_mb: int | None, max_processes: int) -> Cgroup | None:
        """Make the cgroup `name` afresh, set its limits and move this process into it; None where
        the kernel or the permissions do not allow (the caller then falls back to rlimits and
        watching)."""
        group = cls.locate(name)
        try:
            if group.v2:
                directory = group.dirs[""]
                wanted = {"memory", "pids"}
                if not wanted <= set((directory.parent / "cgroup.subtree_control").read_text().split()):
                    (directory.parent / "cgroup.subtree_control").write_text("+memory +pids")
            for directory in group.dirs.values():
                if directory.exists():
                    directory.rmdir()  # never inherit another tree's peak memory or OOM count
                directory.mkdir()
            limit = str(memory_mb * 2**20) if memory_mb else None
            group._write("pids", "pids.max", str(max_processes))
            if limit:
                group._write("memory", "memory.max" if group.v2 else "memory.limit_in_bytes", limit)
                with contextlib.suppress(OSError):  # swap must not hold what the limit refuses
                    group._write("memory", "memory.swap.max" if group.v2 else "memory.memsw.limit_in_bytes",
                                 "0" if group.v2 else limit)
            for directory in group.dirs.values():
                (directory / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            group.remove()
            return None
        return group

    def exists(self) -> bool:
        return all(d.is_dir() for d in self.dirs.values())

    def _file(self, controller: str, name: str) -> Path:
        return self.dirs["" if self.v2 else controller] / name

    def _write(self, controller: str, name: str, value: str) -> None:
        self._file(controller, name).write_text(value)

    def _read(self, controller: str, name: str) -> str | None:
        try:
            return self._file(controller, name).read_text()
        except OSError:
            return None

    def pids(self) -> list[int]:
        text = self._read("pids", "cgroup.procs") or ""
        return [int(p) for p in text.split()]

    def memory_peak_mb(self) -> float | None:
        text = self._read("memory", "memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(text) / 2**20 if text else None

    def oom_kills(self) -> int:
        """How many processes the kernel killed for this cgroup's memory limit."""
        text = self._read("memory", "memory.events" if self.v2 else "memory.oom_control") or ""
        counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return int(counts.get("oom_kill", 0))

    def cpu_seconds(self) -> float | None:
        if self.v2:
            stat = dict(line.split() for line in (self._read("", "cpu.stat") or "").splitlines())
            return int(stat["usage_usec"]) / 1e6 if "usage_usec" in stat else None
        text = self._read("cpuacct", "cpuacct.usage")
        return int(text) / 1e9 if text else None

    def remove(self) -> None:
        for directory in self.dirs.values():
            with contextlib.suppress(OSError):
                directory.rmdir()

    def empty_and_remove(self, wait_s: float = 5.0) -> bool:
        """Kill whatever is still in the cgroup (the tree of a trial whose parent is gone) and
        remove it; True once it is gone."""
        deadline = time.monotonic() + wait_s
        while True:
            for pid in {int(p) for d in self.dirs.values() for p in _read(d / "cgroup.procs").split()}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.remove()
            if not any(d.is_dir() for d in self.dirs.values()) or time.monotonic() > deadline:
                return not any(d.is_dir() for d in self.dirs.values())
            time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
