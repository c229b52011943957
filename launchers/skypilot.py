"""Run trials on a pool of SkyPilot clusters: one cluster per slot, launched once, reused by trial after trial.

This is the setup of SkyPilot's own autoresearch run (16 Kubernetes clusters that landed on H100 or
H200 without anyone deciding which), made explicit: the pool asks for any of the listed accelerators,
and each slot records what SkyPilot actually placed it on (accelerator, host, $/h from the cluster's
handle), so device kinds are known, never guessed.

Everything goes through SkyPilot's Python SDK (every call returns a request id; `sky.get` waits for
it). The pool is launched in parallel in `start()`: the launch's setup installs what `train/` needs
and prepares the data and tokenizer once per cluster, with `train/` itself file-mounted to
~/arena/train. A trial is one `sky.exec` on its cluster with the trial's own workdir (train.py and
its spec, synced to the cluster's ~/sky_workdir; a cluster runs one trial at a time, so parallel
trials never see each other's code). SkyPilot 0.14 has no SDK call that copies files back from a
cluster, so the job prints its result and log files (gzip + base64, one `ARENA-FILE name chunk` line
each 2000 characters) after the harness, and the launcher rebuilds them from `sky.tail_logs`.

Each trial is watched by its own thread (the SDK is blocking), so `wait` never blocks longer than
asked. A cluster that fails to launch is retried `launch_attempts` times, then dropped with its
reason logged; a cluster that dies under a trial (preempted, its Slurm job cancelled, torn down) ends
that trial as `lost` (it is not re-run: the searcher is told, and decides) and is relaunched under
the same name while attempts remain. Trials submitted to a dropped cluster come back `lost` at once.

Next to every trial, sky_task.yaml is the task a person would write by hand for it, to rerun it
alone with `sky launch -c NAME sky_task.yaml`.
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launchers.base import read_result
from study.core import PROJECT_ROOT, Launcher, LauncherError, Slot
from study.records import Result, Trial
from train.contract import LOG_FILE, RESULT_FILE, STEPS_FILE, TRAIN_FILE, TRIAL_FILE

log = logging.getLogger("arena.skypilot")

REMOTE_PROJECT = "~/arena"  # train/ is mounted at ~/arena/train on every cluster
REMOTE_WORKDIR = "~/sky_workdir"  # where SkyPilot syncs a task's workdir
FILE_MARK = "ARENA-FILE"
FETCHED = (RESULT_FILE, LOG_FILE, STEPS_FILE)
_FILE_LINE = re.compile(rf"{FILE_MARK} ({'|'.join(re.escape(f) for f in FETCHED)}) ([A-Za-z0-9+/=]+)\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NAME_BAD = re.compile(r"[^a-z0-9-]+")
MAX_POLL_FAILURES = 3  # consecutive failed job_status calls on a live cluster before the trial is lost


def _sky():
    try:
        import sky
    except ImportError:
        raise LauncherError("SkyPilot is not installed in this Python: run scripts/skypilot_env.sh and "
                            "start the study with .venv-sky/bin/python run.py launcher=skypilot") from None
    return sky


def one_line(error: BaseException | str) -> str:
    """SkyPilot's messages are multi-line and colored; the journal and MLflow get one plain line."""
    text = _ANSI.sub("", str(error)).strip()
    first = text.splitlines()[0] if text else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    return f"{name}: {first}" if name else first


@dataclass
class _Cluster:
    """One slot's cluster. `ready` is set while the cluster is usable or definitively dropped."""

    name: str
    state: str = "launching"  # launching | up | dropped
    attempts: int = 0
    reason: str = ""
    slot: Slot | None = None
    request: Any = None  # the launch request in flight, cancelled if the study closes meanwhile
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Run:
    trial: Trial
    cluster: _Cluster
    submitted: float
    cancel: threading.Event = field(default_factory=threading.Event)
    job_id: int | None = None
    started: float | None = None
    cancel_reason: str = "cancelled"


