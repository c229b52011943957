"""Run each trial as one Slurm job through submitit, without ever blocking the study loop.

hydra-submitit-launcher blocks until a whole batch ends and reports failed jobs as COMPLETED, so
this launcher uses submitit only to write and submit the job (sbatch script, pickled job body, log
files) and reads the outcome itself: the harness's result file when the trial ran to the end, or
Slurm's own accounting state (CANCELLED, TIMEOUT, NODE_FAIL, ...) when something else ended the
job. Each poll asks Slurm once for all jobs: one `squeue` call (the controller's live view, the
only proof a job is alive), plus one `sacct` call for the jobs that just ended (their final state),
never one call per job. A job the controller does not answer for, or no longer knows, for
`forget_after_s` is recorded as lost, so the loop never waits on it forever.

The job body is the same harness as the local launcher's, `python -m train.harness TRIAL_DIR` in a
subprocess, so its result and log land in the trial directory (which must be on a filesystem
the nodes see) and the device and host come from the node. The Slurm time limit is the trial's
hard_limit_s plus a margin: the harness enforces hard_limit_s itself and records `timeout`; Slurm's
limit is the backstop for a harness that hangs. submitit's own timeout/preemption signal handling is
switched off in the job (its USR2 warning is ignored), because it cannot tell preemption from
timeout under an hour and would kill the harness 90 s before the limit; Slurm's accounting state
tells them apart exactly, at any time limit. Jobs are submitted with --no-requeue so a node failure
or preemption ends the job visibly and `requeue_on_lost` decides, once, whether to run it again.

Which job runs which trial is kept in <folder>/jobs.json, so a resumed study adopts jobs still
queued or running instead of submitting them twice. Each launcher session writes its submitit files
to a fresh subfolder: a wiped Slurm state restarts job ids at 1, and a reused folder would hand
back another job's files.

Job arrays (submitit's executor.batch()) are not used: the loop refills one slot at a time as
trials finish, so only a study's first wave could form an array, and one sbatch per trial is cheap.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from launchers.base import harness_env, log_tail, poll_until, read_result, run_harness
from launchers.slurm_state import (
    ACTIVE_STATES, SACCT_FIELDS, SQUEUE_FIELDS, Patience, SlurmJob, apply_row, base_state, epoch, outcome, parse_rows,
)
from study.core import Launcher, LauncherError, Slot
from study.records import Result, Trial
from train.contract import RESULT_FILE

log = logging.getLogger("arena.slurm")

SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "srun")
COMMAND_TIMEOUT_S = 60


class SlurmLauncher(Launcher):
    name = "slurm"

    def __init__(self, slots: int = 2, partition: str | None = None, account: str | None = None,
                 qos: str | None = None, gpus_per_trial: int = 0, cpus_per_trial: int = 1,
                 mem_gb: float | None = None, constraint: str | None = None, device_kind: str | None = None,
                 hard_limit_s: float | None = None, time_margin_s: float = 300, time_limit_min: int | None = None,
                 sbatch: dict[str, Any] | None = None, setup: list[str] | None = None,
                 folder: str = "slurm", shared_dir: str | None = None, requeue_on_lost: bool = False,
                 cancel_on_close: bool = True, job_name: str = "arena", python: str | None = None,
                 poll_interval_s: float = 2.0, forget_after_s: float = 300, result_grace_s: float = 30,
                 name: str = "slurm"):
        if int(slots) < 1:
            raise LauncherError(f"launcher.slots must be >= 1, not {slots}")
        self.n_slots = int(slots)
        self.partition, self.account, self.qos = partition, account, qos
        self.gpus_per_trial, self.cpus_per_trial, self.mem_gb = int(gpus_per_trial or 0), int(cpus_per_trial), mem_gb
        self.constraint = constraint
        self.device_kind = device_kind or constraint or ("gpu" if self.gpus_per_trial else "cpu")
        self.hard_limit_s, self.time_margin_s, self.time_limit_min = hard_limit_s, time_margin_s, time_limit_min
        self.sbatch_extra = dict(sbatch or {})
        self.setup = list(setup or [])
        self.folder = Path(folder).expanduser().resolve()
        self.shared_dir = Path(shared_dir).expanduser().resolve() if shared_dir else None
        self.requeue_on_lost, self.cancel_on_close = requeue_on_lost, cancel_on_close
        self.job_name, self.python = job_name, python
        self.poll_interval_s = poll_interval_s
        self.patience = Patience(forget_after_s=forget_after_s, result_grace_s=result_grace_s)
        self._slots = [Slot(name=f"slurm{i}", device_kind=self.device_kind,
                            info={"partition": partition, "gpus": self.gpus_per_trial, "cpus": self.cpus_per_trial})
                       for i in range(self.n_slots)]
        self._jobs: dict[str, SlurmJob] = {}
        self._done: list[tuple[str, Result]] = []
        self._executor = None
        self._session: Path | None = None
        self._last_query = float("-inf")
        self._last_answer = time.time()

    # -- setup ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Every check that can fail, before anything is submitted."""
        if self._executor is not None:
            return
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LauncherError("submitit is not installed (pip install submitit)") from None
        missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
        if missing:
            raise LauncherError(f"Slurm commands not found on PATH: {', '.join(missing)} "
                                "(run on a login node, or see scripts/install_slurm.sh)")
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).is_file():  # sinfo would retry for a minute before saying so
            raise LauncherError(f"SLURM_CONF={conf} does not exist")
        partitions = self._partitions()
        if self.partition and self.partition not in partitions:
            raise LauncherError(f"unknown Slurm partition {self.partition!r}; this cluster has: {', '.join(partitions)}")
        self._check_shared_dir()
        if _slurm(["sacct", "-n", "-X", "-j", "1"]).returncode != 0:
            log.warning("sacct does not answer (no Slurm accounting?): a job that ends without a result is "
                        "judged from squeue while Slurm remembers it, else recorded as lost")
        self._session = self.folder / f"submitit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self._executor = _executor(self._session, self.python)
        self._check_request()

    def _partitions(self) -> list[str]:
        proc = _slurm(["sinfo", "-h", "-o", "%P"])
        if proc.returncode != 0:
            raise LauncherError(f"no Slurm cluster reachable: sinfo says {_last_line(proc.stderr)!r} "
                                "(is SLURM_CONF set and slurmctld up? see scripts/slurm_up.sh)")
        return [p.rstrip("*") for p in proc.stdout.split()]

    def _check_shared_dir(self) -> None:
        if self.shared_dir is None:
            log.info("launcher.shared_dir is null: assuming %s (the study dir) is visible on every node", self.folder)
            return
        if not self.shared_dir.is_dir():
            raise LauncherError(f"launcher.shared_dir {str(self.shared_dir)!r} is not a directory")
        if not self.folder.is_relative_to(self.shared_dir):
            raise LauncherError(f"the study dir {str(self.folder.parent)!r} is not under launcher.shared_dir "
                                f"{str(self.shared_dir)!r}: the nodes could not see its trial dirs")

    def _check_request(self) -> None:
        """Slurm itself judges account, qos, gres, constraint, memory and time limit of the real job
        script (`sbatch --test-only`), without queueing anything."""
        self._set_parameters(self._time_limit_min(self.hard_limit_s), "check")
        proc = self._executor.test_only()
        if proc.returncode != 0:
            raise LauncherError(f"Slurm rejects the job request: {_last_line(proc.stderr or proc.stdout)}")

    def slots(self) -> list[Slot]:
        return list(self._slots)

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, trial: Trial, slot: Slot) -> None:
        self.start()
        trial_dir = Path(trial.directory).resolve()
        if self.shared_dir and not trial_dir.is_relative_to(self.shared_dir):
            self._done.append((trial.trial_id, Result(status="lost", slot=slot.name, reason=(
                f"trial dir {trial_dir} is not under launcher.shared_dir {self.shared_dir}"))))
            return
        name = f"{self.job_name}-{trial.trial_id}"
        submitted = time.time()
        try:
            job_id = self._sbatch(trial, name)
        except Exception as e:  # noqa: BLE001 - a refused submission is this trial's result, not a crash
            self._done.append((trial.trial_id, Result(status="lost", slot=slot.name,
                                                      reason=f"sbatch failed: {_last_line(str(e))}")))
            return
        self._jobs[trial.trial_id] = SlurmJob(trial, slot, job_id, str(self._session), submitted, name, submitted)
        self._save_registry()

    def _sbatch(self, trial: Trial, name: str) -> str:
        self._set_parameters(self._time_limit_min(trial.objective.get("hard_limit_s")), name)
        # A CPU job sees no GPU (without cgroups it would otherwise see every one); a GPU job keeps
        # the CUDA_VISIBLE_DEVICES Slurm gives it.
        job = self._executor.submit(run_harness_job, str(Path(trial.directory).resolve()), self.cpus_per_trial,
                                    None if self.gpus_per_trial else "")
        return job.job_id

    def _time_limit_min(self, hard_limit_s: float | None) -> int:
        if self.time_limit_min:
            return int(self.time_limit_min)
        return max(1, math.ceil((float(hard_limit_s or 3600) + self.time_margin_s) / 60))

    def _set_parameters(self, time_min: int, name: str) -> None:
        gres = f"gpu:{self.gpus_per_trial}" if self.gpus_per_trial else None
        params = {"job_name": name, "time": time_min, "nodes": 1, "ntasks_per_node": 1,
                  "cpus_per_task": self.cpus_per_trial, "partition": self.partition, "account": self.account,
                  "qos": self.qos, "gres": gres, "constraint": self.constraint,
                  "mem": f"{int(self.mem_gb * 1024)}M" if self.mem_gb else None,
                  "setup": self.setup or None, "additional_parameters": {
                      k: v for k, v in {"no-requeue": True, **self.sbatch_extra}.items() if v is not None}}
        self._executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    # -- collecting -------------------------------------------------------------------------------
    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        return poll_until(self._poll, timeout, 0.25)

    def _poll(self) -> list[tuple[str, Result]]:
        now = time.time()
        harness_done = [j for j in self._jobs.values() if (j.trial_dir / RESULT_FILE).exists()]
        if now - self._last_query >= self.poll_interval_s or any(not j.info.get("Start") for j in harness_done):
            self._query(list(self._jobs.values()))
        done, self._done = self._done, []
        for trial_id, job in list(self._jobs.items()):
            result = self._outcome(job, time.time())
            if result is None:
                continue
            if result.status == "lost" and self.requeue_on_lost and not job.requeued_after:
                self._requeue(job, result.reason)
                continue
            del self._jobs[trial_id]
            done.append((trial_id, self._finish(job, result)))
        return done

    def _outcome(self, job: SlurmJob, now: float) -> Result | None:
        """The trial's result if its job is over, else None (the rules: slurm_state.outcome)."""
        harness_result = read_result(job.trial_dir) if (job.trial_dir / RESULT_FILE).exists() else None
        return outcome(job, now, harness_result=harness_result, last_answer=self._last_answer, patience=self.patience,
                       evidence=lambda: (log_tail(job.trial_dir, 20) + "\n" + _job_stderr(job)).strip())

    def _finish(self, job: SlurmJob, result: Result) -> Result:
        """What Slurm alone knows: when the job really started and ended, and on which node (the
        loop stamps slot, device kind and queue time)."""
        start, end = epoch(job.info.get("Start")), epoch(job.info.get("End"))
        if start is not None:
            result.host = result.host or job.info.get("NodeList")
            result.started_at = start
        result.finished_at = end if end is not None and start is not None else time.time()
        result.extra["slurm_job_id"] = job.job_id
        if job.requeued_after:
            result.reason = f"requeued once after {job.requeued_after}" + (f"; {result.reason}" if result.reason else "")
        return result

    def _requeue(self, job: SlurmJob, why: str) -> None:
        """Run a trial whose job Slurm lost once more, as a new job (the old one is cancelled in
        case it is still alive somewhere)."""
        log.warning("%s: %s; requeueing once", job.trial.trial_id, why)
        _slurm(["scancel", job.job_id])
        (job.trial_dir / RESULT_FILE).unlink(missing_ok=True)
        submitted = time.time()
        try:
            job_id = self._sbatch(job.trial, job.name)
        except Exception as e:  # noqa: BLE001
            self._done.append((job.trial.trial_id, self._finish(job, Result(
                status="lost", reason=f"{why}; requeue failed: sbatch: {_last_line(str(e))}"))))
            del self._jobs[job.trial.trial_id]
            return
        self._jobs[job.trial.trial_id] = SlurmJob(job.trial, job.slot, job_id, str(self._session), submitted, job.name,
                                              submitted, requeued_after=why)
        self._save_registry()

    def _query(self, jobs: list[SlurmJob]) -> None:
        """Update every job's state: one squeue call for all of them (the controller's live view,
        the only proof a job is still alive), and one sacct call for the jobs that ended or that
        squeue no longer shows (accounting's final state: CANCELLED by whom, TIMEOUT, NODE_FAIL)."""
        now = self._last_query = time.time()
        if not jobs:
            return
        by_id = {j.job_id: j for j in jobs}
        proc = _slurm(["squeue", "-h", "--states=all", "-o", "|".join(SQUEUE_FIELDS.values()), "-j", ",".join(by_id)])
        if proc.returncode == 0 or "Invalid job id" in proc.stderr:  # all of them unknown: an answer too
            self._last_answer = now
            for row in parse_rows(tuple(SQUEUE_FIELDS), proc.stdout):
                if row.get("JobID") in by_id:
                    apply_row(by_id[row["JobID"]], row, now)
        ended = [i for i, j in by_id.items() if j.last_seen < now or base_state(j.state) not in ACTIVE_STATES]
        if ended:
            proc = _slurm(["sacct", "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(ended)])
            for row in parse_rows(SACCT_FIELDS, proc.stdout if proc.returncode == 0 else ""):
                if row.get("JobID") in by_id and base_state(row.get("State")) not in ACTIVE_STATES:
                    apply_row(by_id[row["JobID"]], row, now)  # a stale RUNNING in accounting proves nothing

    # -- cancelling, resuming, stopping -----------------------------------------------------------
    def cancel(self, trial_id: str) -> None:
        job = self._jobs.get(trial_id)
        if job is None or job.cancel_requested:
            return
        job.cancel_requested = True
        proc = _slurm(["scancel", job.job_id])
        if proc.returncode != 0:
            log.warning("scancel %s: %s", job.job_id, _last_line(proc.stderr))
        self._last_query = float("-inf")

    def adopt(self, trial: Trial, slot: Slot) -> bool:
        """Re-attach to the job jobs.json says runs this trial, if Slurm still knows it (queued,
        running, or ended with a state to report) or the harness already wrote its result."""
        entry = self._load_registry().get(trial.trial_id)
        if entry is None:
            return False
        self.start()
        job = SlurmJob(trial, slot, entry["job_id"], entry["folder"], entry["submitted"], entry["name"],
                   last_seen=float("-inf"), requeued_after=entry.get("requeued_after"))
        self._query([job])
        if job.state is None and not (job.trial_dir / RESULT_FILE).exists():
            return False
        job.last_seen = max(job.last_seen, time.time())
        self._jobs[trial.trial_id] = job
        return True

    def close(self, cancel_running: bool = True) -> None:
        """Cancel the study's queued and running jobs, unless cancel_on_close says leave them for
        a later resume to adopt."""
        if cancel_running and self.cancel_on_close and self._jobs:
            for job in self._jobs.values():
                job.cancel_requested = True
            _slurm(["scancel", *(j.job_id for j in self._jobs.values())])

    # -- the trial -> job registry ----------------------------------------------------------------
    @property
    def _registry_path(self) -> Path:
        return self.folder / "jobs.json"

    def _load_registry(self) -> dict[str, dict]:
        try:
            return json.loads(self._registry_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_registry(self) -> None:
        registry = self._load_registry()
        for trial_id, job in self._jobs.items():
            registry[trial_id] = {"job_id": job.job_id, "name": job.name, "folder": job.folder,
                                  "submitted": job.submitted, "requeued_after": job.requeued_after}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._registry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(registry, indent=1))
        os.replace(tmp, self._registry_path)


def run_harness_job(trial_dir: str, threads: int, gpus: str | None) -> str:
    """The job body, on the node: the harness run to its end exactly as the simulated launcher runs
    it here (Slurm's time limit is the backstop). Returns the status, for submitit's own records.

    submitit's USR2 handler would call a preemption a timeout under an hour and Slurm's
    `--signal=USR2@90` would kill the harness 90 s before the limit; ignoring USR2 here (and so in the
    harness, which inherits it) leaves the time limit to the harness and to Slurm's own kill."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    print(f"arena: trial {trial_dir} on {socket.gethostname()}", flush=True)
    # In the job's own session and output files: Slurm tracks and signals the job's processes itself,
    # and a crash's stderr is evidence the launcher reads back.
    return run_harness(trial_dir, harness_env(threads=threads, gpus=gpus), stdin=subprocess.DEVNULL,
                       stdout=None, stderr=None, start_new_session=False).status


def _executor(folder: Path, python: str | None):
    """submitit's SlurmExecutor, with sbatch run in our environment minus every secret: sbatch
    exports the submitter's environment to the job (and slurmctld stores it), so the Anthropic key
    must not be in it. The project goes on PYTHONPATH so the node can unpickle the job body."""
    from submitit import SlurmExecutor

    class _Executor(SlurmExecutor):
        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            clean = harness_env()
            unset = [arg for name in os.environ if name not in clean for arg in ("-u", name)]
            return ["env", *unset, f"PYTHONPATH={clean['PYTHONPATH']}", "sbatch", str(submission_file_path)]

        def test_only(self) -> subprocess.CompletedProcess:
            """`sbatch --test-only` on the job script a submission would use, queueing nothing: the
            submission internals stay inside this subclass of submitit's executor."""
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", suffix=".sh", dir=self.folder, delete=False) as f:
                f.write(self._make_submission_file_text("true", "check"))
            try:
                return _slurm(self._make_submission_command(Path(f.name))[:-1] + ["--test-only", f.name])
            finally:
                os.unlink(f.name)

    return _Executor(folder=folder, python=python)


def _slurm(command: list[str]) -> subprocess.CompletedProcess:
    """A Slurm client command with times as epoch seconds; a hung controller is an error, not a hang."""
    env = {**os.environ, "SLURM_TIME_FORMAT": "%s"}
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(command, 1, "", f"{command[0]}: {e}")


def _job_stderr(job: SlurmJob) -> str:
    from submitit.core.utils import JobPaths

    path = JobPaths(job.folder, job_id=job.job_id, task_id=0).stderr
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


__all__ = ["SlurmLauncher", "run_harness_job"]
