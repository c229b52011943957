"""The MLflow mirror: a copy of the journal in MLflow, idempotent by trial id.

It runs on its own thread with a queue, so a slow or dead tracking server never stalls the loop;
work that fails stays queued and is retried, and anything still missing when the study ends is
found again on the next start by asking MLflow which trials it already has (`catch_up`). One
parent run per study, one child run per trial; the layout is what `analysis/` reads.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from study.records import Result, Trial

log = logging.getLogger("arena.mirror")

# A dead server must cost seconds, not MLflow's default of minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

MAX_PARAM_LEN = 6000


class MirrorError(RuntimeError):
    pass


def source_sha(source: str) -> str:
    """Identifies a candidate's code across trials and device kinds (for hardware comparisons)."""
    return hashlib.sha1(source.encode()).hexdigest()[:12]


def trial_tags(trial: Trial, result: Result, study_id: str, searcher: str) -> dict[str, str]:
    tags = {
        "arena.kind": "trial",
        "arena.study_id": study_id,
        "arena.trial_id": trial.trial_id,
        "status": result.status,
        "device": result.device or "",
        "device_kind": result.device_kind or trial.device_kind or "",
        "host": result.host or "",
        "searcher": searcher,
        "slot": result.slot or trial.slot or "",
        "source_sha": source_sha(trial.candidate.source),
        "budget_kind": str(result.budget_kind or trial.objective.get("budget_kind", "")),
    }
    if result.reason:
        tags["reason"] = result.reason[:5000]
    if result.error:
        tags["error"] = result.error[-5000:]
    return tags


def trial_params(trial: Trial) -> dict[str, str]:
    params = {f"knob.{k}": str(v) for k, v in sorted(trial.candidate.knobs.items())}
    params.update(
        {
            "parent_trial": trial.candidate.parent or "",
            "hypothesis": trial.candidate.hypothesis or "",
            "seed": str(trial.seed if trial.candidate.seed is None else trial.candidate.seed),
            "trial_index": str(trial.index),
        }
    )
    return {k: v[:MAX_PARAM_LEN] for k, v in params.items()}


