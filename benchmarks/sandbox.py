"""What the sandbox costs a trial, per level, on this machine: the time confine() takes in the
child, the whole fork -> confine -> exit -> kill_all -> close round trip seen by the parent, and
kill_all of a tree of 20 sleeping processes. Optionally from a parent that imported torch (the warm
CPU slot's case: a fork of a big process).

    python benchmarks/sandbox.py                  # 20 rounds per level
    python benchmarks/sandbox.py --torch --rounds 10
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train import sandbox  # noqa: E402


def one_round(level: str, scratch: Path, children: int) -> tuple[float, float, float, float]:
    """(confine seconds in the child, fork-to-close seconds, kill_all seconds, tree CPU seconds)."""
    policy = sandbox.Policy(scratch=scratch, readable=sandbox.python_readable(), env=sandbox.allowed_env(scratch),
                            memory_mb=2048, max_processes=64, keep_fds=())
    read, write = os.pipe()
    policy = dataclasses.replace(policy, keep_fds=(write,))
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            t0 = time.perf_counter()
            sandbox.confine(policy, level)
            took = time.perf_counter() - t0
            for _ in range(children):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
            os.write(write, repr(took).encode())
            time.sleep(60 if children else 0)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    tree = sandbox.ProcessTree(pid, policy, level)
    confine_s = float(os.read(read, 64) or "nan")
    os.close(read)
    t_kill = time.perf_counter()
    tree.kill_all()
    kill_s = time.perf_counter() - t_kill
    os.waitpid(pid, 0)
    cpu = tree.cpu_seconds()
    tree.close()
    return confine_s, time.perf_counter() - started, kill_s, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--torch", action="store_true", help="import torch in the parent first")
    args = parser.parse_args()
    if args.torch:
        import torch

        torch.nn.Linear(4, 4)(torch.randn(2, 4)).sum().backward()
    sandbox.become_subreaper()
    t0 = time.perf_counter()
    best = sandbox.available_level()
    print(f"available_level() = {best!r}, probed in {1000 * (time.perf_counter() - t0):.1f} ms "
          f"(once per process); parent {'with' if args.torch else 'without'} torch, "
          f"uid {os.geteuid()}, {os.cpu_count()} CPUs")
    print(f"{'level':<11} {'children':>8} {'confine ms':>11} {'round trip ms':>14} {'kill_all ms':>12} "
          f"{'tree CPU ms':>12}   (median / p90 of {args.rounds})")
    for level in sandbox.LEVELS:
        for children in (0, 20):
            rows = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    rows.append(one_round(level, Path(tmp), children))
            cols = list(zip(*rows))
            fmt = [f"{1000 * statistics.median(c):.1f}/{1000 * sorted(c)[int(0.9 * (len(c) - 1))]:.1f}" for c in cols]
            print(f"{level:<11} {children:>8} {fmt[0]:>11} {fmt[1]:>14} {fmt[2]:>12} {fmt[3]:>12}")


if __name__ == "__main__":
    main()
