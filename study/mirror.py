"""The MLflow mirror: a copy of the journal in MLflow, idempotent by trial id.

It runs on its own thread with a queue, so a slow or dead tracking server never stalls the loop;
work that fails stays queued and is retried, and anything still missing when the study ends is
found again on the next start by asking MLflow which trials it already has (`catch_up`). One
parent run per study, one child run per trial; the layout is what `analysis/` reads. Before any
compute, `check` proves the store usable within seconds, or names it in one line: a local database
folder that cannot be written, a file that is not a database, a server that does not answer.

Times: the parent run starts when the study first started and lasts its study time (idle gaps
between sessions left out, study/clock.py), and the running best is stamped on that same clock,
so every duration and time axis of the UI agrees with the summary and with analysis/.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from study import mlflow_content as content
from study.observers import StopKind, StudyEnd, StudyObserver
from study.records import Result, Trial
from train.sandbox.scratch import Scratch

log = logging.getLogger("arena.mirror")

# A dead server must cost seconds, not MLflow's default of minutes of retries per call. The start-up
# check asks once, briefly (CHECK_HTTP), unless the user set these themselves.
_USER_HTTP = {k for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT") if k in os.environ}
CHECK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# "Creating initial MLflow database tables..." on every run of a local store is noise to a researcher.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)



class MirrorError(RuntimeError):
    pass


def local_database(tracking_uri: str | None) -> Path | None:
    """The file behind a `sqlite:///` tracking URI (relative to the current folder, as MLflow reads it)."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def local_store_problem(tracking_uri: str | None) -> str | None:
    """Why a local `sqlite:///` store cannot take a study's records, found in well under a second
    (MLflow itself retries an unusable database for minutes, then prints a long SQLAlchemy
    traceback); None when it can, or when the store is not local."""
    db = local_database(tracking_uri)
    if db is None:
        return None
    folder = db.absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # nothing is made here
    if not existing.is_dir():
        return f"cannot make {folder}: {existing} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".arena-probe-"):
            pass  # the database, its journal and the artifacts (mlruns/) are written there
    except OSError as e:
        return f"cannot write in {existing}: {e.strerror or e}"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(str(db), timeout=10)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return None  # another study is writing: usable, just busy
        return f"cannot write {db}: {e}"
    except sqlite3.DatabaseError as e:
        return f"{db} is not an MLflow database: {e}"
    return None


