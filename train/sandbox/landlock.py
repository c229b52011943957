"""Landlock, through its three system calls (ctypes, no dependency): an unprivileged, irreversible
allow-list of what this process and everything it starts may touch.

Why Landlock: it needs no privilege and no namespaces, so it holds the same on a root CI runner and
on a Slurm node where user namespaces are blocked; a ruleset only ever narrows (a process may stack
another one, never widen its own); and the kernel also refuses a sandboxed process ptrace (and so
/proc/<pid>/environ, mem, fd) of any process outside its domain. Per ABI version:

    1  files: read, write, execute, make, remove (rules are directory or file trees)
    2  rename/link across directories (REFER)       3  truncate
    4  TCP bind and connect                         5  device ioctl
    6  scoping: no signal to, no abstract unix socket of, a process outside the domain
    7  audit logging (nothing new to enforce)

Everything this module's ABI knows is handled (denied unless a rule allows it), so a newer kernel
never weakens a ruleset built here.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
from pathlib import Path

from .kernel import PR_SET_NO_NEW_PRIVS, prctl
from .kernel import syscall as _syscall

# System call numbers are the same on every architecture Landlock exists on (asm-generic numbering
# for the new calls), x86_64 and aarch64 included.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

# Filesystem access rights, and the ABI that introduced each.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a file (not a directory) may grant
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = READ_FILE | READ_DIR | EXECUTE
DEVICE = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (too old, not built, or not enabled
    in the `lsm=` boot list)."""
    if platform.system() != "Linux":
        return 0
    try:
        return _syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def handled_fs(abi: int) -> int:
    return FS_BY_ABI[min(abi, 5)]


def restrict_self(*, read: tuple[Path, ...], write: tuple[Path, ...], devices: tuple[Path, ...] = (),
                  abi: int | None = None) -> int:
    """Confine this thread and all it starts from now on: files under `read` may be read and
    executed, files under `write` also created, changed and removed, `devices` (character devices
    such as /dev/null or /dev/nvidia0) opened read-write with ioctl; nothing else. With ABI >= 4 no
    TCP port may be bound or connected; with ABI >= 6 no signal and no abstract unix socket reaches
    a process outside this sandbox. Sets no_new_privs (Landlock requires it, and it also means no
    set-uid binary ever runs with its owner's rights). Returns the ABI used; raises OSError."""
    abi = abi_version() if abi is None else abi
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not available on this kernel")
    fs = handled_fs(abi)
    attr = RulesetAttr(handled_access_fs=fs,
                       handled_access_net=(NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                       scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    ruleset = _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        for paths, access in ((read, READ), (write, fs), (devices, DEVICE)):
            for path in paths:
                _allow(ruleset, Path(path), access & fs)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall(SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: Path, access: int) -> None:
    """A rule for `path` and everything beneath it; a missing path is skipped (a readable list names
    what may exist, e.g. /lib64), since nothing can be read through it anyway."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(path):
            access &= FILE_ONLY
        rule = PathBeneathAttr(allowed_access=access, parent_fd=fd)
        _syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)
