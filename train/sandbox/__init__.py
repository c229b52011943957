"""Every trial in a sandbox: what a candidate train.py (written by an adversarial agent) can touch
while it trains or serves logits, and how the trusted parent ends all it started.

    tree_root = os.fork()                       # or spawn `python -P -m ...` that calls confine() first
    if tree_root == 0:
        confine(policy, level)                  # irreversible; raises rather than run weaker
        ...import and run the candidate...
    tree = ProcessTree(tree_root, policy, level)
    ...wait...; tree.kill_all(); tree.oom_killed(); tree.cpu_seconds(); tree.close()

Levels, strongest first (docs/THREAT_MODEL.md says what each guarantees and what none does):

    namespaces  user, PID, network, mount, IPC, UTS namespaces, then everything `landlock` does
    landlock    Landlock: files read-only but the scratch, nothing else visible; no TCP; no signal or
                abstract socket out of the sandbox (ABI >= 6); seccomp: no socket at all, no
                io_uring, no namespace, mount, ptrace or process_vm_*; no_new_privs; capabilities
                and, as root, the uid dropped; rlimits; the tree killed whole through a subreaper
    none        nothing but the allow-listed environment: an explicit opt-out, recorded as such

Standard library only: it travels with train/ to the GPU nodes.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import landlock, limits, namespaces, procfs, seccomp
from .cgroup import Cgroup, cgroup_name
from .kernel import (PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_CAPBSET_DROP, PR_SET_DUMPABLE, PR_SET_PDEATHSIG,
                     prctl)
from .scratch import Scratch, sweep
from .tree import ProcessTree, become_subreaper

__all__ = ["LEVELS", "Policy", "ProcessTree", "SandboxUnavailable", "Scratch", "allowed_env", "available_level",
           "become_subreaper", "check_level", "confine", "gpu_devices", "harden_orchestrator",
           "python_readable", "sweep"]

LEVELS = ("namespaces", "landlock", "none")
LANDLOCK_LEVEL_ABI = 6  # the `landlock` level needs signal and abstract-socket scoping (Linux 6.12)
NOBODY = 65534
# Environment variables a trial may inherit; values of these never hold a secret.
ALLOWED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "ARENA_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
               "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
ALLOWED_ENV_PREFIXES = ("LC_",)
# A trial's caches go to its scratch: nothing it writes outlives it or reaches the next trial.
SCRATCH_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
               "MPLCONFIGDIR", "CUDA_CACHE_PATH")


class SandboxUnavailable(RuntimeError):
    """The sandbox asked for cannot be had on this host; the message is one line that says why and
    what to do."""


@dataclass(frozen=True)
class Policy:
    """What a confined tree may touch. `scratch` is the only writable folder (created, private and
    empty, by the caller; emptied by it at the end); `readable` are read-only trees (interpreter,
    venv, the run-API code, the candidate's own file); `env` is the whole environment
    (allowed_env()); `devices` are character devices opened read-write (gpu_devices())."""

    scratch: Path
    readable: tuple[Path, ...]
    env: dict[str, str]
    memory_mb: int | None = None
    max_processes: int = 64
    disk_mb: int = 1024
    cpu_seconds: float | None = None  # RLIMIT_CPU per process: a backstop behind the wall-clock limit
    devices: tuple[Path, ...] = ()
    keep_fds: tuple[int, ...] = ()  # open descriptors the child keeps besides 0, 1, 2 (e.g. a pipe)

    def to_json(self) -> str:
        """For a spawned child: `confine(Policy.from_json(argv[i]), level)` at its top."""
        data = asdict(self)
        data.update(scratch=str(self.scratch), readable=[str(p) for p in self.readable],
                    devices=[str(p) for p in self.devices], keep_fds=list(self.keep_fds))
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        data.update(scratch=Path(data["scratch"]), readable=tuple(map(Path, data["readable"])),
                    devices=tuple(map(Path, data["devices"])), keep_fds=tuple(data["keep_fds"]))
        return cls(**data)


def allowed_env(scratch: Path | str, extra: dict | None = None) -> dict[str, str]:
    """The trial's complete environment: the allow-listed variables of this one (locale, threads,
    which GPU), home, temp and caches in the scratch, and `extra` (the caller's own, trusted)."""
    env = {k: v for k, v in os.environ.items() if k in ALLOWED_ENV or k.startswith(ALLOWED_ENV_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(dict.fromkeys(SCRATCH_ENV, str(scratch)))
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # its worker pool wants sockets and a shared /dev/shm
    env.update(extra or {})
    return env


def python_readable() -> tuple[Path, ...]:
    """What this interpreter needs to read: its prefixes (venv, stdlib, site-packages), the system
    libraries and tools, and the few files of /etc that libc and Python consult. Never the project
    root: the caller adds the code the trial may read, file by file or folder by folder."""
    paths = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths.add(Path(sys.executable).resolve().parent.parent)
    paths |= {Path(p) for p in ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/opt/conda")}
    paths |= {Path("/etc") / name for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
                                                "passwd", "group", "nsswitch.conf", "alternatives")}
    # Hardware descriptions the CPU and CUDA runtimes read (cores, caches, NUMA, the PCI devices);
    # no secret lives there, and nothing there is writable to the sandbox.
    paths |= {Path(p) for p in ("/proc", "/sys/devices", "/sys/bus", "/sys/class", "/sys/module", "/sys/fs/cgroup")}
    return tuple(sorted(p for p in paths if os.path.exists(p)))


def gpu_devices() -> tuple[Path, ...]:
    """The NVIDIA device files CUDA opens (every GPU: CUDA_VISIBLE_DEVICES picks among them), with
    the MIG capability files under /dev/nvidia-caps."""
    found = [*Path("/dev").glob("nvidia*"), *Path("/dev/nvidia-caps").glob("*")]
    return tuple(sorted(p for p in found if not p.is_dir()))


BASE_DEVICES = tuple(Path("/dev") / n for n in ("null", "zero", "full", "random", "urandom"))


# ----------------------------------------------------------------------------------------------
# Which level this host offers


@functools.cache
def available_level() -> str:
    """The strongest level this host supports, probed once (a forked child tries the real thing)."""
    if not sys.platform.startswith("linux") or not seccomp.supported():
        return "none"
    abi = landlock.abi_version()
    if abi >= 1 and _probe_namespaces():
        return "namespaces"
    return "landlock" if abi >= LANDLOCK_LEVEL_ABI else "none"


def _probe_namespaces() -> bool:
    """A process killed while it probes (a study stopped as it starts) leaves its folder to the
    next sweep: it is a Scratch."""
    with Scratch("sandbox-probe") as scratch:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                readable = python_readable()
                namespaces.enter(*_identity(readable, "namespaces"), scratch.path, shm_mb=1, readable=readable)
                code = 0 if procfs.read(1) is not None and os.getpid() == 2 else 1
            except BaseException:  # noqa: BLE001 - any failure means the level is not available
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def check_level(asked: str) -> str:
    """The level a study runs at: `asked`, or for "strongest"/"auto" the best available. Raises
    SandboxUnavailable (one line) when this host cannot give what was asked, never runs weaker."""
    best = available_level()
    if asked in ("strongest", "auto"):
        return best
    if asked not in LEVELS:
        raise SandboxUnavailable(f"objective.sandbox must be one of {', '.join(LEVELS)} or strongest, got {asked!r}")
    if LEVELS.index(asked) < LEVELS.index(best):
        raise SandboxUnavailable(unavailable_message(asked, best))
    return asked


def unavailable_message(asked: str, best: str) -> str:
    why = {"namespaces": "unprivileged user namespaces are blocked here (sysctl user.max_user_namespaces, "
                         "kernel.unprivileged_userns_clone or an AppArmor userns restriction)",
           "landlock": f"Landlock ABI >= {LANDLOCK_LEVEL_ABI} is missing (Linux >= 6.12 with landlock in the "
                       f"lsm= list; this kernel has ABI {landlock.abi_version()})"}[asked]
    return (f"error: sandbox level {asked!r} is not available on this host: {why}; "
            f"the strongest here is {best!r} (set objective.sandbox={best} to accept it)")


# ----------------------------------------------------------------------------------------------
# Confining the child


def confine(policy: Policy, level: str) -> None:
    """Confine this process and all it will start, for good; call it in the child right after fork
    (or first thing in a spawned interpreter), before any candidate code is imported. Raises
    (OSError, SandboxUnavailable) rather than confine less than `level` asks. At `namespaces` the
    process forks twice inside and only the innermost one returns (see namespaces.py)."""
    if level not in LEVELS:
        raise SandboxUnavailable(f"unknown sandbox level {level!r}; one of {', '.join(LEVELS)}")
    if not Path(policy.scratch).is_dir():
        raise ValueError(f"sandbox: the scratch folder {policy.scratch} does not exist (the caller creates it)")
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the trusted parent
    _close_fds(policy.keep_fds)
    if level != "none":
        if procfs.threads() != 1:
            raise SandboxUnavailable("confine() needs a single-threaded process (a fresh fork or interpreter); "
                                     f"this one runs {procfs.threads()} threads")
        scratch = Path(policy.scratch).resolve()
        uid, gid = _identity(policy.readable, level)
        if os.geteuid() == 0:
            Cgroup.create(cgroup_name(policy.scratch, os.getpid()), policy.memory_mb, policy.max_processes)
            if not limits.mount_scratch(scratch, policy.disk_mb, uid, gid):
                os.chown(scratch, uid, gid)
        limits.raise_oom_score()
        limits.set_rlimits(policy, uid)
        _drop_bounding_set()
        if level == "namespaces":
            namespaces.enter(uid, gid, scratch, shm_mb=min(policy.disk_mb, 256), readable=policy.readable)
        else:
            _drop_identity(uid, gid)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a changed uid clears it
        _drop_capabilities()
        private_shm = (Path("/dev/shm"),) if level == "namespaces" and os.path.isdir("/dev/shm") else ()
        landlock.restrict_self(read=tuple(policy.readable), write=(scratch, *private_shm),
                               devices=BASE_DEVICES + tuple(policy.devices))
        seccomp.install(deny_metadata=level != "namespaces")
    os.environ.clear()
    _scrub_initial_environment()
    os.environ.update(policy.env)
    os.chdir(policy.scratch)


def _scrub_initial_environment() -> None:
    """Zero the environment block the kernel set up at exec: a fork inherits it (and shows it as
    /proc/self/environ) even after os.environ is replaced. Other copies of the parent's memory stay
    readable to a forked child, so whatever forks a trial must itself hold no secret."""
    try:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read().decode()
        fields = raw[raw.rindex(")") + 2:].split()
        start, end = int(fields[47]), int(fields[48])
    except (OSError, IndexError, ValueError):
        return
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def _close_fds(keep: tuple[int, ...]) -> None:
    """Landlock judges opening, not using: a descriptor inherited from the harness (a journal, a
    database) would stay usable, so all but stdio and `keep` are closed."""
    low = 3
    for fd in sorted(set(keep)) + [None]:
        os.closerange(low, fd if fd is not None else 1 << 20)
        low = fd + 1 if fd is not None else low


def _identity(readable, level: str) -> tuple[int, int]:
    """The uid the sandbox runs as. Unprivileged: this one. As root: nobody, which owns no file the
    trial can read (so the kernel answers no page-cache residency query on them); at `namespaces`
    always (its mount namespace makes a readable tree under a folder nobody may pass reachable,
    namespaces._reveal), at `landlock` if nobody can read every `readable` path by its mode bits,
    otherwise root without a single capability (Landlock, not ownership, then guards the files)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    if level == "namespaces" or all(_others_can_read(Path(p)) for p in readable):
        return NOBODY, NOBODY
    return 0, 0


def _others_can_read(path: Path) -> bool:
    try:
        path = path.resolve()
        for directory in path.parents:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return True  # a missing path is skipped by Landlock too


def _drop_identity(uid: int, gid: int) -> None:
    if os.geteuid() == uid:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _drop_bounding_set() -> None:
    """With it empty no execve can hand out a capability again (root's own binaries included)."""
    if os.geteuid() != 0:
        return
    for cap in range(64):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break  # past the last capability this kernel knows


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """Empty the effective, permitted, inheritable and ambient sets: root without capabilities here
    (and, at `namespaces`, without the capabilities a new user namespace grants its creator)."""
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(version=0x20080522, pid=0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: cannot drop capabilities")


def harden_orchestrator() -> None:
    """Make this process non-dumpable: no process of its uid may ptrace it or read its
    /proc/<pid>/environ, mem or fd (where ANTHROPIC_API_KEY lives), sandboxed or not."""
    prctl(PR_SET_DUMPABLE, 0)