def server_problem(tracking_uri: str | None, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (no answer within `timeout`), asked before
    any data is prepared; any HTTP answer, even a refusal, proves it is there (the mirror's own
    check then asks it properly). None when it answers, or when the URI is not a server."""
    import urllib.error
    import urllib.request

    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer from the server ({getattr(reason, 'strerror', None) or reason})"
    return None


@contextlib.contextmanager
def _brief_http():
    """One short try per request while checking a tracking server at start-up."""
    saved = {k: os.environ.get(k) for k in CHECK_HTTP}
    os.environ.update({k: v for k, v in CHECK_HTTP.items() if k not in _USER_HTTP})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def holds_runs(db: Path) -> bool:
    """Whether a local MLflow database has any run in it: one that does is some study's record,
    whoever made the file."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            return con.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.OperationalError as e:
        return "no such table" not in str(e)  # an empty or half-made file holds none; a locked one may


def open_client(tracking_uri: str, settle_s: float = 10.0):
    """An MlflowClient; MirrorError (one line) if the store cannot be opened. MLflow creates and
    migrates a local database as a client first opens it, step by step outside one transaction,
    so a start killed then (the first seconds of a study) left a half-made database that every
    later start failed on (`table _alembic_tmp_experiments already exists`, `table
    evaluation_datasets already exists`). A local database short of MLflow's schema that holds no
    run is moved aside first and made again: nothing is lost, and the study goes on. A migration
    another study on the same store is running right now looks the same, so the database must stay
    unchanged for `settle_s` first."""
    import mlflow  # the loop imports fine without a tracking stack until a mirror is made

    db = local_database(tracking_uri)
    if db is not None and _half_made(db, settle_s):
        aside = db.with_name(f"{db.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-journal", "-wal", "-shm"):  # a journal must never meet another database
            with contextlib.suppress(FileNotFoundError):
                Path(f"{db}{suffix}").rename(f"{aside}{suffix}")
        log.warning("MLflow's local database %s was left half-made by a start that was killed and holds no "
                    "run; moved aside to %s and made again", db, aside.name)
    try:
        return mlflow.MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
        raise MirrorError(f"MLflow tracking URI {tracking_uri!r} is not usable: {_one_line(e)}") from None


def _half_made(db: Path, settle_s: float) -> bool:
    """A local database behind MLflow's schema (or with a migration's temporary table left), no
    run in it, and no write for `settle_s`."""
    import sqlite3

    def looks():
        try:
            if not db.exists() or holds_runs(db):
                return False, None
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
                names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                version = con.execute("SELECT version_num FROM alembic_version").fetchone() \
                    if "alembic_version" in names else None
            behind = version is None or version[0] != _schema_head() or any(n.startswith("_alembic_tmp_") for n in names)
            stat = db.stat()
            return behind and bool(names), (stat.st_mtime_ns, stat.st_size)
        except (sqlite3.Error, OSError):
            return False, None

    first, state = looks()
    if not first:
        return False
    time.sleep(settle_s)
    again, later = looks()
    return again and later == state


def _schema_head() -> str | None:
    """The schema revision this MLflow makes a database at."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - without it, only a left temporary table tells
        return None


class Mirror(StudyObserver):
    def __init__(self, tracking_uri: str, experiment: str, study_id: str, study_name: str,
                 searcher: str, tags: dict[str, str], params: dict[str, Any], baseline_source: str,
                 flush_timeout_s: float = 60.0):
        self.tracking_uri = tracking_uri
        self.client = None  # made by check(), once the store is known to be usable
        self.experiment = experiment
        self.study_id = study_id
        self.study_name = study_name
        self.searcher = searcher
        self.tags = tags
        self.params = params
        self.baseline_source = baseline_source
        self.flush_timeout_s = flush_timeout_s
        from train.knobs import read_knobs

        self.baseline_knobs = read_knobs(baseline_source)
        self.running_best = content.RunningBest()  # fed in the loop's order
        self.view_key = content.view_key(study_name)
        self.clock_origin: float | None = None  # the study's start on a real clock (epoch s), from on_start
        self.parent_run_id: str | None = None
        self.parent_start_ms: int | None = None
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
        """Fail fast, with one line naming the URI, when the tracking store cannot be used at all;
        then make sure of the experiment and this study's saved runs-table view."""
        why = local_store_problem(self.tracking_uri)
        if why:
            raise MirrorError(f"MLflow tracking URI {self.tracking_uri!r} is not usable: {why}")
        try:
            with _brief_http():
                self.client = open_client(self.tracking_uri)
                self._ensure_experiment()
                self.client.set_experiment_tag(self.experiment_id, *content.view_tag(self.study_name, self.study_id))
        except MirrorError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            raise MirrorError(f"MLflow tracking URI {self.tracking_uri!r} is not usable: {_one_line(e)}") from None

    def start(self) -> None:
        if self._thread.ident is not None:  # started already (a thread starts once)
            return
        self._thread.start()
        self._submit("parent", self._ensure_parent)

    # -- StudyObserver: what the loop tells it (never blocks), and the end ---------------------
    def on_start(self, state, resumed) -> None:
        origin = state.clock.origin
        self.clock_origin = origin if origin > 1e9 else None  # a virtual clock's 0 is no date
        self.start()
        self.catch_up(resumed)

    def on_trial_finished(self, trial: Trial, result: Result, times) -> None:
        self.trial_finished(trial, result, times)

    def on_new_best(self, index: int, trial: Trial, result: Result) -> None:
        self.best_improved(index, result.val_bpb, trial.trial_id)

    def on_end(self, state, end: StudyEnd) -> None:
        """End the parent run (FAILED if the loop died of an error, KILLED after a Ctrl-C), then give
        the queue `flush_timeout_s` to drain."""
        status = "FAILED" if end.failed else "KILLED" if end.stop is StopKind.INTERRUPTED else "FINISHED"
        try:
            self.start()  # a study that failed before its first tick still ends its parent run
            self.finish(end.metrics, end.artifact_dirs, status=status, tags=end.tags, files=end.files,
                        description=end.description)
            caught_up = self.flush(self.flush_timeout_s)
        except KeyboardInterrupt:  # the user will not wait for MLflow: the parent still ends, KILLED
            self.end_parent_now("KILLED")
            raise
        if not caught_up:
            print("MLflow is behind: the journal has every trial; re-run the same command to catch up.",
                  file=sys.stderr)
        self.close()

    def end_parent_now(self, status: str, wait_s: float = 15.0) -> None:
        """Stop the queue and end the parent run from this thread (what is still queued is found
        again by the next start's catch-up). The worker may be creating the parent right now, so
        its current call gets `wait_s` to return first."""
        self.close()
        if self._thread.ident is not None:
            self._thread.join(wait_s)
        if self.parent_run_id:
            try:
                self.client.set_terminated(self.parent_run_id, status=status)
            except Exception as e:  # noqa: BLE001 - a dead server: the next start ends it
                log.warning("MLflow mirror: could not end the parent run (%s)", _one_line(e))

    # -- the work, queued ----------------------------------------------------------------------
    def trial_finished(self, trial: Trial, result: Result, times: dict[str, float]) -> None:
        points = self.running_best.add(trial, result, times.get("t_finished"))

        def job():
            self._log_trial(trial, result, times)
            self._log_running_best(points)

        self._submit(f"trial {trial.trial_id}", job)

    def best_improved(self, step: int, val_bpb: float, trial_id: str) -> None:
        """The running best itself is logged with every trial (`trial_finished`)."""
        def job():
            self._ensure_parent()
            self.client.set_tag(self.parent_run_id, "best_trial", trial_id)

        self._submit(f"best {step}", job)

    def catch_up(self, finished: list[tuple[Trial, Result, dict[str, float]]]) -> None:
        """On (re)start: mirror every finished trial MLflow does not have yet."""
        self.running_best = content.RunningBest()
        points = [p for t, r, tm in finished for p in self.running_best.add(t, r, tm.get("t_finished"))]

        def job():
            self._ensure_parent()
            have = self._mirrored_trial_ids()
            missing = [(t, r, tm) for t, r, tm in finished if t.trial_id not in have]
            for t, r, tm in missing:
                self._log_trial(t, r, tm)
            if missing:
                self._log_running_best(points)  # the same points again are the same rows: idempotent
                log.info("mirror caught up %d trial(s) from the journal", len(missing))

        self._submit("catch-up", job)

    def finish(self, metrics: dict[str, float], artifact_dirs: list[Path], status: str = "FINISHED",
               tags: dict[str, str] | None = None, files: list[Path] = (), description: str | None = None) -> None:
        """End the parent run; `files` (best_train.py, the leaderboard) are attached as they are now,
        `description` becomes the run's Description."""
        tags = {**(tags or {}), **({content.DESCRIPTION_TAG: description} if description else {})}

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
            for f in files:
                if Path(f).is_file():
                    self.client.log_artifact(self.parent_run_id, str(f))
            # The run lasts its study time, as the summary and analysis/ count it (study/clock.py).
            study_seconds = metrics.get("wall_seconds")
            end_ms = None if study_seconds is None else self.parent_start_ms + int(round(study_seconds * 1000))
            self.client.set_terminated(self.parent_run_id, status=status, end_time=end_ms)

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

    def _ensure_experiment(self) -> None:
        """Find or make the experiment, marked as model training with a description (an existing
        one made before these tags, or by hand, gets them too)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(self.experiment, tags=content.experiment_tags(),
                                                               artifact_location=self._artifact_location())
            return
        self.experiment_id = exp.experiment_id
        kind, value = content.EXPERIMENT_KIND
        if exp.tags.get(kind) != value:
            self.client.set_experiment_tag(self.experiment_id, kind, value)
        if not exp.tags.get(content.DESCRIPTION_TAG):
            self.client.set_experiment_tag(self.experiment_id, content.DESCRIPTION_TAG, content.EXPERIMENT_DESCRIPTION)

    def _artifact_location(self) -> str | None:
        """Beside a local database, not MLflow's default of ./mlruns in whatever folder the first
        study happened to start from (a study started elsewhere would leave its artifacts there);
        a server decides for itself."""
        db = local_database(self.tracking_uri)
        if db is None:
            return None
        return (db.resolve().parent / "mlruns" / re.sub(r"[^\w.-]+", "_", self.experiment)).as_uri()

    def _ensure_parent(self) -> None:
        if self.parent_run_id:
            return
        if self.experiment_id is None:
            self._ensure_experiment()
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}' and tags.`arena.kind` = 'study'",
            max_results=1,
        )
        if found:
            self.parent_run_id = found[0].info.run_id
            self.parent_start_ms = found[0].info.start_time
            self.client.update_run(self.parent_run_id, status="RUNNING")
            return
        import mlflow.entities as ent

        start_ms = int(self.clock_origin * 1000) if self.clock_origin else None
        run = self.client.create_run(self.experiment_id, run_name=self.study_name, start_time=start_ms, tags={
            "arena.kind": "study", "arena.study_id": self.study_id, **self.tags})
        params = [ent.Param(k, str(v)[:content.MAX_PARAM_LEN]) for k, v in self.params.items()]
        for i in range(0, len(params), 90):
            self.client.log_batch(run.info.run_id, params=params[i:i + 90])
        self.parent_run_id = run.info.run_id
        self.parent_start_ms = run.info.start_time

    def _mirrored_trial_ids(self) -> set[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}' and tags.`arena.kind` = 'trial'"
                          " and tags.`arena.mirrored` = '1'",
            max_results=50000,
        )
        return {r.data.tags.get("arena.trial_id") for r in runs}

    def _child_run(self, trial: Trial, start_ms: int | None) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`arena.study_id` = '{self.study_id}'"
                          f" and tags.`arena.trial_id` = '{trial.trial_id}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=content.trial_run_name(self.study_name, trial.trial_id),
                                     start_time=start_ms, tags={
            "mlflow.parentRunId": self.parent_run_id, "arena.kind": "trial",
            "arena.study_id": self.study_id, "arena.trial_id": trial.trial_id})
        return run.info.run_id

    def _log_trial(self, trial: Trial, result: Result, times: dict[str, float]) -> None:
        import mlflow.entities as ent

        self._ensure_parent()
        start_ms, end_ms = content.run_span_ms(result)
        run_id = self._child_run(trial, start_ms)
        at = end_ms or int(time.time() * 1000)
        metrics = [ent.Metric(k, v, at, 0) for k, v in content.trial_metrics(trial, result, times).items()]
        metrics += [ent.Metric(content.LOSS_CURVE, loss, (start_ms or at) + int(seconds * 1000), step)
                    for step, loss, seconds in content.loss_curve(trial)]
        params = [ent.Param(k, v) for k, v in content.trial_params(trial).items()]
        tags = [ent.RunTag(k, v) for k, v in content.trial_tags(
            trial, result, self.study_id, self.searcher, self.baseline_knobs, times).items()]
        for i in range(0, max(1, len(metrics)), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000], params=params if i == 0 else [],
                                  tags=tags if i == 0 else [])
        with Scratch("mlflow") as tmp:  # a folder an orchestrator killed meanwhile leaves to the host's next sweep
            content.write_trial_artifacts(tmp.path, trial, result, self.baseline_source)
            self.client.log_artifacts(run_id, str(tmp.path))
        self.client.set_terminated(run_id, status="FINISHED" if result.ok else "FAILED", end_time=end_ms)
        self.client.set_tag(run_id, "arena.mirrored", "1")

    def _log_running_best(self, points: list[content.BestPoint]) -> None:
        """`best_val_bpb` by finished-trial index and `best_val_bpb_by_time` by study second, drawn
        as steps (content.RunningBest), each point stamped at the parent's start plus its study
        time, so the UI's time axes show study time too."""
        import mlflow.entities as ent

        if not points:
            return
        self._ensure_parent()
        now_ms = int(time.time() * 1000)
        metrics = []
        for p in points:
            base = now_ms if p.study_seconds is None else self.parent_start_ms + int(round(p.study_seconds * 1000))
            metrics.append(ent.Metric(p.key, p.value, base + p.offset_ms, p.step))
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.parent_run_id, metrics=metrics[i:i + 1000])


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    refused = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out)", text)
    if refused and ("Max retries exceeded" in text or "timed out" in text):
        return f"no answer from the server ({(refused.group(1) or refused.group(2)).strip()})"
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
