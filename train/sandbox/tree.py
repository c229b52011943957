"""The trusted parent's handle on everything a confined child starts, and the kernel's evidence of
what that tree used.

Which processes belong to the tree: the child and its descendants (by the kernel's children
lists), the orphans this process adopted, and, as root, everything in the trial's cgroup (the
kernel's list, whatever they did to parentage or session). The parent is a child subreaper, so a
double-forked, setsid'd grandchild is re-parented here, not to init, and is recognised by
no_new_privs (set by confine(), never cleared). At the `namespaces` level the child is outside a
PID namespace whose init is its only child, so killing the chain kills the namespace whole.

Without a cgroup the limits the kernel cannot hold per tree are held here: a watcher thread sums
the private memory of the tree and the size of the scratch folder a few times a second and kills
the tree past `memory_mb` or `disk_mb` (per process, the rlimits set by confine() stop it sooner).
"""
from __future__ import annotations

import os
import resource
import signal
import threading
import time
import weakref
from pathlib import Path

from . import procfs
from .cgroup import Cgroup, cgroup_name
from .kernel import PR_SET_CHILD_SUBREAPER, prctl
from .limits import scratch_is_tmpfs, tree_size_mb, unmount_scratch

POLL_S = 0.2
DISK_POLL_S = 1.0
KILL_ROUNDS_S = 10.0
_LIVE_ROOTS: set[int] = set()  # the roots of this process's live trees: never one another's orphans