def trial_metrics(trial: Trial, result: Result, times: dict[str, float]) -> dict[str, float]:
    metrics = result.numbers()
    for key in ("started_at", "finished_at"):
        metrics.pop(key, None)  # replaced by the study-relative t_* below
    metrics.update({k: float(v) for k, v in times.items() if v is not None})
    metrics["trial_index"] = float(trial.index)
    fraction = trial.candidate.budget_fraction
    if fraction is not None:  # a successive-halving rung (searchers/rungs.py)
        metrics["budget_fraction"] = float(fraction)
        metrics["rung"] = float(trial.candidate.meta.get("rung", 0))
        if not trial.candidate.full_budget and "val_bpb" in metrics:
            # A screening score is not a result of the study: under its own name, analysis and the
            # UI's best never mistake it for one, and its slot-time still counts as spent.
            metrics["rung_val_bpb"] = metrics.pop("val_bpb")
    for k, v in trial.candidate.meta.items():
        if k.startswith("agent_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[k] = float(v)
    return metrics


class Mirror:
    def __init__(self, tracking_uri: str, experiment: str, study_id: str, study_name: str,
                 searcher: str, tags: dict[str, str], params: dict[str, Any], baseline_source: str):
        import mlflow  # the loop imports fine without a tracking stack until a mirror is made

        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.study_id = study_id
        self.study_name = study_name
        self.searcher = searcher
        self.tags = tags
        self.params = params
        self.baseline_source = baseline_source
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._queue: "queue.Queue[tuple[str, Callable[[], None]]]" = queue.Queue()
        self._pending: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outstanding = 0  # submitted jobs not yet done
        self._retry_now = threading.Event()
        self.failures = 0
        self._thread = threading.Thread(target=self._worker, name="mlflow-mirror", daemon=True)

    # -- start ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail fast, with one line, when the tracking URI cannot be used at all."""
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            raise MirrorError(f"MLflow tracking URI {self.tracking_uri!r} is not usable: {_one_line(e)}") from None

    def start(self) -> None:
        self._thread.start()
        self._submit("parent", self._ensure_parent)

    # -- what the loop calls (never blocks) --------------------------------------------------
    def trial_finished(self, trial: Trial, result: Result, times: dict[str, float]) -> None:
        self._submit(f"trial {trial.trial_id}", lambda: self._log_trial(trial, result, times))

    def best_improved(self, step: int, val_bpb: float, trial_id: str) -> None:
        def job():
            self._ensure_parent()
            self.client.log_metric(self.parent_run_id, "best_val_bpb", val_bpb, step=step)
            self.client.set_tag(self.parent_run_id, "best_trial", trial_id)

        self._submit(f"best {step}", job)

    def catch_up(self, finished: list[tuple[Trial, Result, dict[str, float]]],
                 staircase: list[tuple[int, float, str]]) -> None:
        """On (re)start: mirror every finished trial MLflow does not have yet."""
        def job():
            self._ensure_parent()
            have = self._mirrored_trial_ids()
            missing = [(t, r, tm) for t, r, tm in finished if t.trial_id not in have]
            for t, r, tm in missing:
                self._log_trial(t, r, tm)
            if missing:
                for step, value, tid in staircase:
                    self.client.log_metric(self.parent_run_id, "best_val_bpb", value, step=step)
                log.info("mirror caught up %d trial(s) from the journal", len(missing))

        self._submit("catch-up", job)

    def finish(self, metrics: dict[str, float], artifact_dirs: list[Path], status: str = "FINISHED",
               tags: dict[str, str] | None = None) -> None:
        def job():
            self._ensure_parent()
            import mlflow.entities as ent

            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_run_id, metrics=[
                ent.Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
                tags=[ent.RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()])
            for d in artifact_dirs:
                if Path(d).is_dir() and any(Path(d).iterdir()):
                    self.client.log_artifacts(self.parent_run_id, str(d), artifact_path=Path(d).name)
            self.client.set_terminated(self.parent_run_id, status=status)

        self._submit("finish", job)

    def flush(self, timeout: float) -> bool:
        """Wait for queued work, retrying failures at once; True if everything reached MLflow."""
        deadline = time.time() + timeout
        self._retry_now.set()
        while time.time() < deadline:
            with self._lock:
                if self._outstanding == 0:
                    return True
            time.sleep(0.05)
            self._retry_now.set()
        return False

    def close(self) -> None:
        self._stop.set()

    # -- the worker ------------------------------------------------------------------------------
    def _submit(self, what: str, job: Callable[[], None]) -> None:
        with self._lock:
            self._outstanding += 1
        self._queue.put((what, job))

    def _worker(self) -> None:
        retry_at = 0.0
        while not self._stop.is_set():
            if self._pending and (time.time() >= retry_at or self._retry_now.is_set()):
                self._retry_now.clear()
                with self._lock:
                    for item in self._pending:
                        self._queue.put(item)
                    self._pending.clear()
            try:
                what, job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                job()
                with self._lock:
                    self._outstanding -= 1
            except Exception as e:  # noqa: BLE001 - the journal has it; retry later
                self.failures += 1
                log.warning("MLflow mirror: %s failed (%s); will retry", what, _one_line(e))
                with self._lock:
                    self._pending.append((what, job))
                    # keep the order: everything queued behind a failure waits for the retry too
                    while not self._queue.empty():
                        self._pending.append(self._queue.get_nowait())
                retry_at = time.time() + 5.0
                self._retry_now.clear()

    def _ensure_parent(self) -> None:
        if self.parent_run_id:
            return
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}' and tags.`arena.kind` = 'study'",
            max_results=1,
        )
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            return
        import mlflow.entities as ent

        run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags={
            "arena.kind": "study", "arena.study_id": self.study_id, **self.tags})
        params = [ent.Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in self.params.items()]
        for i in range(0, len(params), 90):
            self.client.log_batch(run.info.run_id, params=params[i:i + 90])
        self.parent_run_id = run.info.run_id

    def _mirrored_trial_ids(self) -> set[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}' and tags.`arena.kind` = 'trial'"
                          " and tags.`arena.mirrored` = '1'",
            max_results=50000,
        )
        return {r.data.tags.get("arena.trial_id") for r in runs}

    def _child_run(self, trial: Trial) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}'"
                          f" and tags.`arena.trial_id` = '{trial.trial_id}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=trial.trial_id, tags={
            "mlflow.parentRunId": self.parent_run_id, "arena.kind": "trial",
            "arena.study_id": self.study_id, "arena.trial_id": trial.trial_id})
        return run.info.run_id

    def _log_trial(self, trial: Trial, result: Result, times: dict[str, float]) -> None:
        import mlflow.entities as ent

        self._ensure_parent()
        run_id = self._child_run(trial)
        now = int(time.time() * 1000)
        metrics = [ent.Metric(k, v, now, 0) for k, v in trial_metrics(trial, result, times).items()]
        params = [ent.Param(k, v) for k, v in trial_params(trial).items()]
        tags = [ent.RunTag(k, v) for k, v in trial_tags(trial, result, self.study_id, self.searcher).items()]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "train.py").write_text(trial.candidate.source)
            (tmp / "train.diff").write_text(source_diff(self.baseline_source, trial.candidate.source))
            tail = _tail(Path(trial.directory) / "run.log", 200) if trial.directory else ""
            (tmp / "run_tail.log").write_text(tail)
            self.client.log_artifacts(run_id, str(tmp))
        self.client.set_terminated(run_id, status="FINISHED" if result.ok else "FAILED")
        self.client.set_tag(run_id, "arena.mirrored", "1")


def source_diff(baseline: str, source: str) -> str:
    return "".join(difflib.unified_diff(
        baseline.splitlines(keepends=True), source.splitlines(keepends=True),
        fromfile="baseline/train.py", tofile="candidate/train.py"))


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