class SkyPilotLauncher(Launcher):
    name = "skypilot"
    prepares_data_remotely = True  # each cluster's setup prepares the data, not this machine

    def __init__(self, clusters: int = 2, slots: int | None = None, accelerators: Any = None,
                 infra: str | None = None, cloud: str | None = None, region: str | None = None,
                 cpus: str | int | None = None, memory: str | int | None = None, use_spot: bool = False,
                 autostop_minutes: int | None = None, autostop_down: bool = True,
                 cluster_prefix: str = "arena", keep_pool: bool = False, setup: str = "",
                 python: str = "python", launch_attempts: int = 2, hard_limit_s: float | None = None,
                 time_margin_s: float = 300, poll_interval_s: float = 5.0, log_dir: str = "skypilot",
                 name: str = "skypilot"):
        self.n_clusters = int(clusters)
        if slots is not None and int(slots) != self.n_clusters:
            raise LauncherError(f"slots ({slots}) must equal clusters ({clusters}): each cluster is one slot")
        self.accelerators = _parse_accelerators(accelerators)
        if infra and (cloud or region):
            raise LauncherError("give either infra (e.g. aws/us-east-1, k8s/my-context, slurm/arena) or cloud/region")
        if region and not cloud:
            raise LauncherError(f"region {region!r} needs a cloud (or use infra=CLOUD/REGION)")
        self.infra = infra or (f"{cloud}/{region}" if region else cloud) or None
        self.cpus = None if cpus is None else str(cpus)
        self.memory = None if memory is None else str(memory)
        self.use_spot = bool(use_spot)
        self.autostop_minutes = autostop_minutes
        self.autostop_down = bool(autostop_down)
        self.prefix = _NAME_BAD.sub("-", str(cluster_prefix).lower()).strip("-") or "arena"
        self.keep_pool = bool(keep_pool)
        self.setup = setup or ""
        self.python = python
        self.launch_attempts = max(1, int(launch_attempts))
        self.hard_limit_s = hard_limit_s
        self.time_margin_s = float(time_margin_s)
        self.poll_interval_s = float(poll_interval_s)
        self.log_dir = Path(log_dir)
        self.name = name
        if self.n_clusters < 1:
            raise LauncherError(f"clusters must be >= 1, got {clusters}")
        self._clusters: list[_Cluster] = []
        self._runs: dict[str, _Run] = {}
        self._results: queue.Queue[tuple[str, Result]] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = False

    # --- the pool -------------------------------------------------------------------------------

    def start(self) -> None:
        sky = _sky()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:  # an impossible request fails here, in seconds, before any cluster is launched
            from sky.utils import dag_utils

            sky.get(sky.optimize(dag_utils.convert_entrypoint_to_dag(self._setup_task())))
        except Exception as e:  # noqa: BLE001 - SkyPilot raises its own exception types
            raise LauncherError(f"SkyPilot cannot place {self._resources_text()}: {one_line(e)}") from None
        self._clusters = [_Cluster(f"{self.prefix}-{i}") for i in range(self.n_clusters)]
        threads = [threading.Thread(target=self._bring_up, args=(c,), daemon=True, name=f"sky-up-{c.name}")
                   for c in self._clusters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        up = [c for c in self._clusters if c.state == "up"]
        for c in self._clusters:
            if c.state != "up":
                log.warning("cluster %s dropped: %s", c.name, c.reason)
        if not up:
            raise LauncherError(f"no cluster of {self.n_clusters} could be launched: {self._clusters[0].reason}")
        self._clusters = up
        log.info("SkyPilot pool: %s", ", ".join(f"{c.name} ({c.slot.device_kind}, {c.slot.info['host']}, "
                                                 f"${c.slot.info['usd_per_hour']:.2f}/h)" for c in up))

    def _bring_up(self, cluster: _Cluster) -> None:
        """Launch (or relaunch) one cluster, wait for its setup to finish, and record what it got."""
        sky = _sky()
        cluster.ready.clear()
        cluster.state = "launching"
        while cluster.attempts < self.launch_attempts and not self._closing:
            cluster.attempts += 1
            started = time.time()
            try:
                with open(self.log_dir / f"launch-{cluster.name}.log", "a") as out:
                    cluster.request = sky.launch(self._setup_task(), cluster_name=cluster.name,
                                                 idle_minutes_to_autostop=self.autostop_minutes,
                                                 down=self.autostop_down and self.autostop_minutes is not None)
                    job_id, handle = sky.stream_and_get(cluster.request, output_stream=out)
                    cluster.request = None
                if job_id is not None:  # the setup runs detached, as the cluster's first job
                    status = self._wait_job(cluster.name, job_id, cancel=None)
                    if status != "SUCCEEDED":
                        raise RuntimeError(f"setup ended {status}: {self._job_log_tail(cluster.name, job_id)}")
                cluster.slot = self._slot(cluster.name, handle)
                cluster.state = "up"
                log.info("cluster %s up in %.0f s: %s", cluster.name, time.time() - started, cluster.slot.info)
                break
            except Exception as e:  # noqa: BLE001
                cluster.request = None
                cluster.reason = one_line(e)
                log.warning("launching %s (attempt %d/%d) failed: %s", cluster.name, cluster.attempts,
                            self.launch_attempts, cluster.reason)
                if _is_unavailable(e):
                    break  # asking again gets the same answer
        if cluster.state != "up":
            cluster.state = "dropped"
            self._down([cluster.name], quiet=True)
        cluster.ready.set()

    def _slot(self, name: str, handle) -> Slot:
        res = handle.launched_resources
        accs = res.accelerators or {}
        accelerator = next(iter(accs), None)
        info = {
            "cluster": name,
            "accelerator": accelerator,
            "accelerator_count": accs.get(accelerator) if accelerator else 0,
            "host": getattr(handle, "head_ip", None),
            "infra": str(res.cloud) + (f"/{res.region}" if res.region else ""),
            "resources": _ANSI.sub("", str(res)),
            "usd_per_hour": float(res.get_cost(3600)),
        }
        return Slot(name=name, device_kind=accelerator or "cpu", info=info)

    def slots(self) -> list[Slot]:
        return [c.slot for c in self._clusters if c.state != "dropped" and c.slot is not None]

    # --- trials ---------------------------------------------------------------------------------

    def submit(self, trial: Trial, slot: Slot) -> None:
        cluster = next((c for c in self._clusters if c.name == slot.name), None)
        if cluster is None:
            raise LauncherError(f"no cluster {slot.name} in this pool")
        workdir = self._stage(trial)
        (Path(trial.directory) / "sky_task.yaml").write_text(self._task_yaml(trial, workdir))
        run = _Run(trial, cluster, submitted=time.time())
        with self._lock:
            self._runs[trial.trial_id] = run
        threading.Thread(target=self._watch, args=(run, workdir), daemon=True, name=f"sky-{trial.trial_id}").start()

    def _stage(self, trial: Trial) -> Path:
        """The trial's workdir as the cluster sees it: the candidate and its spec, with the data cache
        left to the cluster (its own ~/.cache, filled by setup) instead of this machine's path."""
        src = Path(trial.directory)
        workdir = src / "sky_workdir"
        workdir.mkdir(exist_ok=True)
        shutil.copy2(src / TRAIN_FILE, workdir / TRAIN_FILE)
        spec = json.loads((src / TRIAL_FILE).read_text())
        spec["objective"] = {**spec.get("objective", {}), "cache_dir": None}
        (workdir / TRIAL_FILE).write_text(json.dumps(spec, indent=2))
        return workdir

    def _watch(self, run: _Run, workdir: Path) -> None:
        """One trial from exec to result; every failure becomes a Result, never an exception."""
        cluster = run.cluster
        try:
            while not cluster.ready.wait(1.0) and not run.cancel.is_set():
                pass  # the cluster is being relaunched
            if run.cancel.is_set():
                result = Result(status="cancelled", reason="cancelled before it started")
            elif cluster.state != "up":
                result = Result(status="lost", reason=f"cluster {cluster.name} was dropped: {cluster.reason}")
            else:
                result = self._run_on_cluster(run, workdir)
        except Exception as e:  # noqa: BLE001 - the study must get a result whatever happened
            result = self._infra_failure(run, e)
        self._finish(run, result)

    def _run_on_cluster(self, run: _Run, workdir: Path) -> Result:
        sky = _sky()
        cluster = run.cluster
        run.job_id, _ = sky.get(sky.exec(self._exec_task(run.trial, workdir, cluster.slot), cluster_name=cluster.name))
        status = self._wait_job(cluster.name, run.job_id, cancel=run)
        logs = self._job_log(cluster.name, run.job_id)
        trial_dir = Path(run.trial.directory)
        fetched = _decode_files(logs)
        for name, data in fetched.items():
            (trial_dir / name).write_bytes(data)
        if LOG_FILE not in fetched:  # the harness never got to write one: keep the job's log as evidence
            (trial_dir / LOG_FILE).write_text(logs)
        if status == "CANCELLED" and run.cancel.is_set():
            timed_out = run.cancel_reason.startswith("timeout")
            return Result(status="timeout" if timed_out else "cancelled", reason=run.cancel_reason)
        # The cluster's harness never gets the study's key (it would have to travel to every cluster):
        # its results are unsigned, and a cluster counts as trusted as a whole.
        if RESULT_FILE in fetched:
            return read_result(trial_dir, signed=False)
        return read_result(trial_dir, reason=f"SkyPilot job {run.job_id} on {cluster.name} ended {status} "
                                             f"without {RESULT_FILE}", signed=False)

    def _wait_job(self, cluster: str, job_id: int, cancel: _Run | None) -> str:
        """Poll the job until it ends; cancel it when asked or when it outlives the hard limit."""
        sky = _sky()
        limit = None if self.hard_limit_s is None else float(self.hard_limit_s) + self.time_margin_s
        cancelled, failures = False, 0
        while True:
            try:
                status = sky.get(sky.job_status(cluster, [job_id])).get(job_id)
                if status is None:
                    raise RuntimeError(f"job {job_id} is not in the job queue of {cluster}")
                failures = 0
            except Exception:  # a dead cluster fails at once; a hiccup of the API server is retried
                failures += 1
                if failures >= MAX_POLL_FAILURES or self._cluster_state(cluster, checks=1) != "UP":
                    raise
                time.sleep(self.poll_interval_s)
                continue
            name = status.value
            if status.is_terminal():
                return name
            if cancel is not None:
                if name == "RUNNING" and cancel.started is None:
                    cancel.started = time.time()
                if not cancelled and limit and cancel.started and time.time() - cancel.started > limit:
                    cancel.cancel_reason = f"timeout: still running {limit:.0f} s after it started"
                    cancel.cancel.set()
                if cancel.cancel.is_set() and not cancelled:
                    sky.get(sky.cancel(cluster, job_ids=[job_id]))
                    cancelled = True
            time.sleep(self.poll_interval_s)

    def _job_log(self, cluster: str, job_id: int) -> str:
        sky = _sky()
        out = io.StringIO()
        sky.tail_logs(cluster, job_id, follow=False, output_stream=out)
        return _ANSI.sub("", out.getvalue())

    def _job_log_tail(self, cluster: str, job_id: int, lines: int = 5) -> str:
        try:
            text = self._job_log(cluster, job_id)
        except Exception as e:  # noqa: BLE001
            return one_line(e)
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])

    def _infra_failure(self, run: _Run, error: Exception) -> Result:
        """The trial could not be run or watched: decide whether its cluster is gone."""
        cluster = run.cluster
        why = one_line(error)
        if run.cancel.is_set() and not run.cancel_reason.startswith("timeout"):
            return Result(status="cancelled", reason=f"cancelled ({why})")
        state = self._cluster_state(cluster.name)
        if state == "UP":
            return Result(status="lost", reason=f"SkyPilot error on {cluster.name}: {why}")
        log.warning("cluster %s is %s (%s); trial %s lost", cluster.name, state or "gone", why, run.trial.trial_id)
        self._relaunch(cluster, f"{state or 'gone'} after: {why}")
        return Result(status="lost", reason=f"cluster {cluster.name} died ({state or 'gone'}): {why}")

    def _cluster_state(self, name: str, checks: int = 3) -> str | None:
        """The cluster's status after a refresh from the infra: UP, INIT (unhealthy), STOPPED, or
        None when SkyPilot found it gone. A freshly killed allocation can still read UP for a few
        seconds, so UP is asked again; an API server that cannot answer counts as UP (a busy
        server is no reason to tear a cluster down)."""
        sky = _sky()
        state = "UP"
        for i in range(checks):
            if i:
                time.sleep(max(self.poll_interval_s, 3.0))
            try:
                records = sky.get(sky.status([name], refresh=sky.StatusRefreshMode.FORCE))
            except Exception as e:  # noqa: BLE001
                log.warning("sky status %s: %s", name, one_line(e))
                continue
            state = next((getattr(r["status"], "value", str(r["status"])) for r in records), None)
            if state != "UP":
                return state
        return state

    def _relaunch(self, cluster: _Cluster, why: str) -> None:
        """Launch the cluster again under its name (SkyPilot's own recovery for an INIT cluster,
        a fresh one for a vanished one); its slot's next trials wait for it."""
        with self._lock:
            if self._closing or cluster.state != "up":
                return
            cluster.state, cluster.reason = "launching", why
            cluster.ready.clear()
            if cluster.attempts >= self.launch_attempts:
                cluster.state = "dropped"
                cluster.ready.set()
                log.warning("cluster %s dropped: no launch attempts left", cluster.name)
                return
        threading.Thread(target=self._bring_up, args=(cluster,), daemon=True, name=f"sky-up-{cluster.name}").start()

    def _finish(self, run: _Run, result: Result) -> None:
        """What the pool alone knows: the cluster's accelerator, host and price, the job, when it
        started (the loop stamps slot, device kind and queue time)."""
        slot = run.cluster.slot
        if slot is not None:
            result.extra.update({"cluster": slot.name, "accelerator": slot.info["accelerator"],
                                 "cluster_host": slot.info["host"], "usd_per_hour": slot.info["usd_per_hour"]})
        if run.job_id is not None:
            result.extra["sky_job_id"] = run.job_id
        if run.started is not None:
            result.started_at = run.started
        with self._lock:
            self._runs.pop(run.trial.trial_id, None)
        self._results.put((run.trial.trial_id, result))

    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        out = []
        try:
            out.append(self._results.get(timeout=max(0.0, timeout)))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return out

    def cancel(self, trial_id: str) -> None:
        with self._lock:
            run = self._runs.get(trial_id)
        if run is not None:
            run.cancel.set()

    def close(self, cancel_running: bool = True) -> None:
        with self._lock:
            self._closing = True
            runs = list(self._runs.values())
        if cancel_running:
            for run in runs:
                run.cancel.set()
            deadline = time.time() + 120
            while self._runs and time.time() < deadline:
                time.sleep(0.5)
        sky = _sky()
        for c in self._clusters:  # a relaunch still in flight would otherwise outlive the study
            if c.request is not None:
                try:
                    sky.get(sky.api_cancel(c.request, silent=True))
                except Exception as e:  # noqa: BLE001
                    log.warning("cancelling the launch of %s: %s", c.name, one_line(e))
        names = [c.name for c in self._clusters if c.state != "dropped"]
        if self.keep_pool or (runs and not cancel_running):  # trials left running need their clusters
            kept = [c.slot for c in self._clusters if c.state == "up" and c.slot]
            total = sum(s.info["usd_per_hour"] for s in kept)
            print(f"SkyPilot pool kept ({len(kept)} clusters, ${total:.2f}/h in all): " + ", ".join(
                f"{s.name} [{s.device_kind} on {s.info['infra']}, ${s.info['usd_per_hour']:.2f}/h]" for s in kept)
                + "; tear down with: sky down " + " ".join(s.name for s in kept))
        else:
            self._down(names)

    def _down(self, names: list[str], quiet: bool = False) -> None:
        """Tear clusters down in parallel (one request each, then wait for all)."""
        if not names:
            return
        sky = _sky()
        requests = {}
        for name in names:
            try:
                requests[name] = sky.down(name)
            except Exception as e:  # noqa: BLE001
                if not quiet:
                    log.warning("sky down %s: %s", name, one_line(e))
        for name, request in requests.items():
            try:
                sky.get(request)
                if not quiet:
                    log.info("cluster %s torn down", name)
            except Exception as e:  # noqa: BLE001 - already gone is fine
                if not quiet and "does not exist" not in str(e):
                    log.warning("sky down %s: %s", name, one_line(e))

    # --- tasks ----------------------------------------------------------------------------------

    def _resources(self):
        sky = _sky()
        common = dict(infra=self.infra, cpus=self.cpus, memory=self.memory, use_spot=self.use_spot)
        common = {k: v for k, v in common.items() if v not in (None, False)}
        if not self.accelerators:
            return {sky.Resources(**common)}
        return {sky.Resources(accelerators={name: count}, **common) for name, count in self.accelerators.items()}

    def _resources_text(self) -> str:
        accs = " or ".join(f"{n}:{c}" for n, c in self.accelerators.items()) or "CPU only"
        return f"{accs} on {self.infra or 'any enabled infra'}"

    def _setup_task(self):
        sky = _sky()
        task = sky.Task(name=f"{self.prefix}-setup", setup=self.setup or None,
                        file_mounts={f"{REMOTE_PROJECT}/train": str(PROJECT_ROOT / "train")})
        task.set_resources(self._resources())
        return task

    def _run_command(self) -> str:
        files = " ".join(FETCHED)
        return (f"cd {REMOTE_PROJECT} && {self.python} -m train.harness {REMOTE_WORKDIR}\n"
                f"for f in {files}; do [ -f {REMOTE_WORKDIR}/$f ] && "
                f"gzip -c {REMOTE_WORKDIR}/$f | base64 -w 2000 | sed \"s|^|{FILE_MARK} $f |\"; done\n"
                "true\n")

    def _exec_task(self, trial: Trial, workdir: Path, slot: Slot):
        sky = _sky()
        task = sky.Task(name=trial.trial_id, workdir=str(workdir), run=self._run_command())
        if slot.info.get("accelerator"):  # the job must ask for the GPU to be given it
            task.set_resources(sky.Resources(accelerators={slot.info["accelerator"]: slot.info["accelerator_count"]}))
        return task

    def _task_yaml(self, trial: Trial, workdir: Path) -> str:
        task = self._setup_task()
        task.name = trial.trial_id
        task.workdir = str(workdir)
        task.run = self._run_command()
        config = task.to_yaml_config()
        header = (f"# Trial {trial.trial_id} as a standalone SkyPilot task; rerun it with\n"
                  f"#   sky launch -c <cluster> {Path(trial.directory) / 'sky_task.yaml'}\n"
                  f"# (the study ran it with sky.exec on a cluster of its pool, launched with this setup;\n"
                  f"# the {FILE_MARK} lines carry {RESULT_FILE} and {LOG_FILE} back in the job's log).\n")
        return header + yaml.safe_dump(config, sort_keys=False, width=1000)


