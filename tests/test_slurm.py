"""The Slurm launcher against a real Slurm cluster: the one scripts/slurm_up.sh starts on 127.0.0.1.

Launcher-level tests build trial dirs themselves (tiny train.py, trial.json) and submit them;
study-level tests run `python run.py launcher=slurm` as a user would. Without a cluster
(`sinfo` missing or SLURM_CONF unset) they skip, unless ARENA_REQUIRE_SLURM=1 (CI) makes that a
failure. Some tests break the cluster on purpose (a node set DOWN, the controller killed) and put
it back; they touch every job on it, so run them on a cluster of your own.
"""
from __future__ import annotations

import getpass
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from launchers.slurm import SlurmLauncher
from study.core import LauncherError
from study.records import Candidate, Trial
from tests.conftest import ROOT, TINY, make_trial, sqlite_uri, tiny_source

HANG_GUARD_S = 300  # a launcher that never answers fails the test instead of hanging CI
RUN = uuid.uuid4().hex[:6]  # in job names: accounting remembers the jobs of earlier test runs


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """The cluster SLURM_CONF points at, or a skip (a failure under ARENA_REQUIRE_SLURM)."""
    if shutil.which("sinfo") is None:
        why = "sinfo is not on PATH: run scripts/install_slurm.sh"
    elif not os.environ.get("SLURM_CONF"):
        why = 'SLURM_CONF is unset: start a cluster with eval "$(scripts/slurm_up.sh)"'
    else:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
        why = None if proc.returncode == 0 else f"no Slurm cluster answers at SLURM_CONF: {proc.stderr.strip()}"
    if why:
        if os.environ.get("ARENA_REQUIRE_SLURM"):
            pytest.fail(f"ARENA_REQUIRE_SLURM is set but {why}", pytrace=False)
        pytest.skip(why)
    return Path(os.environ["SLURM_CONF"]).parent


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(tmp_path):
    """A failed test must not leave sleeping jobs that hold the cluster's CPUs for the next ones."""
    yield
    ids = [entry["job_id"] for registry in tmp_path.glob("**/slurm/jobs.json")
           for entry in json.loads(registry.read_text()).values()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def sleeping(seconds: float) -> str:
    return f"import time\ntime.sleep({seconds})"


def new_launcher(study_dir: Path, **kw) -> SlurmLauncher:
    kw = {"slots": 2, "hard_limit_s": 60, "poll_interval_s": 0.5, "folder": str(study_dir / "slurm"),
          "job_name": f"test-{RUN}-{study_dir.parent.name}-{study_dir.name}", **kw}
    launcher = SlurmLauncher(**kw)
    launcher.start()
    return launcher


def collect(launcher: SlurmLauncher, n: int, results: dict | None = None) -> dict:
    results = {} if results is None else results
    deadline = time.time() + HANG_GUARD_S
    while len(results) < n:
        if time.time() > deadline:
            raise RuntimeError(f"hung: {len(results)} of {n} results after {HANG_GUARD_S} s: {sorted(results)}")
        results.update(launcher.wait(2.0))
    return results


def job_id(study_dir: Path, trial: Trial) -> str:
    return json.loads((study_dir / "slurm" / "jobs.json").read_text())[trial.trial_id]["job_id"]


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.strip()


def jobs_named(job_name: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-3hours", "--name", job_name],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def wait_for(what: str, predicate) -> None:
    deadline = time.time() + HANG_GUARD_S
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError(f"hung waiting for {what}")
        time.sleep(0.5)


def skip_if_others_use_the_cluster(*launchers: SlurmLauncher) -> None:
    """Tests that fail a node or stop the controller hit every job on the cluster: not while
    other people's jobs run there (a shared development cluster). CI (ARENA_REQUIRE_SLURM) has
    the cluster to itself and never skips."""
    if os.environ.get("ARENA_REQUIRE_SLURM"):
        return
    users = subprocess.run(["squeue", "-h", "-o", "%u"], capture_output=True, text=True).stdout.split()
    others = sorted(set(users) - {getpass.getuser()})
    if others:
        for launcher in launchers:
            launcher.close()
        pytest.skip(f"jobs of {', '.join(others)} run on this cluster; not failing it under them")


def training(trial: Trial) -> bool:
    """The harness started the trial's worker: train.py is running."""
    log = Path(trial.directory) / "run.log"
    return log.exists() and "worker:" in log.read_text()


# -- launcher level -------------------------------------------------------------------------------


def test_bad_config_fails_with_one_line_before_anything_is_submitted(tmp_path, monkeypatch, slurm_cluster):
    study = tmp_path / "study"
    shared = tmp_path / "shared"
    shared.mkdir()
    cases = {
        "unknown Slurm partition 'no-such-partition'": dict(partition="no-such-partition"),
        "is not a directory": dict(shared_dir=str(tmp_path / "missing")),
        "is not under launcher.shared_dir": dict(shared_dir=str(shared)),
        "Slurm rejects the job request": dict(cpus_per_trial=4096),
    }
    for expected, kw in cases.items():
        with pytest.raises(LauncherError, match=expected) as e:
            new_launcher(study, **kw)
        assert "\n" not in str(e.value)
    new_launcher(shared / "study", shared_dir=str(shared))  # under the shared dir: accepted

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)
        with pytest.raises(LauncherError, match="submitit is not installed"):
            new_launcher(study)
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))
        with pytest.raises(LauncherError, match="Slurm commands not found on PATH: sbatch"):
            new_launcher(study)
    with monkeypatch.context() as m:
        m.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
        with pytest.raises(LauncherError, match="no-such-slurm.conf does not exist"):
            new_launcher(study)
    nobody_listens = tmp_path / "slurm.conf"
    nobody_listens.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1",
                                     (slurm_cluster / "slurm.conf").read_text()))
    with monkeypatch.context() as m:
        m.setenv("SLURM_CONF", str(nobody_listens))
        with pytest.raises(LauncherError, match="no Slurm cluster reachable"):
            new_launcher(study)
    assert not (study / "slurm" / "jobs.json").exists()


