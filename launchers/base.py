"""What every launcher needs around the harness, written once: its command line, its environment,
reading what it left in the trial directory. The Launcher interface itself is in study/core.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from study.core import PROJECT_ROOT
from study.records import Result
from train.contract import LOG_FILE, RESULT_FILE
from train.integrity import verify_result


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
    p = Path(trial_dir) / LOG_FILE
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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
        return Result(status=missing_status, reason=why, error=log_tail(trial_dir, 20))
    forged = f"{RESULT_FILE} is not an object" if not isinstance(data, dict) else \
        verify_result(trial_dir, data) if signed else None
    if forged:  # only the trusted harness's signed result counts
        return Result(status="crash", reason=forged, error=log_tail(trial_dir, 20))
    return Result.from_dict(data)