def _parse_accelerators(spec: Any) -> dict[str, int]:
    """{H100: 1, H200: 1}, "H100:1", ["H100:1", "H200:1"] or null -> {name: count}."""
    if spec in (None, "", {}, []):
        return {}
    if hasattr(spec, "items"):
        items = list(spec.items())
    else:
        parts = [spec] if isinstance(spec, str) else list(spec)
        items = [(p.split(":")[0], p.split(":")[1] if ":" in p else 1) for p in (str(x) for x in parts)]
    try:
        out = {str(name).strip(): int(count) for name, count in items}
    except (TypeError, ValueError):
        raise LauncherError(f"accelerators must look like {{H100: 1, H200: 1}}, got {spec!r}") from None
    if any(c < 1 for c in out.values()) or any(not n for n in out):
        raise LauncherError(f"accelerators must look like {{H100: 1, H200: 1}}, got {spec!r}")
    return out


def _is_unavailable(error: Exception) -> bool:
    return type(error).__name__ in ("ResourcesUnavailableError", "ResourcesMismatchError", "InvalidSkyPilotConfigError")


def _decode_files(logs: str) -> dict[str, bytes]:
    """Rebuild the files the job printed as ARENA-FILE lines; a file cut short is left out."""
    chunks: dict[str, list[str]] = {}
    for line in logs.splitlines():
        m = _FILE_LINE.search(line)
        if m:
            chunks.setdefault(m.group(1), []).append(m.group(2))
    out = {}
    for name, parts in chunks.items():
        try:
            out[name] = gzip.decompress(base64.b64decode("".join(parts)))
        except (ValueError, OSError, EOFError):
            log.warning("%s came back incomplete from the job log; ignoring it", name)
    return out
