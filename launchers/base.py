"""What every launcher needs around the harness, written once: its command line and environment,
starting it in a process group of its own, running it to completion, killing its tree, and reading
what it left in the trial directory. The Launcher interface itself is in study/core.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from study.core import PROJECT_ROOT
from study.records import NO_VERDICT, Result
from train.contract import INFRA_STATUSES, LOG_FILE, RESULT_FILE, read_tail
from train.integrity import verify_result

# The harness enforces hard_limit_s itself; a launcher kills the trial's process group only this
# long after it, as a backstop. The margin covers what comes after the training limit (the export,
# checking the program, the evaluation pass, bounded by objective.eval_limits): a hung harness costs
# two minutes, a healthy one on a busy machine is never killed. A kill sends SIGTERM (the harness writes what it can and takes its worker along) and
# SIGKILL KILL_GRACE_S later.
BACKSTOP_S = 120.0
KILL_GRACE_S = 3.0


def poll_until(poll: Callable[[], list], timeout: float, interval: float) -> list:
    """Call `poll` every `interval` seconds until it returns something or `timeout` passes: the
    shape of every `wait` whose backend has no blocking "next finished job" call."""
    deadline = time.time() + timeout
    while True:
        done = poll()
        if done or time.time() >= deadline:
            return done
        time.sleep(max(0.0, min(interval, deadline - time.time())))


def harness_command(trial_dir: str | os.PathLike, python: str | None = None) -> list[str]:
    # -P: the trial dir (the cwd) holds a train.py that must not shadow the `train` package
    return [python or sys.executable, "-P", "-m", "train.harness", str(trial_dir)]


def harness_env(*, threads: int | None = None, gpus: str | None = None) -> dict[str, str]:
    """The environment a harness process starts in, on every launcher: ours minus every secret, the
    project on PYTHONPATH so `train.harness` imports from any working directory, and the slot's share
    of the machine. `threads` caps torch/OpenMP/MKL threads (None: leave them); `gpus` is the
    CUDA_VISIBLE_DEVICES the trial sees ("" hides every GPU from a CPU slot, None leaves what the
    scheduler set). The one place a trial's environment is built, so the one place secrets are cut."""
    env = {k: v for k, v in os.environ.items() if not _is_secret(k)}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), ARENA_THREADS=str(threads))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def start_harness(target: str | os.PathLike, env: dict[str, str], *, python: str | None = None,
                  args: tuple[str, ...] = (), **popen_kwargs) -> subprocess.Popen:
    """`python -m train.harness TARGET [ARGS]` (a trial directory, or --serve for a warm harness) in a
    session (process group) of its own, so `kill_group` takes the harness, its worker and anything
    train.py started (unless the caller passes start_new_session=False: a scheduler tracks it)."""
    popen_kwargs.setdefault("stderr", subprocess.STDOUT)
    popen_kwargs.setdefault("start_new_session", True)
    return subprocess.Popen([*harness_command(target, python), *args], env=env, **popen_kwargs)


def run_harness(trial_dir: str | os.PathLike, env: dict[str, str], *, python: str | None = None,
                limit_s: float | None = None, started: Callable[[subprocess.Popen], None] | None = None,
                **popen_kwargs) -> Result:
    """Run a trial's harness to its end and read its result: what the simulated launcher does on
    this machine and a Slurm job does on its node. Past `limit_s` + BACKSTOP_S its process group is
    killed and the trial is a timeout. `started` receives the process (so a cancel can kill it)."""
    proc = start_harness(trial_dir, env, python=python, cwd=trial_dir, **popen_kwargs)
    if started is not None:
        started(proc)
    try:
        code = proc.wait(timeout=None if limit_s is None else limit_s + BACKSTOP_S)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        return killed_at_limit(trial_dir)
    return read_result(trial_dir, reason=f"the harness exited with code {code} and no {RESULT_FILE}")


def killed_at_limit(trial_dir: str | os.PathLike) -> Result:
    """The result of a trial the launcher killed at the backstop: a timeout, keeping whatever the
    harness measured (as it is killed, the harness itself calls its end a cancel)."""
    reason = f"killed by the launcher past hard_limit_s+{BACKSTOP_S:.0f}s"
    result = read_result(trial_dir, missing_status="timeout", reason=reason)
    if result.status in INFRA_STATUSES:
        result.status, result.reason = "timeout", reason
    return result


def kill_group(pid: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the process group `pid` leads, SIGKILL `grace_s` later: without blocking the
    caller (the loop keeps collecting results meanwhile)."""
    try:
        os.killpg(pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if grace_s > 0:
        timer = threading.Timer(grace_s, _kill_now, args=(pid,))
        timer.daemon = True
        timer.start()


def _kill_now(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_secret(name: str) -> bool:
    up = name.upper()
    return up.startswith("ANTHROPIC_") or up.startswith("CLAUDE_") or any(
        s in up for s in ("API_KEY", "SECRET", "TOKEN", "PASSWORD", "MLFLOW_TRACKING_PASSWORD")
    )


def log_tail(trial_dir: str | os.PathLike, lines: int = 40) -> str:
    return read_tail(Path(trial_dir) / LOG_FILE, lines)


def read_result(trial_dir: str | os.PathLike, *, missing_status: str = "crash", reason: str = "",
                signed: bool = True) -> Result:
    """The harness's RESULT_FILE as a Result; if there is none the trial died before the harness
    could write it (killed, node lost), so record `missing_status` with the log tail as evidence.
    A result that does not carry the trusted harness's signature under the study's key is a
    `crash` (`signed=False`: a launcher whose remote harness never gets the key)."""
    p = Path(trial_dir) / RESULT_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        why = reason or f"no {RESULT_FILE} ({type(e).__name__})"
        # the harness never judged the code (it was killed, or its node lost): study/baseline.py
        # does not take this for the baseline's own failure
        return Result(status=missing_status, reason=why, error=log_tail(trial_dir, 20),
                      extra={NO_VERDICT: True})
    forged = f"{RESULT_FILE} is not an object" if not isinstance(data, dict) else \
        verify_result(trial_dir, data) if signed else None
    if forged:  # only the trusted harness's signed result counts
        return Result(status="crash", reason=forged, error=log_tail(trial_dir, 20))
    return Result.from_dict(data)
