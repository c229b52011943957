"""A cgroup per trial, when this process may make one (root, writable cgroupfs): the kernel then
holds the memory and process-count limits for the whole tree, counts its CPU time, remembers its
peak memory and counts what its memory limit killed, and lists every process in it, whatever it
did to its parentage or session. Both cgroup v2 and the v1 memory/pids/cpuacct hierarchies.

The child creates and joins its cgroup itself (while still root, before confinement), named after
its own pid; the trusted parent finds it by that pid. Nothing in the tree can leave it: the files
that move processes belong to root and lie outside the sandbox's Landlock rules.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpuacct")


def _name(pid: int) -> str:
    return f"arena-sandbox-{pid}"


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
    def locate(cls, pid: int) -> Cgroup:
        """Where the cgroup for child `pid` of this process would be (it may not exist)."""
        own = _own_paths()
        v1 = {c: ROOT / c / own[c].lstrip("/") / _name(pid) for c in V1_CONTROLLERS
              if c in own and (ROOT / c / "cgroup.procs").exists()}
        if len(v1) == len(V1_CONTROLLERS):
            return cls(v1, v2=False)
        base = ROOT / "unified" if (ROOT / "unified" / "cgroup.controllers").exists() else ROOT
        return cls({"": base / own.get("", "/").lstrip("/") / _name(pid)}, v2=True)

    @classmethod
    def create(cls, memory_mb: int | None, max_processes: int) -> Cgroup | None:
        """Make this process's cgroup, set its limits and move this process into it; None where the
        kernel or the permissions do not allow (the caller then falls back to rlimits and watching)."""
        group = cls.locate(os.getpid())
        try:
            if group.v2:
                directory = group.dirs[""]
                wanted = {"memory", "pids"}
                if not wanted <= set((directory.parent / "cgroup.subtree_control").read_text().split()):
                    (directory.parent / "cgroup.subtree_control").write_text("+memory +pids")
            for directory in group.dirs.values():
                directory.mkdir(exist_ok=True)
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
