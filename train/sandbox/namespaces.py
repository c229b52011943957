"""The `namespaces` level's extra walls, built with unprivileged user namespaces: the candidate gets
its own PID namespace (it sees and signals only its own processes, and its init's death takes all of
them), an empty network namespace (no interface but a down loopback: no TCP, UDP or abstract unix
socket reaches anything), its own IPC and UTS namespaces, and a mount namespace with a fresh /proc
(only its own processes) and a private /dev/shm.

unshare(CLONE_NEWUSER) refuses a multi-threaded caller, and a PID namespace takes only the caller's
children, so the caller (single-threaded: a fork, or a fresh interpreter) unshares, then forks twice:

    caller (outside)  waits, exits as its child did          -- the pid the trusted parent holds
      init (pid 1)    mounts /proc, reaps orphans, exits as the candidate did
        candidate     returns from confine(), then Landlock and seccomp close over it

Each of the three dies with its parent (PR_SET_PDEATHSIG), and the kernel kills the whole namespace
when its init dies, so killing the outside pid kills the tree.
"""
from __future__ import annotations

import ctypes
import os
import signal
import stat
from pathlib import Path

from .kernel import PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, prctl, syscall

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
FLAGS = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1  # 442 on every arch
SYS_OPEN_TREE, SYS_MOVE_MOUNT, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 428, 429, 0x1, 0x4  # on every arch

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def enter(uid: int, gid: int, scratch: Path, shm_mb: int, readable=()) -> None:
    """Unshare, become `uid`/`gid`, let it reach the `readable` trees (see _reveal), make every
    mount but `scratch` read-only, and fork twice; returns only in the candidate (pid 2 of the new
    PID namespace). The two processes above it never return: they wait and exit with its status."""
    trees: dict[Path, list[tuple[Path, int]]] = {}
    if os.geteuid() == 0 and uid != 0:
        trees = _unshare_as_root(uid, gid, _blocked((*readable, scratch)))
    else:
        _unshare_as_self()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a changed uid clears it
    _fork_and_wait()  # the outside process stays here
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "mount --make-rprivate /")
    _reveal(trees)
    _read_only_but(scratch)
    _check(_libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), None),
           "mount /proc")
    if os.path.isdir("/dev/shm"):
        _check(_libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                           f"size={shm_mb}m,mode=1777".encode()), "mount /dev/shm")
    _fork_and_wait(init=True)  # init stays here


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _blocked(readable) -> dict[Path, list[Path]]:
    """Readable trees under a folder `nobody` may not pass (an interpreter under a 0700 /root), by
    the topmost such folder. Looked up while still root: nobody cannot even resolve those paths."""
    blocked: dict[Path, list[Path]] = {}
    for path in map(Path, readable):
        try:
            path = path.resolve(strict=True)
            top = next((d for d in reversed(path.parents) if d != d.parent and not os.stat(d).st_mode & stat.S_IXOTH),
                       None)
        except OSError:
            continue  # a missing path is skipped by Landlock too
        if top is not None:
            blocked.setdefault(top, []).append(path)
    return blocked


def _clone(blocked: dict[Path, list[Path]]) -> dict[Path, list[tuple[Path, int]]]:
    """Detached copies of the blocked trees (open_tree), made in the new mount namespace while this
    process still has root's file access; mounted back by _reveal."""
    trees: dict[Path, list[tuple[Path, int]]] = {}
    try:
        for top, paths in blocked.items():
            for path in paths:
                fd = syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
                trees.setdefault(top, []).append((path, fd))
    except OSError:
        for pairs in trees.values():
            for _, fd in pairs:
                os.close(fd)
        raise
    return trees


def _reveal(trees: dict[Path, list[tuple[Path, int]]]) -> None:
    """Let an unprivileged uid reach readable trees that lie under a folder it may not pass: each
    such top folder is covered by an empty tmpfs that holds the readable trees alone, bound at their
    own paths. The candidate then runs as nobody, owns no file it can read (the kernel answers no
    page-cache residency query on those), and sees nothing else of the folder (/root/.cache, where
    the token caches live)."""
    for top, pairs in trees.items():
        try:
            _check(_libc.mount(b"tmpfs", os.fsencode(top), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                               b"size=1m,mode=0755"), f"cover {top}")
            for path, fd in pairs:
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    path.mkdir(mode=0o755, exist_ok=True)
                else:
                    path.touch(mode=0o644, exist_ok=True)
                try:
                    syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(path), MOVE_MOUNT_F_EMPTY_PATH)
                except OSError as e:
                    raise OSError(e.errno, f"bind {path} under {top}: {e.strerror}") from None
        finally:
            for _, fd in pairs:
                os.close(fd)