def become_subreaper() -> None:
    """Orphans of this process's descendants come here instead of to init, so no `setsid` and double
    fork takes a process out of reach. Call it before forking a child to confine."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


class ProcessTree:
    """Create it right after forking `pid` (the child that calls confine()). Thread-safe."""

    def __init__(self, pid: int, policy, level: str, *, watch: bool = True):
        become_subreaper()
        self.pid, self.policy, self.level = pid, policy, level
        self._me = os.getpid()
        root = procfs.read(pid)
        self._root_start = root.start if root else 0
        self._rusage_start = _children_cpu()
        self._cgroup = Cgroup.locate(cgroup_name(policy.scratch, pid)) if os.geteuid() == 0 else None
        self._lock = threading.RLock()
        self._peak_private_mb = 0.0
        self._cpu_seen = 0.0
        self._sampled = False
        self.killed_for: str | None = None  # "memory" or "disk" when the watcher ended the tree
        self._closed = threading.Event()
        _LIVE_ROOTS.add(pid)
        # A parent that forgets close() still unmounts the scratch when it exits normally (one killed,
        # or leaving through os._exit, leaves the tmpfs mounted: call close()).
        self._unmount_at_exit = weakref.finalize(self, unmount_scratch, Path(policy.scratch))
        self._watcher = threading.Thread(target=self._watch, name=f"sandbox-watch-{pid}", daemon=True)
        if watch:
            self._watcher.start()

    # -- what the tree is ------------------------------------------------------------------------

    def _group(self) -> Cgroup | None:
        return self._cgroup if self._cgroup is not None and self._cgroup.exists() else None

    def members(self) -> list[procfs.Proc]:
        """The tree's processes now, zombies included (they still hold their CPU accounting)."""
        group = self._group()
        pids = self._walk() | (set(group.pids()) if group is not None else set())
        return [p for p in map(procfs.read, pids) if p is not None]

    def _walk(self) -> set[int]:
        """The child and its descendants, and the orphans of the tree this subreaper adopted."""
        frontier = [self.pid] + [pid for pid in procfs.children(self._me) if self._adopted_orphan(pid)]
        tree: set[int] = set()
        while frontier:
            pid = frontier.pop()
            if pid not in tree:
                tree.add(pid)
                frontier.extend(procfs.children(pid))
        return tree

    def _adopted_orphan(self, pid: int) -> bool:
        if pid == self.pid or pid in _LIVE_ROOTS:
            return False
        proc = procfs.read(pid)
        return (proc is not None and proc.start >= self._root_start
                and (self.level == "none" or procfs.no_new_privs(pid)))

    def alive(self) -> bool:
        return any(p.state != "Z" for p in self.members())

    # -- ending it -------------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every process of the tree, again and again until none is left running (a process
        forking while it dies adds children to the next round), and reap the orphans it left here.
        The child `pid` itself is left for its caller to wait for."""
        deadline = time.monotonic() + KILL_ROUNDS_S
        with self._lock:
            self._sample()
            while True:
                members = self.members()
                running = [p for p in members if p.state != "Z"]
                for p in running:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                orphans = [p.pid for p in members if p.pid != self.pid and p.ppid == self._me]
                unreaped = [pid for pid in orphans if not _reaped(pid)]
                if not running and not unreaped:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sandbox: {len(running)} processes of trial pid {self.pid} "
                                       f"survive SIGKILL after {KILL_ROUNDS_S:.0f} s")
                time.sleep(0.005)

    def close(self) -> None:
        """Kill the tree, stop watching, remove its cgroup and unmount its scratch tmpfs (read what
        the child left in the scratch before this)."""
        self.kill_all()
        self._closed.set()
        if self._watcher.is_alive():
            self._watcher.join()
        _LIVE_ROOTS.discard(self.pid)
        if self._cgroup is not None:
            for _ in range(50):  # a just-killed process may take a moment to leave the cgroup
                self._cgroup.remove()
                if not self._cgroup.exists():
                    break
                time.sleep(0.01)
        self._unmount_at_exit()

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- evidence --------------------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """CPU time of the whole tree so far, from the kernel: the cgroup's counter, or the larger of
        what /proc showed of the tree and what the kernel added to this process's reaped-children
        account since the tree began (the child and the orphans reaped here)."""
        group = self._group()
        if group is not None and (seconds := group.cpu_seconds()) is not None:
            return seconds
        with self._lock:
            self._sample()
            return max(self._cpu_seen, _children_cpu() - self._rusage_start)

    def peak_memory_mb(self) -> float | None:
        """The tree's peak memory: the cgroup's high-water mark, or the largest total of private
        memory the watcher saw (sampled, so a spike shorter than its period can be missed)."""
        group = self._group()
        if group is not None and (peak := group.memory_peak_mb()) is not None:
            return round(peak, 1)
        with self._lock:
            self._sample()
            return round(self._peak_private_mb, 1) if self._sampled else None

    def oom_killed(self) -> bool:
        """Kernel evidence that the memory limit ended something in the tree: the cgroup's OOM-kill
        counter, or the watcher having killed the tree when /proc showed it above `memory_mb`."""
        group = self._group()
        if group is not None and group.oom_kills() > 0:
            return True
        return self.killed_for == "memory"

    def mechanisms(self) -> dict:
        """What held each limit, for the trial's record."""
        group = self._group()
        return {"level": self.level,
                "tree": "cgroup" if group else ("pid-namespace" if self.level == "namespaces" else "subreaper"),
                "memory": "cgroup" if group else "watcher+oom_score_adj",
                "processes": "cgroup" if group else "rlimit",
                "disk": "tmpfs" if scratch_is_tmpfs(Path(self.policy.scratch)) else "watcher+rlimit_fsize"}

    # -- the watcher -----------------------------------------------------------------------------

    def _sample(self) -> list[procfs.Proc]:
        members = self.members()
        if members:
            self._sampled = True
            live = [p for p in members if p.state != "Z"]
            self._peak_private_mb = max(self._peak_private_mb, sum(procfs.private_mb(p) for p in live))
            self._cpu_seen = max(self._cpu_seen, sum(p.cpu_seconds + p.children_cpu_seconds for p in members))
        return members

    def _watch(self) -> None:
        next_disk = 0.0
        while not self._closed.wait(POLL_S):
            with self._lock:
                members = self._sample()
            if not any(p.state != "Z" for p in members):
                if procfs.read(self.pid) is None:
                    return  # the child was reaped: nothing left to watch
                continue
            if self._group() is None and self.policy.memory_mb and self._peak_private_mb > self.policy.memory_mb:
                self._end("memory")
            elif time.monotonic() >= next_disk:
                next_disk = time.monotonic() + DISK_POLL_S
                scratch = Path(self.policy.scratch)
                if not scratch_is_tmpfs(scratch) and tree_size_mb(scratch) > self.policy.disk_mb:
                    self._end("disk")

    def _end(self, why: str) -> None:
        self.killed_for = why
        self.kill_all()


def _reaped(pid: int) -> bool:
    """Reap `pid` if it is a dead child of this process; True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
