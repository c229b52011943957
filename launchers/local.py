"""Run trials on this machine: one per GPU, or N CPU slots with the cores split between them.

Each trial is the harness in its own session (process group), so a hard kill takes its whole tree.
A CPU slot keeps a warm harness (`python -m train.harness --serve`, torch imported once) that forks
each trial, so a trial starts training in well under a second instead of ~2.5 s of imports; a GPU
slot starts a fresh harness per trial (CUDA does not survive a fork). Trials outlive a `kill -9` of
the orchestrator, and a resumed study adopts a trial that is still running (or already wrote its
result) instead of running it twice. Whether it runs is its `running.lock`, locked before the trial's
first process exists (by the launcher for a cold harness, by the warm harness before its fork) and
held by every process of the trial: a pid file, written only after the pid is known, would leave a
window in which a kill makes a running trial look never started.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launchers.base import (BACKSTOP_S, KILL_GRACE_S, harness_env, kill_group, killed_at_limit, poll_until,
                            read_result, start_harness)
from study.core import Launcher, LauncherError, Slot
from study.records import Result, Trial
from train.contract import RESULT_FILE, RUNNING_LOCK

WARM_START_TIMEOUT_S = 300.0  # importing torch on a loaded machine; past this the slot goes cold
log = logging.getLogger(__name__)


@dataclass
class _Proc:
    trial: Trial
    slot: Slot
    pid: int | None  # None: adopted, its processes known only by the lock they hold
    popen: subprocess.Popen | None
    deadline: float  # past it the launcher kills the trial (the harness should have, at hard_limit_s)
    cancelled: bool = False
    killed_at_limit: bool = False


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, slots: int | str = "auto", gpus: str | list[int] | None = "auto",
                 threads_per_slot: int | None = None, pin_cores: bool = True, name: str = "local",
                 python: str | None = None, warm: bool = True):
        self.requested_slots = slots
        self.gpus = gpus
        self.threads_per_slot = threads_per_slot
        self.pin_cores = pin_cores
        self.python = python
        self.warm = warm
        self._slots: list[Slot] = []
        self._procs: dict[str, _Proc] = {}
        self._servers: dict[str, _WarmHarness] = {}

    # -- setup ------------------------------------------------------------------------------------
    def start(self) -> None:
        gpus = self._visible_gpus()
        if gpus:
            n = len(gpus) if self.requested_slots in ("auto", None) else int(self.requested_slots)
            if n < 1 or n > len(gpus):
                raise LauncherError(f"launcher.slots={n} but {len(gpus)} GPU(s) are visible (one trial per GPU)")
            self._slots = [
                Slot(name=f"gpu{idx}", device_kind=device_kind(gpu_name), info={"gpu": idx, "device": gpu_name})
                for idx, gpu_name in gpus[:n]
            ]
            return
        cores = sorted(os.sched_getaffinity(0))
        n = len(cores) if self.requested_slots in ("auto", None) else int(self.requested_slots)
        if n < 1:
            raise LauncherError(f"launcher.slots must be >= 1, not {n}")
        per = self.threads_per_slot or max(1, len(cores) // n)
        self._slots = []
        for i in range(n):
            own = [cores[(i * per + j) % len(cores)] for j in range(per)]
            self._slots.append(Slot(name=f"cpu{i}", device_kind="cpu", info={"threads": per, "cores": own}))
        if self.warm:  # they import torch while the searcher proposes the first candidates
            for slot in self._slots:
                if slot.name not in self._servers:
                    self._servers[slot.name] = _WarmHarness(slot, self._popen_harness, ["--serve"])

    def _visible_gpus(self) -> list[tuple[int, str]]:
        """GPUs from nvidia-smi, so the orchestrator never imports torch or touches CUDA."""
        if self.gpus in (None, "none", False, []):
            return []
        if not shutil.which("nvidia-smi"):
            if self.gpus not in ("auto",):
                raise LauncherError(f"launcher.gpus={self.gpus} but nvidia-smi is not on PATH")
            return []
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
        except (subprocess.SubprocessError, OSError):
            return []
        found = []
        for line in out.strip().splitlines():
            idx, _, gpu_name = line.partition(",")
            found.append((int(idx), gpu_name.strip()))
        if isinstance(self.gpus, (list, tuple)):
            found = [g for g in found if g[0] in set(self.gpus)]
        return found

    def slots(self) -> list[Slot]:
        if not self._slots:
            self.start()
        return list(self._slots)

    # -- running ----------------------------------------------------------------------------------
    def submit(self, trial: Trial, slot: Slot) -> None:
        trial_dir = Path(trial.directory)
        server = self._servers.get(slot.name)
        # Wait for a warm harness still importing torch (40 s on a loaded machine) only when no other
        # trial needs watching: with trials in flight (adopted ones after a restart) it starts cold.
        pid = server.run(trial_dir) if server and server.poll_ready(wait=not self._procs) else None
        popen = None
        if pid is None:  # a GPU slot, warm=false, a warm harness not ready or failed (logged): start cold
            if server and server.failed:
                del self._servers[slot.name]
            running = os.open(trial_dir / RUNNING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:  # locked here and handed to the harness, so it is held before the harness exists
                fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with open(trial_dir / "stdout.log", "ab") as out:
                    popen = self._popen_harness(slot, [str(trial_dir)], cwd=trial_dir, stdout=out,
                                                pass_fds=(running,))
            finally:
                os.close(running)
            pid = popen.pid
        (trial_dir / "pid").write_text(str(pid))
        now = time.time()
        limit = float(trial.objective.get("hard_limit_s") or 3600)
        self._procs[trial.trial_id] = _Proc(trial, slot, pid, popen, now + limit + BACKSTOP_S)

    def _popen_harness(self, slot: Slot, args: list[str], **kwargs) -> subprocess.Popen:
        """The harness on the slot's cores with the slot's environment (args[0]: the trial dir, or
        --serve for a warm harness)."""
        cores = slot.info.get("cores") if self.pin_cores else None

        def pin():  # runs in the child before exec: the slot's cores only
            os.sched_setaffinity(0, cores)

        if "gpu" in slot.info:
            env = harness_env(gpus=str(slot.info["gpu"]))
        else:
            env = harness_env(threads=slot.info.get("threads", 1), gpus="")
        return start_harness(args[0], env, python=self.python, args=tuple(args[1:]),
                             preexec_fn=pin if cores else None, **kwargs)

    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        return poll_until(self._poll, timeout, 0.02)

    def _poll(self) -> list[tuple[str, Result]]:
        done = []
        now = time.time()
        for trial_id, p in list(self._procs.items()):
            if now > p.deadline and not p.killed_at_limit:
                p.killed_at_limit = True
                _kill_trial(p)
            if _alive(p):
                continue
            del self._procs[trial_id]
            done.append((trial_id, self._result(p)))
        return done

    def _result(self, p: _Proc) -> Result:
        """What the trial left; the loop stamps where and when."""
        trial_dir = Path(p.trial.directory)
        if p.cancelled:
            return Result(status="cancelled", reason="cancelled by the study")
        if p.killed_at_limit:
            return killed_at_limit(trial_dir)
        code = f" with code {p.popen.returncode}" if p.popen else ""  # a forked trial is not our child
        result = read_result(trial_dir, reason=f"the harness ended{code} without a {RESULT_FILE}")
        if not (trial_dir / RESULT_FILE).exists():
            result.error = (result.error or "") + _tail(trial_dir / "stdout.log")
        # When it finished, not when we looked: an adopted trial may have ended long before.
        result.finished_at = _mtime(trial_dir / RESULT_FILE)
        return result

    def cancel(self, trial_id: str) -> None:
        p = self._procs.get(trial_id)
        if p and not p.cancelled:
            p.cancelled = True
            _kill_trial(p)

    def adopt(self, trial: Trial, slot: Slot) -> bool:
        """A trial from before a restart: adopt it if it is still running or already wrote its
        result; otherwise the loop runs it again."""
        trial_dir = Path(trial.directory)
        try:
            pid = int((trial_dir / "pid").read_text())
        except (OSError, ValueError):
            pid = None  # killed before the pid was written: the lock still says whether it runs
        running = _lock_held(trial_dir) or (pid is not None and _is_our_harness(pid, trial_dir))
        if not running and not (trial_dir / RESULT_FILE).exists():
            return False
        now = time.time()
        limit = float(trial.objective.get("hard_limit_s") or 3600)
        started = _mtime(trial_dir / RUNNING_LOCK) or _mtime(trial_dir / "pid") or now
        self._procs[trial.trial_id] = _Proc(trial, slot, pid, None, started + limit + BACKSTOP_S)
        if not running:
            self._procs[trial.trial_id].deadline = now + limit
        return True

    def close(self, cancel_running: bool = True) -> None:
        """With `cancel_running`, returns once the trials it cancelled are gone (SIGKILL after the
        grace): kill_group's delayed SIGKILL runs on a thread that would die with this process, and
        the study's last sweep of the host must come after the trials' own clean-up."""
        if cancel_running:
            for p in self._procs.values():
                _kill_trial(p)
            grace_ends, deadline = time.time() + KILL_GRACE_S, time.time() + KILL_GRACE_S + 10
            while (alive := [p for p in self._procs.values() if _alive(p)]) and time.time() < deadline:
                if time.time() > grace_ends:
                    for p in alive:
                        _kill_trial(p, grace_s=0)
                time.sleep(0.05)
        for server in self._servers.values():
            server.close()
        self._servers.clear()


class _WarmHarness:
    """One slot's `python -m train.harness --serve`: a trial directory in, the forked trial's pid
    out. Any trouble (it died, it hangs, it cannot fork) is logged and the slot runs cold from then
    on, so a warm harness can cost speed but never a trial."""

    def __init__(self, slot: Slot, popen, args: list[str]):
        self.slot = slot
        self.ready = False
        self.failed = False
        self.process = popen(slot, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)

    def poll_ready(self, wait: bool) -> bool:
        """Whether it has said `ready`; without `wait`, only if it already has (or is saying it)."""
        if self.ready or self.failed:
            return self.ready
        try:
            if wait or select.select([self.process.stdout.fileno()], [], [], 0)[0]:
                line = self._line(WARM_START_TIMEOUT_S)
                if line != "ready":
                    raise OSError(f"it said {line!r} instead of ready")
                self.ready = True
        except (OSError, ValueError) as e:
            self._fail(e)
        return self.ready

    def run(self, trial_dir: Path) -> int | None:
        try:
            self.process.stdin.write(f"{trial_dir.resolve()}\n".encode())
            self.process.stdin.flush()
            return int(self._line(30.0))
        except (OSError, ValueError) as e:
            self._fail(e)
            return None

    def _fail(self, e: Exception) -> None:
        log.warning("slot %s: the warm harness failed (%s); its trials start cold from now on", self.slot.name, e)
        self.failed = True
        self.close()

    def _line(self, timeout: float) -> str:
        fd, data, deadline = self.process.stdout.fileno(), b"", time.time() + timeout
        while not data.endswith(b"\n"):
            if not select.select([fd], [], [], max(0.0, deadline - time.time()))[0]:
                raise OSError(f"no answer in {timeout:.0f} s")
            chunk = os.read(fd, 1)
            if not chunk:
                raise OSError(f"it exited with code {self.process.wait()}")
            data += chunk
        return data.decode().strip()

    def close(self) -> None:
        """EOF ends it; the trials it forked run on in their own sessions."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def device_kind(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100': the kind agents and analysis group by."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", gpu_name.replace("NVIDIA", ""))
    return m.group(1) if m else gpu_name.strip()


