"""The interface every launcher implements: submitit's small Executor/Job API, made asynchronous.

The loop owns the clock and the slots' bookkeeping; a launcher only runs what it is given. A trial's
directory already holds `train.py` and `trial.json` when `submit` is called; wherever the trial
runs, the same harness (`python -m train.harness TRIAL_DIR`) writes `result.json` and `run.log`
there, and the launcher turns that into a Result (or an infrastructure status when the harness
never got to write one).
"""
from __future__ import annotations

import json
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from study.records import Result, Trial

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Slot:
    """One place a trial can run. `speed` is relative throughput (1.0 = the reference kind), used
    by the simulated clock and told to agents."""

    name: str
    device_kind: str = "cpu"
    speed: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


class LauncherError(RuntimeError):
    """Bad launcher configuration or an unusable backend: raised before anything is submitted."""


class Launcher(ABC):
    name: str = "base"
    # True when `now()` is a simulated clock; results then say so.
    simulated_time: bool = False

    def start(self) -> None:
        """Validate the config and bring up what the slots need; raise LauncherError with one
        clear line if the backend cannot work. Nothing is submitted yet."""

    @abstractmethod
    def slots(self) -> list[Slot]:
        ...

    @abstractmethod
    def submit(self, trial: Trial, slot: Slot) -> None:
        ...

    @abstractmethod
    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        """Results of trials that finished since the last call, as (trial_id, result); waits at
        most `timeout` seconds for the first one, returns [] if none."""

    @abstractmethod
    def cancel(self, trial_id: str) -> None:
        """Stop a trial; its result (status `cancelled`) still comes back through `wait`."""

    def adopt(self, trial: Trial, slot: Slot) -> bool:
        """On resume: re-attach to a trial the journal says was in flight. Return True if the
        launcher can still collect its result (e.g. a Slurm job still running); False means the
        loop re-runs it."""
        return False

    def now(self) -> float:
        """Seconds on the study's clock. Real time unless the launcher simulates it."""
        return time.time()

    def advance(self, seconds: float) -> None:
        """The searcher just spent `seconds` of real time thinking (an `ask`). A real clock has
        already moved; a simulated clock adds them, so agent latency is real time on the virtual
        clock. Under a simulated clock the loop calls `ask` synchronously, then this."""

    def close(self, cancel_running: bool = True) -> None:
        pass


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


def harness_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a trial runs in: ours minus every secret, plus the project on PYTHONPATH
    so `train.harness` imports from any working directory."""
    env = {k: v for k, v in os.environ.items() if not _is_secret(k)}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def _is_secret(name: str) -> bool:
    up = name.upper()
    return up.startswith("ANTHROPIC_") or up.startswith("CLAUDE_") or any(
        s in up for s in ("API_KEY", "SECRET", "TOKEN", "PASSWORD", "MLFLOW_TRACKING_PASSWORD")
    )


def log_tail(trial_dir: str | os.PathLike, lines: int = 40) -> str:
    p = Path(trial_dir) / "run.log"
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_result(trial_dir: str | os.PathLike, *, missing_status: str = "crash", reason: str = "") -> Result:
    """The harness's result.json as a Result; if there is none the trial died before the harness
    could write it (killed, node lost), so record `missing_status` with the log tail as evidence."""
    p = Path(trial_dir) / "result.json"
    try:
        return Result.from_dict(json.loads(p.read_text()))
    except (OSError, ValueError) as e:
        why = reason or f"no result.json ({type(e).__name__})"
        return Result(status=missing_status, reason=why, error=log_tail(trial_dir, 20))
