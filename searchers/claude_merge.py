"""The combine tool's merge: two parents' changes to train.py applied together.

A three-way merge against their nearest common ancestor, by `git merge-file` (the merge every
programmer's tools use): edits to different lines both apply; edits to the same lines leave
conflict markers, which do not compile, so the agent must resolve them before the candidate can
be submitted (submit checks that it compiles).
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def merge(ancestor: str, first: str, second: str, names: tuple[str, str, str]) -> tuple[str, int]:
    """(merged source, number of conflicts)."""
    with tempfile.TemporaryDirectory(prefix="arena-merge-") as tmp:
        paths = []
        for name, text in zip(("first", "ancestor", "second"), (first, ancestor, second)):
            path = Path(tmp) / name
            path.write_text(text)
            paths.append(str(path))
        labels = [names[0], names[2], names[1]]  # git merge-file takes: current, base, other
        proc = subprocess.run(["git", "merge-file", "-p", "-L", labels[0], "-L", labels[1], "-L", labels[2], *paths],
                              capture_output=True, text=True, timeout=30)
    if proc.returncode < 0 or proc.returncode > 127:
        raise RuntimeError(f"git merge-file failed: {proc.stderr.strip()}")
    return proc.stdout, proc.returncode


def common_ancestor(first: str | None, second: str | None, parent_of: dict[str, str | None]) -> str | None:
    """The nearest trial both descend from (None: the baseline)."""
    def line(tid: str | None) -> list[str]:
        seen = []
        while tid is not None and tid not in seen:
            seen.append(tid)
            tid = parent_of.get(tid)
        return seen
    ancestors = set(line(first))
    return next((t for t in line(second) if t in ancestors), None)
