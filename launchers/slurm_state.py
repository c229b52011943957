"""What Slurm says about a job, and what that makes the trial: pure functions over squeue/sacct text.

The shape of submitit's SlurmInfoWatcher.read_info: the launcher runs the commands, these functions
read their output, so every state -> status rule is tested from text fixtures without a cluster
(tests/test_slurm_state.py). Nothing here runs a command or touches a clock; `now` is passed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from study.core import Slot
from study.records import Result, Trial
from train.contract import RESULT_FILE

# A job in one of these may still run (or run again): wait for Slurm's verdict.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                 "RESV_DEL_HOLD"}
# The infrastructure ended the job, not the candidate.
LOST_STATES = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "REVOKED", "SPECIAL_EXIT"}
SACCT_FIELDS = ("JobID", "JobName", "State", "Submit", "Start", "End", "ExitCode", "NodeList", "Timelimit")
SQUEUE_FIELDS = {"JobID": "%i", "JobName": "%j", "State": "%T", "Submit": "%V", "Start": "%S", "End": "%e",
                 "NodeList": "%N", "Timelimit": "%l"}


@dataclass
class SlurmJob:
    """One trial's current Slurm job and what the last poll said about it."""

    trial: Trial
    slot: Slot
    job_id: str
    folder: str
    submitted: float
    name: str
    last_seen: float
    state: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    ended_seen: float | None = None
    cancel_requested: bool = False
    requeued_after: str | None = None

    @property
    def trial_dir(self) -> Path:
        return Path(self.trial.directory)


@dataclass(frozen=True)
class Patience:
    """How long to believe a job still exists without proof, and to wait for a result file a
    finished job should have left on a shared filesystem."""

    forget_after_s: float = 300
    result_grace_s: float = 30


def parse_rows(fields: tuple[str, ...], table: str) -> list[dict[str, str]]:
    """`squeue -o '%i|%j|...'` or `sacct -P -n -o JobID,...` output as one dict per job."""
    return [dict(zip(fields, line.split("|"))) for line in table.splitlines() if line.strip()]


def base_state(state: str | None) -> str | None:
    """'CANCELLED by 0' -> 'CANCELLED'."""
    return state.split()[0] if state else None


def epoch(value: str | None) -> float | None:
    """A time under SLURM_TIME_FORMAT=%s; None for Unknown, None, N/A or 0."""
    try:
        return float(value) if value and float(value) > 0 else None
    except ValueError:
        return None


def apply_row(job: SlurmJob, row: dict[str, str], now: float) -> bool:
    """Record what one squeue/sacct row says about `job`; False if the row is another job's (a wiped
    Slurm state reuses job ids, so the name must match too)."""
    if row.get("JobID") != job.job_id or row.get("JobName") != job.name:
        return False
    row = dict(row)
    base = base_state(row["State"])
    if base in ACTIVE_STATES:
        row.pop("End", None)  # squeue's expected end (start + time limit), not an end
    if base == "PENDING":
        row.pop("Start", None)  # squeue's expected start, not a start
    job.state, job.last_seen = row["State"], now
    job.info.update(row)
    return True


def outcome(job: SlurmJob, now: float, *, harness_result: Result | None, last_answer: float,
            patience: Patience = Patience(), evidence: Callable[[], str] = lambda: "") -> Result | None:
    """The trial's result if its job is over, else None. `harness_result` is what the harness wrote
    (None if no result file yet); `last_answer` is when the controller last answered at all;
    `evidence` gives the log tails a crash without a result records."""
    base = base_state(job.state)
    if harness_result is not None:  # written last by the harness: the trial ran to its end
        if harness_result.status != "cancelled":
            return harness_result
        # The harness saw its worker signalled from outside (scancel, the time limit, a node going
        # down): Slurm's final state says which, once it has one.
        if base is None or base in ACTIVE_STATES:
            return harness_result if now - job.last_seen >= patience.forget_after_s else None
        if base in ("COMPLETED", "FAILED"):
            return harness_result
    if base is None or base in ACTIVE_STATES:
        silent = now - job.last_seen
        if silent < patience.forget_after_s:
            return None
        what = "slurmctld does not answer" if now - last_answer >= silent else "not in squeue"
        return Result(status="lost", reason=f"Slurm job {job.job_id} forgotten: {what} for {silent:.0f} s")
    if base == "CANCELLED":
        return Result(status="cancelled", reason=cancelled_by(job))
    if base in ("TIMEOUT", "DEADLINE"):
        return Result(status="timeout", reason=f"killed by Slurm at its time limit "
                                               f"({job.info.get('Timelimit', '?')}, Slurm job {job.job_id} {base})")
    if base == "OUT_OF_MEMORY":
        return Result(status="oom", reason=f"Slurm job {job.job_id} OUT_OF_MEMORY (over its --mem)",
                      error=evidence())
    if base in LOST_STATES:
        return Result(status="lost", reason=f"Slurm job {job.job_id} {base} on {job.info.get('NodeList') or '?'}")
    # COMPLETED or FAILED without a result file: give a slow shared filesystem a moment to show it
    job.ended_seen = job.ended_seen or now
    if now - job.ended_seen < patience.result_grace_s and base == "COMPLETED":
        return None
    return Result(status="crash", reason=f"Slurm job {job.job_id} {base} (exit {job.info.get('ExitCode', '?')}) "
                                         f"and the harness wrote no {RESULT_FILE}",
                  error=evidence())


def cancelled_by(job: SlurmJob) -> str:
    by = "by the study" if job.cancel_requested else " ".join((job.state or "").split()[1:]) or "by a user"
    return f"scancel: Slurm job {job.job_id} CANCELLED {by}".rstrip()