def _read_only_but(scratch: Path) -> None:
    """Every mount read-only, then the scratch (bound onto itself: a mount of its own) writable
    again: no write, chmod, chown, utime or xattr change reaches any file outside it, whatever
    Landlock's ABI covers. mount_setattr (Linux 5.12) does it for the whole tree in one call."""
    def setattr_(path: bytes, flags: int, attr_set: int, attr_clr: int) -> None:
        attr = _MountAttr(attr_set=attr_set, attr_clr=attr_clr)
        try:
            syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path, flags, ctypes.byref(attr), ctypes.sizeof(attr))
        except OSError as e:
            raise OSError(e.errno, f"mount_setattr {path.decode()}: {e.strerror}") from None

    target = os.fsencode(scratch)
    # Recursive: a plain bind of a folder with mounts beneath it is refused in a user namespace.
    _check(_libc.mount(target, target, None, ctypes.c_ulong(MS_BIND | MS_REC), None), "bind the scratch")
    setattr_(b"/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
    setattr_(target, 0, 0, MOUNT_ATTR_RDONLY)


def _unshare_as_self() -> None:
    """The unprivileged way: a new user namespace where this process's own ids map to themselves
    (the only mapping it may write for itself)."""
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(ctypes.c_int(FLAGS)), "unshare")
    dumpable = prctl(PR_GET_DUMPABLE)
    prctl(PR_SET_DUMPABLE, 1)  # a changed uid leaves /proc/self root-owned; the maps need it ours
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    prctl(PR_SET_DUMPABLE, dumpable)


def _unshare_as_root(uid: int, gid: int, blocked: dict[Path, list[Path]]) -> dict[Path, list[tuple[Path, int]]]:
    """As root: unshare while privileged (so a distribution's restriction of unprivileged user
    namespaces does not apply), clone the `blocked` trees while root's file access lasts, let a
    helper left outside write the maps (a privileged parent may map any id, as newuidmap does), then
    become `uid` inside: host uid `uid` from then on. Returns the clones (see _reveal)."""
    go_read, go_write = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(go_write)
            target = os.getppid()
            if os.read(go_read, 1) == b"1":
                Path(f"/proc/{target}/uid_map").write_text(f"{uid} {uid} 1")
                Path(f"/proc/{target}/gid_map").write_text(f"{gid} {gid} 1")
                code = 0
        finally:
            os._exit(code)
    os.close(go_read)
    trees = {}
    try:
        _check(_libc.unshare(ctypes.c_int(FLAGS)), "unshare")
        trees = _clone(blocked)
        os.write(go_write, b"1")
    finally:
        os.close(go_write)
        _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"could not map uid {uid} into the sandbox's user namespace")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A changed uid makes the process non-dumpable, and its own /proc/self root's: it could not read
    # its own maps or environ. Dumpable lets a process of uid `uid` ptrace or read it, which the PID
    # namespace (no other process is visible), Landlock's ptrace scoping and seccomp refuse anyway.
    prctl(PR_SET_DUMPABLE, 1)
    return trees


def _fork_and_wait(init: bool = False) -> None:
    """Fork; the child returns (dying with this process), this process waits for it, reaping any
    other child it inherits, and leaves as it did. init cannot signal itself, so it reports "killed
    by signal n" as exit status 128+n and the outside process turns that back into the signal."""
    pid = os.fork()
    if pid == 0:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    code = 1
    try:
        while True:
            try:
                done, status = os.wait()
            except ChildProcessError:
                break
            if done == pid:
                code = os.waitstatus_to_exitcode(status)
                break
        if init:
            code = 128 - code if code < 0 else code
        else:
            killed_by = -code if code < 0 else (code - 128 if 128 < code < 128 + signal.NSIG else 0)
            if killed_by:
                signal.signal(killed_by, signal.SIG_DFL)
                os.kill(os.getpid(), killed_by)  # returns only for a signal whose default is to ignore
    finally:
        os._exit(code & 0xFF)
