"""The trial-directory contract: the one place that names what a trial folder holds and what a trial
can end as. The harness (which travels alone to GPU nodes) and the study side both import it, so it
imports nothing but the standard library.

A trial folder, written by the study before the trial starts and by the trusted harness after it:

    train.py      the exact candidate that ran (written by the study)
    trial.json    the harness spec: objective, seed, trial id (written by the study)
    run.log       the candidate's output and the harness's own lines
    steps.log     the harness's step lines only (the candidate cannot write here)
    result.json   the outcome, written last and atomically by the trusted side only, signed with
                  the study's key (RESULT_KEY_FILE in the study folder, two levels up)
    running.lock  locked while any process of the trial lives (see RUNNING_LOCK)

The candidate never sees this folder: it runs in a sandbox whose only writable place is a private
scratch folder, and hands its trained model over from there, as data (MODEL_FILE).
"""
from __future__ import annotations

from pathlib import Path

TRAIN_FILE = "train.py"
TRIAL_FILE = "trial.json"
RESULT_FILE = "result.json"
LOG_FILE = "run.log"
# Held (flock) by the trial's process tree from before it starts until its last process ends: a
# restarted study tells a live trial from a dead one by it, with no pid file to race against.
RUNNING_LOCK = "running.lock"
# The harness's step lines alone, which the live display and MLflow's loss curve read: run.log also
# holds whatever the candidate prints, step lines it forged included.
STEPS_FILE = "steps.log"
STDOUT_FILE = "stdout.log"  # a warm-forked harness's own output (its summary line, or its traceback)
MODEL_FILE = "model.arena"  # in the worker's scratch: the trained model as a tensor program (train/graph.py)
RESULT_KEY_FILE = ".result-key"  # in the study folder: the HMAC key results are signed with
SIGNATURE_FIELD = "signature"

# What a budget counts. `seconds` is wall-clock training time after the warm-up steps;
# `cpu_seconds` is the CPU time of the worker's whole process tree after them, read from the kernel.
BUDGET_KINDS = ("seconds", "steps", "tokens", "cpu_seconds")

# What objective.eval_limits may bound for one exported model (train/graph.py Limits).
EVAL_LIMIT_KEYS = ("max_nodes", "max_work_per_token", "max_memory_mb")

# Sandbox levels a study may ask for (objective.sandbox); "strongest" takes the best this machine has.
DEFAULT_SANDBOX = "strongest"

# Outcomes of a trial. The harness statuses are the candidate's own result; the infrastructure
# statuses say the candidate was not measured (`cancelled` by the arena or an operator, `lost` to a
# node, a cluster or a scheduler), so a resumed study runs it again.
HARNESS_STATUSES = ("ok", "crash", "timeout", "oom", "nan", "invalid")
INFRA_STATUSES = ("cancelled", "lost")
STATUSES = HARNESS_STATUSES + INFRA_STATUSES


def result_key_path(trial_dir) -> Path:
    """Where a trial's result key lives: the study folder holding `trials/<id>/`."""
    return Path(trial_dir).resolve().parent.parent / RESULT_KEY_FILE


class TrialFailed(Exception):
    """Ends a trial with `status` (not `ok`) and a one-line reason."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def read_tail(path, lines: int, max_bytes: int = 1 << 16) -> str:
    """The last `lines` lines of a text file, from at most its last `max_bytes`: run.log holds
    whatever the candidate printed (up to its sandbox's disk_mb, a gigabyte), and whoever shows its
    end must not read all of it into memory. '' if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read(max_bytes).decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
