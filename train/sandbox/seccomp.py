"""A small seccomp filter for what Landlock does not cover: sockets of any kind (UDP and unix
sockets too, not only TCP), io_uring (which would reach sockets and files around this filter), the
system calls that build new namespaces or mounts, those that inspect or move into other processes,
and (where no read-only mount does it) changes to files' metadata, and System V IPC and POSIX message
queues (shared state that outlives its process, outside any file Landlock guards), page-cache
eviction and residency queries, lock queries and file-event watches. Each is refused with EPERM, so
a candidate sees an ordinary error, not a crash. File locks (flock, fcntl's lock commands) succeed
and do nothing: a lock on a file every trial reads is seen by the others.

`socketpair` stays allowed: it connects only the two ends it creates (pipes between a trial's own
processes, e.g. multiprocessing.Pipe). `clone3` answers ENOSYS, so the C library falls back to
`clone`, whose flags a filter can read (clone3 passes them in memory it cannot). Of ioctl only
TIOCSTI and TIOCLINUX are refused: they would type into, or take over, a terminal the sandbox
inherited.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import struct

from .kernel import PR_SET_SECCOMP, prctl

# (audit arch, {syscall: number}) per machine; a machine missing here has no seccomp level.
_X86_64 = (0xC000003E, {
    "socket": 41, "ptrace": 101, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166,
    "init_module": 175, "delete_module": 176, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
    "clone": 56, "clone3": 435, "ioctl": 16,
    "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65, "semctl": 66, "shmdt": 67, "msgget": 68,
    "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "semtimedop": 220, "mq_open": 240, "mq_unlink": 241,
    "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245, "sched_setaffinity": 203,
    "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "utime": 132, "utimes": 235,
    "fchownat": 260, "futimesat": 261, "fchmodat": 268, "utimensat": 280, "setxattr": 188, "lsetxattr": 189,
    "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "fchmodat2": 452,
    "setxattrat": 463, "removexattrat": 466,
    "fadvise64": 221, "cachestat": 451, "mincore": 27, "madvise": 28, "process_madvise": 440,
    "fcntl": 72, "flock": 73, "inotify_init": 253, "inotify_add_watch": 254, "inotify_init1": 294,
    "fanotify_init": 300, "fanotify_mark": 301,
})
_AARCH64 = (0xC00000B7, {
    "socket": 198, "ptrace": 117, "pivot_root": 41, "chroot": 51, "mount": 40, "umount2": 39,
    "init_module": 105, "delete_module": 106, "kexec_load": 104, "add_key": 217, "request_key": 218,
    "keyctl": 219, "unshare": 97, "perf_event_open": 241, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
    "finit_module": 273, "kexec_file_load": 294, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
    "clone": 220, "clone3": 435, "ioctl": 29,
    "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184,
    "mq_getsetattr": 185, "msgget": 186, "msgctl": 187, "msgrcv": 188, "msgsnd": 189, "semget": 190, "semctl": 191,
    "semtimedop": 192, "semop": 193, "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197,
    "sched_setaffinity": 122,
    "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55, "utimensat": 88, "setxattr": 5,
    "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
    "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
    "fadvise64": 223, "cachestat": 451, "mincore": 232, "madvise": 233, "process_madvise": 440,
    "fcntl": 25, "flock": 32, "inotify_add_watch": 27, "inotify_init1": 26, "fanotify_init": 262, "fanotify_mark": 263,
})
MACHINES = {"x86_64": _X86_64, "aarch64": _AARCH64}
# System V IPC and POSIX message queues outlive the process that made them and are not files
# Landlock sees: without an IPC namespace (the `landlock` level) a trial could leave state there for
# a later one (when sandboxed model servers were handed validation batches, one told the next which
# batch was the causality probe: 0.23 bits per byte against an honest 3.7).
IPC = ("shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv",
       "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr")
# The launcher pins each slot to its share of the cores; a trial that re-pinned itself to every core
# took its siblings' CPU (and, under a seconds budget, their compute).
CPUS = ("sched_setaffinity",)
# The page cache of the files every trial may read (the venv, the interpreter) is kernel state that
# outlives a trial: evicting pages (fadvise DONTNEED, madvise PAGEOUT or COLD) and asking which are
# resident (mincore, cachestat) are how one trial would leave bits for a later one. With these
# refused a trial can only make pages resident (by reading) and a later one can only time its reads
# (docs/THREAT_MODEL.md: what that channel can still carry).
PAGE_CACHE = ("fadvise64", "cachestat", "mincore", "process_madvise")
MADV_COLD, MADV_PAGEOUT = 20, 21
# Trials of parallel slots read the same files, and a lock on one is kernel state the others see: a
# POSIX read lock (a read-only descriptor is enough) may start at any of 2^63 offsets, which F_GETLK
# in another trial reads back (a trial read 64 KB so in 1.4 s: two colluding trials could average
# their weights as they train), flock carries a bit a file, and inotify or fanotify watches see
# another trial open or read a file. So in the sandbox placing a lock succeeds and does nothing (a
# library that locks its own cache, e.g. torch.compile's, still runs), asking about locks and
# watching files are refused. The trial's own processes cannot exclude each other through locks.
FILE_EVENTS = ("inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark")
F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_NOTIFY = 5, 6, 7, 36, 37, 38, 1024, 1026
LOCK_NO_OP = (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW)
LOCK_DENIED = (F_GETLK, F_OFD_GETLK, F_SETLEASE, F_NOTIFY)
DENIED = ("socket", "ptrace", "pivot_root", "chroot", "mount", "umount2", "init_module", "delete_module",
          "kexec_load", "add_key", "request_key", "keyctl", "unshare", "perf_event_open", "name_to_handle_at",
          "open_by_handle_at", "setns", "process_vm_readv", "process_vm_writev", "finit_module",
          "kexec_file_load", "bpf", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
          "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_getfd", "mount_setattr") + IPC + CPUS \
    + PAGE_CACHE + FILE_EVENTS
# Landlock (ABI <= 7) does not guard a file's metadata: without this a sandbox could chmod, chown,
# re-date or tag any file its uid owns (as an unprivileged user: the project, the study's journal).
# The `namespaces` level has no need of it: there every mount but the scratch is read-only.
METADATA = ("chmod", "fchmod", "chown", "fchown", "lchown", "utime", "utimes", "fchownat", "futimesat",
            "fchmodat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
            "fremovexattr", "fchmodat2", "setxattrat", "removexattrat")
# ioctls that push input into a terminal (typed as if by its user) or take over the console.
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
X32_SYSCALL_BIT = 0x40000000

_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_SECCOMP_MODE_FILTER = 2


def _errno(code: int) -> int:
    return 0x00050000 | code


def supported() -> bool:
    return platform.machine() in MACHINES


def program(deny_metadata: bool) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; seccomp_data is nr at 0, arch at 4, args at 16."""
    arch, numbers = MACHINES[platform.machine()]
    ops = [(_LD_ABS_W, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _RET_KILL_PROCESS), (_LD_ABS_W, 0, 0, 0)]
    if arch == _X86_64[0]:  # the x32 ABI reuses this arch value with other numbers: refuse it whole
        ops += [(_JGE, 0, 1, X32_SYSCALL_BIT), (_RET, 0, 0, _errno(errno.EPERM))]
    for name in DENIED + (METADATA if deny_metadata else ()):
        if name in numbers:  # a newer machine lacks the old calls (aarch64 has no chmod, only fchmodat)
            ops += [(_JEQ, 0, 1, numbers[name]), (_RET, 0, 0, _errno(errno.EPERM))]
    ops += [(_JEQ, 0, 1, numbers["clone3"]), (_RET, 0, 0, _errno(errno.ENOSYS))]
    ops += [(_JEQ, 0, 4, numbers["clone"]), (_LD_ABS_W, 0, 0, 16), (_JSET, 0, 1, NAMESPACE_FLAGS),
            (_RET, 0, 0, _errno(errno.EPERM)),
            (_RET, 0, 0, _RET_ALLOW)]
    # madvise stays (allocators return memory with DONTNEED), but not the advice that evicts pages
    ops += [(_JEQ, 0, 5, numbers["madvise"]), (_LD_ABS_W, 0, 0, 32), (_JEQ, 2, 0, MADV_COLD), (_JEQ, 1, 0, MADV_PAGEOUT),
            (_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _errno(errno.EPERM))]
    ops += [(_JEQ, 0, 1, numbers["flock"]), (_RET, 0, 0, _errno(0))]  # a lock that locks nothing
    # fcntl: load its command; a lock command -> success doing nothing, a lock query or watch -> EPERM
    commands = len(LOCK_NO_OP) + len(LOCK_DENIED)
    ops += [(_JEQ, 0, commands + 4, numbers["fcntl"]), (_LD_ABS_W, 0, 0, 24)]
    ops += [(_JEQ, commands - i, 0, cmd) for i, cmd in enumerate(LOCK_NO_OP)]
    ops += [(_JEQ, commands - len(LOCK_NO_OP) - i + 1, 0, cmd) for i, cmd in enumerate(LOCK_DENIED)]
    ops += [(_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _errno(0)), (_RET, 0, 0, _errno(errno.EPERM))]
    ops += [(_JEQ, 0, 4, numbers["ioctl"]), (_LD_ABS_W, 0, 0, 24), (_JEQ, 1, 0, TIOCSTI), (_JEQ, 0, 1, TIOCLINUX),
            (_RET, 0, 0, _errno(errno.EPERM))]
    ops += [(_RET, 0, 0, _RET_ALLOW)]
    return ops


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(*, deny_metadata: bool) -> None:
    """Load the filter into this thread (inherited by every child, irreversible). Needs no_new_privs
    (set by Landlock first) or CAP_SYS_ADMIN."""
    ops = program(deny_metadata)
    raw = b"".join(struct.pack("=HBBI", *op) for op in ops)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    prog = _Prog(len(ops), ctypes.cast(buffer, ctypes.c_void_p))
    prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog))
