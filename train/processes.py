"""Starting and ending the trial's sandboxed process: the training worker.

It is a child in its own session, connected to the trusted harness by one socket and an output pipe
and nothing else: a fork of the harness where that is safe (CPU: torch is already imported, a child
starts in milliseconds) or a fresh interpreter (a CUDA runtime does not survive a fork). Either way
the child closes every other descriptor, waits for the harness's `go` (the harness first puts it
under a sandbox.ProcessTree), enters the sandbox with sandbox.confine, and only then touches
candidate code. The harness forks it before it has read validation tokens or the result key and
reads them only after the child's whole tree is dead, so no process that runs candidate code holds
either.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

from train import sandbox, wire

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def fork_safe() -> bool:
    """Whether a child may be a fork of this process: not with a GPU build that can see a GPU (the
    CUDA runtime does not survive a fork), so those children pay a fresh interpreter (2-3 s, under
    1% of a GPU trial's budget)."""
    import torch

    if os.environ.get("ARENA_SPAWN_WORKER") == "1":  # the GPU path, forced (tests, debugging)
        return False
    gpu_build = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
    return not gpu_build or os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def readable_paths(*extra) -> tuple[Path, ...]:
    """What a sandboxed child may read: the interpreter, its standard library and packages, the
    small part of this project it runs (train/), and `extra` (the trial's code folder); never the
    study, the trial folder or the token caches."""
    return tuple(sorted({*sandbox.python_readable(), PROJECT_ROOT / "train", *map(Path, extra)}))


class Confined:
    """One sandboxed child running `role` ("worker"): `sock` talks to it, `output_fd` (the write end
    of a pipe the harness drains, runlog.RunLog.pipe) takes its stdout and stderr and is closed
    here. Its scratch (policy.scratch) stays readable here after end() and is unmounted by close()."""

    def __init__(self, role: str, policy: sandbox.Policy, level: str, output_fd: int, config: dict, fork: bool):
        ours, theirs = socket.socketpair()
        policy = dataclasses.replace(policy, keep_fds=(theirs.fileno(),))
        self.role, self.policy, self.level = role, policy, level
        self.sock, self.code, self.popen = ours, None, None
        log_fd = output_fd
        try:
            if fork:
                sys.stdout.flush()
                sys.stderr.flush()
                self.pid = os.fork()
                if self.pid == 0:
                    ours.close()
                    _child(theirs.fileno(), log_fd)
            else:
                command = [sys.executable, "-P", "-m", "train.processes", str(theirs.fileno())]
                env = sandbox.allowed_env(policy.scratch, {"PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"})
                self.popen = subprocess.Popen(command, cwd=policy.scratch, env=env, stdout=log_fd, stderr=log_fd,
                                              stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                              start_new_session=True)
                self.pid = self.popen.pid
        finally:
            os.close(log_fd)
            theirs.close()
        self.tree = sandbox.ProcessTree(self.pid, policy, level)
        wire.send(self.sock, {"role": role, "level": level, "policy": policy.to_json(), **config})

    def exited(self) -> bool:
        if self.code is None:
            if self.popen is not None:
                self.code = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
        return self.code is not None

    def end(self) -> int | None:
        """Kill the child and everything it started; its exit code (negative: that signal)."""
        self.tree.kill_all()
        if self.code is None:
            if self.popen is not None:
                self.code = self.popen.wait()
            else:
                self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.sock.close()
        return self.code

    def close(self) -> None:
        """end(), then let go of the tree: its cgroup, its watcher, its scratch tmpfs."""
        self.end()
        self.tree.close()


def _child(fd: int, log_fd: int | None) -> None:
    """A child's whole life; it never returns."""
    code = 1
    try:
        if os.getsid(0) != os.getpid():  # a fork; a spawned child started in its own session
            os.setsid()
        if log_fd is not None:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        keep = sorted({0, 1, 2, fd})
        for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        sock = socket.socket(fileno=fd)
        go, _, _ = wire.recv(sock)
        sandbox.confine(sandbox.Policy.from_json(go["policy"]), go["level"])
        _fresh_randomness()
        if go["role"] != "worker":
            raise ValueError(f"unknown role {go['role']!r}")
        from train.worker import worker_main

        worker_main(sock, go)
        code = 0
    except BaseException:  # noqa: BLE001 - the harness reads the outcome from the socket, not from here
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # threads the candidate left behind must not keep the child alive


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _fresh_randomness() -> None:
    """A fork must not repeat its siblings' unseeded draws (train.py seeds torch through `run`)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


if __name__ == "__main__":  # a spawned child: python -P -m train.processes FD
    _child(int(sys.argv[1]), None)