def _alive(p: _Proc) -> bool:
    if p.popen is not None:
        return p.popen.poll() is None
    if p.pid is None:
        return _lock_held(Path(p.trial.directory))
    return _is_our_harness(p.pid, Path(p.trial.directory))


def _lock_held(trial_dir: Path) -> bool:
    """Whether any process of the trial lives: they all hold its running.lock."""
    try:
        fd = os.open(trial_dir / RUNNING_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the lock if we just took it


def _lock_holders(trial_dir: Path) -> list[int]:
    """The pids holding the trial's running.lock open (a trial adopted without a pid file)."""
    target = str((trial_dir / RUNNING_LOCK).resolve())
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
    return sorted(pids)


def _kill_trial(p: _Proc, grace_s: float = KILL_GRACE_S) -> None:
    for pid in [p.pid] if p.pid is not None else _lock_holders(Path(p.trial.directory)):
        kill_group(pid, grace_s)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _is_our_harness(pid: int, trial_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "\nState:\tZ" in status:
        return False
    if b"train.harness" not in cmdline:
        return False
    if str(trial_dir).encode() in cmdline:  # started cold
        return True
    try:  # forked by a warm harness, which moved it into its trial directory
        return Path(os.readlink(f"/proc/{pid}/cwd")) == Path(trial_dir).resolve()
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