def test_trials_run_as_slurm_jobs_with_host_device_and_queue_time(tmp_path, objective, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-must-not-travel")
    study = tmp_path / "study"
    launcher = new_launcher(study)
    env_dump = "import os\nprint('ENV', ' '.join(sorted(os.environ)), flush=True)"  # the sandbox lets it write run.log only
    trials = [make_trial(study, i, objective, tiny_source(objective, env_dump)) for i in range(2)]
    for trial, slot in zip(trials, launcher.slots()):
        launcher.submit(trial, slot)
    results = collect(launcher, 2)

    for trial, slot in zip(trials, launcher.slots()):
        r = results[trial.trial_id]
        assert r.status == "ok", (r.reason, r.error)
        assert math.isfinite(r.val_bpb) and r.num_steps == objective["budget"]
        assert r.device == "cpu" and r.host == socket.gethostname()  # slot and device kind: the loop's
        assert r.started_at <= r.finished_at
        assert r.extra["slurm_job_id"] == job_id(study, trial)
        wait_for("accounting", lambda: sacct_state(job_id(study, trial)) == "COMPLETED")
        env = next(line for line in (Path(trial.directory) / "run.log").read_text().splitlines()
                   if line.startswith("ENV ")).split()
        assert "PATH" in env and "ANTHROPIC_API_KEY" not in env
        assert (Path(trial.directory) / "run.log").exists()


def test_scancel_by_a_user_and_cancel_by_the_study_are_cancelled(tmp_path, objective):
    study = tmp_path / "study"
    launcher = new_launcher(study)
    trials = [make_trial(study, i, objective, tiny_source(objective, sleeping(300))) for i in range(2)]
    for trial, slot in zip(trials, launcher.slots()):
        launcher.submit(trial, slot)
    wait_for("trial 0 to train", lambda: training(trials[0]))
    subprocess.run(["scancel", job_id(study, trials[0])], check=True)
    launcher.cancel(trials[1].trial_id)
    results = collect(launcher, 2)

    by_user, by_study = results[trials[0].trial_id], results[trials[1].trial_id]
    assert by_user.status == "cancelled" and "CANCELLED by" in by_user.reason
    assert by_user.started_at is not None
    assert by_study.status == "cancelled" and "by the study" in by_study.reason
    for trial in trials:
        assert sacct_state(job_id(study, trial)).startswith("CANCELLED")


@pytest.mark.slow
def test_the_harness_limit_and_the_slurm_time_limit_both_give_timeout(tmp_path, objective):
    study = tmp_path / "study"
    launcher = new_launcher(study, time_limit_min=1)  # Slurm's limit: 1 min, checked every ~30 s
    harness_limited = make_trial(study, 0, objective, tiny_source(objective, sleeping(300)), hard_limit_s=5)
    slurm_limited = make_trial(study, 1, objective, tiny_source(objective, sleeping(300)), hard_limit_s=600)
    for trial, slot in zip((harness_limited, slurm_limited), launcher.slots()):
        launcher.submit(trial, slot)
    results = collect(launcher, 2)

    r = results[harness_limited.trial_id]
    assert r.status == "timeout" and "hard limit of 5 s" in r.error
    r = results[slurm_limited.trial_id]
    assert r.status == "timeout" and "killed by Slurm at its time limit" in r.reason
    assert sacct_state(job_id(study, slurm_limited)) == "TIMEOUT"


def test_resumed_launcher_adopts_jobs_instead_of_resubmitting(tmp_path, objective):
    study = tmp_path / "study"
    first = new_launcher(study)
    running = make_trial(study, 0, objective, tiny_source(objective, sleeping(5)))
    first.submit(running, first.slots()[0])
    wait_for("trial 0 to train", lambda: training(running))
    job = job_id(study, running)
    del first  # the orchestrator dies: no close(), the job keeps running

    second = new_launcher(study)
    never_submitted = make_trial(study, 1, objective, tiny_source(objective))
    assert second.adopt(running, second.slots()[0])
    assert not second.adopt(never_submitted, second.slots()[1])
    results = collect(second, 1)

    assert results[running.trial_id].status == "ok"
    assert results[running.trial_id].extra["slurm_job_id"] == job
    assert jobs_named(f"{second.job_name}-t0000") == [job], "the trial was submitted again"


def test_adopt_refuses_a_job_id_slurm_gave_to_another_job(tmp_path, objective):
    """After a wiped Slurm state job ids restart at 1: the id in jobs.json may be someone else's."""
    study = tmp_path / "study"
    other = subprocess.run(["sbatch", "--parsable", "--job-name", "someone-else", "--output", "/dev/null",
                            "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip()
    launcher = new_launcher(study)
    trial = make_trial(study, 0, objective, tiny_source(objective))
    (study / "slurm" / "jobs.json").write_text(json.dumps({trial.trial_id: {
        "job_id": other, "name": f"{launcher.job_name}-{trial.trial_id}", "folder": str(study / "slurm"),
        "submitted": time.time()}}))
    assert not launcher.adopt(trial, launcher.slots()[0])


def test_close_cancels_queued_and_running_jobs_unless_told_to_leave_them(tmp_path, objective):
    study = tmp_path / "study"
    launcher = new_launcher(study, slots=3)
    trials = [make_trial(study, i, objective, tiny_source(objective, sleeping(300))) for i in range(3)]
    for trial, slot in zip(trials, launcher.slots()):
        launcher.submit(trial, slot)
    launcher.close()
    for trial in trials:
        wait_for(f"{trial.trial_id} cancelled", lambda: sacct_state(job_id(study, trial)).startswith("CANCELLED"))

    kept = tmp_path / "kept"
    launcher = new_launcher(kept, cancel_on_close=False)
    trial = make_trial(kept, 0, objective, tiny_source(objective, sleeping(300)))
    launcher.submit(trial, launcher.slots()[0])
    launcher.close()
    try:
        state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id(kept, trial)], capture_output=True,
                               text=True).stdout.strip()
        assert state in ("PENDING", "RUNNING")
    finally:
        subprocess.run(["scancel", job_id(kept, trial)])


@pytest.mark.slow
def test_a_failed_node_loses_its_jobs_and_requeue_runs_them_once_more(tmp_path, objective):
    skip_if_others_use_the_cluster()
    mark = tmp_path / "attempt1"  # outside the sandbox's scratch: only an unsandboxed trial can leave it
    fail_once = f"import os, time\nif not os.path.exists({str(mark)!r}):\n    open({str(mark)!r}, 'w').close()\n    time.sleep(300)"
    lossy = new_launcher(tmp_path / "lossy")
    requeuing = new_launcher(tmp_path / "requeuing", requeue_on_lost=True)
    lost = make_trial(tmp_path / "lossy", 0, objective, tiny_source(objective, sleeping(300)), hard_limit_s=600)
    again = make_trial(tmp_path / "requeuing", 1, objective, tiny_source(objective, fail_once), hard_limit_s=600,
                       sandbox="none")
    lossy.submit(lost, lossy.slots()[0])
    requeuing.submit(again, requeuing.slots()[0])
    wait_for("both trials to train", lambda: training(lost) and training(again))
    first_job = job_id(tmp_path / "requeuing", again)
    skip_if_others_use_the_cluster(lossy, requeuing)
    subprocess.run(["scontrol", "update", "nodename=localhost", "state=down", "reason=arena-test"], check=True)
    results: dict = {}
    try:
        collect(lossy, 1, results)
        # the lost job is resubmitted at once, and waits for the node to come back
        wait_for("the requeue", lambda: results.update(requeuing.wait(0.5)) or job_id(tmp_path / "requeuing", again) != first_job)
    finally:  # slurmd answering, the node may be back by itself (ReturnToService=2)
        subprocess.run(["scontrol", "update", "nodename=localhost", "state=resume"], capture_output=True)
    collect(requeuing, 2, results)

    r = results[lost.trial_id]
    assert r.status == "lost" and "NODE_FAIL" in r.reason
    r = results[again.trial_id]
    assert r.status == "ok", (r.reason, r.error)
    assert r.reason.startswith(f"requeued once after Slurm job {first_job} NODE_FAIL")
    assert sacct_state(first_job) == "NODE_FAIL"


def test_a_job_whose_controller_stops_answering_is_lost_not_waited_on_forever(tmp_path, objective, slurm_cluster):
    skip_if_others_use_the_cluster()
    study = tmp_path / "study"
    launcher = new_launcher(study, forget_after_s=5)
    trial = make_trial(study, 0, objective, tiny_source(objective, sleeping(300)), hard_limit_s=600)
    launcher.submit(trial, launcher.slots()[0])
    wait_for("the trial to train", lambda: training(trial))
    skip_if_others_use_the_cluster(launcher)
    pid = int((slurm_cluster / "run" / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        results = collect(launcher, 1)
    finally:
        up = subprocess.run([str(ROOT / "scripts" / "slurm_up.sh")], capture_output=True, text=True,
                            env={**os.environ, "SLURM_ROOT": str(slurm_cluster)})
        subprocess.run(["scancel", job_id(study, trial)])
    assert up.returncode == 0, up.stderr
    r = results[trial.trial_id]
    assert r.status == "lost" and "slurmctld does not answer" in r.reason


# -- study level: python run.py launcher=slurm ----------------------------------------------------


def study_command(workdir: Path, name: str, hook: str, *extra: str) -> list[str]:
    """A 4-trial grid study on 2 Slurm slots, its train.py running `hook` at the start of train().

    No cell is the baseline's own knobs (tiny's DEPTH 1, MATRIX_LR 0.04): a hooked cell that is the
    baseline byte for byte and times out would stop the study (study/baseline.py)."""
    baseline = workdir / "baseline_train.py"
    source = (ROOT / "train" / "train.py").read_text()
    baseline.write_text(source.replace("def train(model, run):\n", "def train(model, run):\n    _test_hook()\n", 1)
                        + "\n\ndef _test_hook():\n" + "".join(f"    {line}\n" for line in hook.splitlines()))
    return [sys.executable, str(ROOT / "run.py"), *TINY, "launcher=slurm", "launcher.slots=2",
            "launcher.poll_interval_s=1", "~space", "searcher=grid", "~searcher.levels",
            "+searcher.levels={DEPTH:[1,2],MATRIX_LR:[0.02,0.03]}", "study.max_trials=4", f"study.name={name}",
            f"study.baseline={baseline}", f"mlflow.tracking_uri={sqlite_uri(workdir)}",
            f"hydra.run.dir={workdir}/outputs/run", *extra]


def start_study(workdir: Path, command: list[str]) -> subprocess.Popen:
    log = open(workdir / "run.log", "ab")
    return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, workdir: Path) -> None:
    try:
        code = proc.wait(HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("hung: run.py did not finish")
    assert code == 0, (workdir / "run.log").read_text()[-4000:]


def study_trial(workdir: Path, name: str, trial_id: str) -> Trial:
    return Trial(trial_id=trial_id, index=0, candidate=Candidate(source=""), objective={},
                 directory=str(workdir / "studies" / name / "trials" / trial_id))


def trial_runs(workdir: Path, name: str) -> dict:
    import mlflow

    runs = mlflow.search_runs(experiment_names=["autoresearch-arena"], output_format="list",
                              filter_string="tags.`arena.kind` = 'trial'")
    runs = [r for r in runs if r.data.tags.get("arena.study_id", "").startswith(name)]
    ids = [r.data.tags["arena.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"more than one MLflow run for a trial: {sorted(ids)}"
    return {r.data.tags["arena.trial_id"]: r for r in runs}


@pytest.mark.slow
def test_study_on_slurm_with_a_scancel_and_a_trial_past_its_time_limit(tmp_path, objective, monkeypatch):
    name = f"slurm-faults-{RUN}"
    hook = ("import json, time\n"
            "if json.load(open(__file__.replace('train.py', 'trial.json')))['trial_id'] in ('t0001', 't0002'):\n"
            "    time.sleep(600)")
    proc = start_study(tmp_path, study_command(tmp_path, name, hook, "objective.hard_limit_s=25"))
    study = tmp_path / "studies" / name
    to_cancel = study_trial(tmp_path, name, "t0001")
    wait_for("t0001 to train", lambda: proc.poll() is None and training(to_cancel))
    subprocess.run(["scancel", job_id(study, to_cancel)], check=True)
    finish(proc, tmp_path)

    from study.journal import JournalState

    results = JournalState.load(study / "journal.jsonl").results
    # A user's scancel is not a measurement: the attempt is journalled as cancelled (by whom) and the
    # trial runs again in this session, where the hook keeps it sleeping past its hard limit.
    records = [json.loads(line) for line in (study / "journal.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["event"] == "finished" and r["trial_id"] == "t0001")
    assert first["result"]["status"] == "cancelled" and "CANCELLED by" in first["result"]["reason"]
    assert {t: r.status for t, r in results.items()} == {
        "t0000": "ok", "t0001": "timeout", "t0002": "timeout", "t0003": "ok"}
    assert "hard limit of 25 s" in results["t0002"].error
    in_flight, most = 0, 0
    for line in (study / "journal.jsonl").read_text().splitlines():
        in_flight += {"submitted": 1, "finished": -1}.get(json.loads(line)["event"], 0)
        most = max(most, in_flight)
    assert most == 2 and {r.slot for r in results.values()} == {"slurm0", "slurm1"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    runs = trial_runs(tmp_path, name)
    assert sorted(runs) == sorted(results)
    for trial_id, run in runs.items():
        assert run.data.tags["status"] == results[trial_id].status
        assert "queue_seconds" in run.data.tags and run.data.tags["device_kind"] == "cpu"  # a tag: one value, no chart


@pytest.mark.slow
def test_study_killed_and_resumed_adopts_its_running_jobs(tmp_path, objective, monkeypatch):
    name = f"slurm-resume-{RUN}"
    command = study_command(tmp_path, name, "import time\ntime.sleep(10)")
    proc = start_study(tmp_path, command)
    first_wave = [study_trial(tmp_path, name, t) for t in ("t0000", "t0001")]
    wait_for("two trials to train", lambda: proc.poll() is None and all(training(t) for t in first_wave))
    proc.kill()  # kill -9: no close(), no cancel; the jobs keep running under Slurm
    proc.wait()
    in_flight = [subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id(tmp_path / "studies" / name, t)],
                                capture_output=True, text=True).stdout.strip() for t in first_wave]
    assert in_flight == ["RUNNING", "RUNNING"]

    finish(start_study(tmp_path, command), tmp_path)

    from study.journal import JournalState

    study = tmp_path / "studies" / name
    results = JournalState.load(study / "journal.jsonl").results
    assert sorted(results) == ["t0000", "t0001", "t0002", "t0003"]
    assert all(r.status == "ok" for r in results.values()), {t: r.reason for t, r in results.items()}
    events = [json.loads(line) for line in (study / "journal.jsonl").read_text().splitlines()]
    assert sorted(e["trial_id"] for e in events if e["event"] == "adopted") == ["t0000", "t0001"]
    job_name = f"arena-{name}"
    for trial_id in results:
        assert len(jobs_named(f"{job_name}-{trial_id}")) == 1, f"{trial_id} was submitted more than once"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    assert sorted(trial_runs(tmp_path, name)) == sorted(results)
