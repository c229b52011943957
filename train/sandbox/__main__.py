"""What sandbox this host gives a trial, and why: `python -m train.sandbox` on a cluster node before
a study asks for `objective.sandbox`."""
from __future__ import annotations

import os
import platform

from . import LANDLOCK_LEVEL_ABI, _identity, _probe_namespaces, available_level, landlock, python_readable, seccomp
from .cgroup import Cgroup


def report() -> list[str]:
    abi = landlock.abi_version()
    uid, _ = _identity(python_readable(), available_level())
    who = ("root: trials run as uid 65534" if uid == 65534 else
           "root: trials run as uid 0 without capabilities (uid 65534 cannot read the interpreter, and "
           "only the namespaces level can make it reachable)")
    if os.geteuid() != 0:
        who = f"uid {os.geteuid()}: trials keep it (no cgroup: limits by rlimits and the parent's watcher)"
        group = "no (not root)"
    else:
        parent = next(iter(Cgroup.parents().values()))
        group = f"under {parent}" if os.access(parent, os.W_OK) else f"no ({parent} is not writable)"
    return [f"sandbox: strongest level here is {available_level()!r} (levels, strongest first: "
            "namespaces, landlock, none)",
            f"  landlock ABI {abi} (the landlock level needs >= {LANDLOCK_LEVEL_ABI}; namespaces >= 1)",
            f"  seccomp filter for {platform.machine()}: {'yes' if seccomp.supported() else 'no'}",
            f"  user namespaces: {'usable' if _probe_namespaces() else 'blocked or unusable'}",
            f"  per-trial cgroup: {group}",
            f"  {who}"]


if __name__ == "__main__":
    print("\n".join(report()))
