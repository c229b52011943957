"""The two raw libc entry points the sandbox needs, with every argument a full machine word (prctl
and syscall are variadic: a 32-bit int in a 64-bit slot leaves garbage the kernel may reject)."""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 3, 4, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22


def _word(arg):
    return ctypes.c_ulong(arg) if isinstance(arg, int) else arg


def syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *map(_word, args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def prctl(option: int, arg2=0, arg3=0, arg4=0, arg5=0) -> int:
    result = _libc.prctl(ctypes.c_int(option), *map(_word, (arg2, arg3, arg4, arg5)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")
    return result
