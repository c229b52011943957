"""A study survives what its operator does: each test injects the real fault (a second process, a
read-only or full filesystem, a kill -9 in the fork window, a damaged journal, Ctrl-C) and checks
that nothing finished is lost or recorded twice and that nothing is blamed on a candidate."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from study.journal import Journal, JournalDamaged, JournalState, encode
from tests.conftest import ROOT, TINY, run_arena, sqlite_uri


def start(workdir: Path, *overrides: str, driver: str | None = None) -> subprocess.Popen:
    """`python run.py overrides...` in the background (or `driver`, a script that wraps it)."""
    script = driver or str(ROOT / "run.py")
    return subprocess.Popen([sys.executable, script, *overrides, f"hydra.run.dir={workdir}/outputs/run"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def journal_of(workdir: Path, name: str) -> Path:
    return workdir / "studies" / name / "journal.jsonl"


def safe_state(path: Path) -> JournalState:
    """The journal as a reader sees it while the study writes it."""
    try:
        return JournalState.load(path)
    except JournalDamaged:
        return JournalState()


def parents_and_children(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return ([r for r in runs if r.data.tags.get("arena.kind") == "study"],
            [r for r in runs if r.data.tags.get("arena.kind") == "trial"])


def measured_once(js: JournalState, n: int) -> None:
    """Exactly `n` measured trials, none in flight or waiting for a re-run, and no candidate measured
    under two ids."""
    assert len(js.results) == n and not js.in_flight() and not js.to_rerun(), (
        len(js.results), [t.trial_id for t in js.in_flight()], [t.trial_id for t in js.to_rerun()])
    assert all(r.status not in ("cancelled", "lost") for r in js.results.values())


# -- 6. the journal tells damage from absence ---------------------------------------------------------
def test_a_torn_last_line_is_repaired_silently_and_nothing_else_is_lost(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for i in range(3):
        journal.append("submitted", n=i)
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole + encode({"event": "finished", "n": 9})[:25])  # a kill mid-write
    assert [r["n"] for r in Journal.read(path)] == [0, 1, 2]
    Journal(path).close()  # opening to append repairs the tail
    assert path.read_bytes() == whole


@pytest.mark.parametrize("line, how", [(2, "flip"), (4, "flip"), (3, "blank")])
def test_damage_anywhere_but_a_torn_tail_names_its_line(tmp_path, line, how):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for i in range(5):
        journal.append("submitted", n=i)
    journal.close()
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b'"n": ', b'"n": 1') if how == "flip" else b""
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalDamaged, match=f"line {line} is damaged"):
        Journal.read(path)


def test_a_journal_from_before_checksums_still_resumes(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(json.dumps({"event": "submitted", "n": i}) + "\n" for i in range(2)))
    journal = Journal(path)
    journal.append("submitted", n=2)
    journal.close()
    assert [r["n"] for r in Journal.read(path)] == [0, 1, 2]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A real two-trial study, finished; each test damages a copy of it."""
    workdir = tmp_path_factory.mktemp("journal")
    run_arena(workdir, *TINY, "launcher.slots=1", "study.max_trials=2", f"mlflow.tracking_uri={sqlite_uri(workdir)}")
    return workdir


@pytest.mark.parametrize("target", ["study", "first submitted", "last submitted"])
def test_a_damaged_journal_stops_the_resume_in_one_line_and_reuses_no_id(finished_study, tmp_path, target):
    subprocess.run(["cp", "-a", f"{finished_study}/.", str(tmp_path)], check=True)
    path = journal_of(tmp_path, "tpe-local-tiny-s0")
    lines = path.read_bytes().split(b"\n")
    kinds = [json.loads(line)["event"] if line else None for line in lines]
    index = {"study": 0, "first submitted": kinds.index("submitted"),
             "last submitted": len(kinds) - 1 - kinds[::-1].index("submitted")}[target]
    lines[index] = lines[index].replace(b'"wall_time": 1', b'"wall_time": 2', 1)
    path.write_bytes(b"\n".join(lines))
    before = path.read_bytes()
    trials_before = sorted(p.name for p in (path.parent / "trials").iterdir())

    proc = run_arena(tmp_path, *TINY, "launcher.slots=1", "study.max_trials=4",
                     f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", check=False, timeout=180)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"line {index + 1} is damaged" in error[0], proc.stderr[-2000:]
    assert path.read_bytes() == before, "a damaged journal must not be written to"
    assert sorted(p.name for p in (path.parent / "trials").iterdir()) == trials_before
    parents, _ = parents_and_children(sqlite_uri(tmp_path))
    assert len(parents) == 1, "a damaged header must not start a second study"


# -- 2. one owner per study ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_copy_refuses_naming_the_owner_and_a_dead_owner_never_blocks(tmp_path):
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "objective.budget=30", "objective.hard_limit_s=900", "launcher.slots=2",
            "study.max_trials=5", f"mlflow.tracking_uri={uri}"]
    path = journal_of(tmp_path, "tpe-local-tiny-s0")
    first, second = start(tmp_path, *args), start(tmp_path, *args)  # at the same instant
    try:
        refused = None
        deadline = time.time() + 180
        while refused is None and time.time() < deadline:
            refused = next((p for p in (first, second) if p.poll() is not None), None)
            time.sleep(0.1)
        assert refused is not None, "one of two copies started at once must refuse"
        owner = second if refused is first else first
        err = refused.stderr.read()
        assert refused.returncode == 2, err[-2000:]
        assert f"host {socket.gethostname()}, pid {owner.pid}" in err and "in use by another run" in err, err
        wait_for(lambda: len(safe_state(path).results) >= 2 and safe_state(path).in_flight(), 600,
                 "two results and a trial in flight")
        # A third copy, started mid-study (the owner paused, so it cannot finish meanwhile), refuses
        # too and changes nothing.
        os.kill(owner.pid, signal.SIGSTOP)
        before = path.read_bytes()
        late = run_arena(tmp_path, *args, check=False, timeout=600)
        assert late.returncode == 2 and f"pid {owner.pid}" in late.stderr, late.stderr[-2000:]
        assert path.read_bytes() == before
        os.kill(owner.pid, signal.SIGKILL)  # the owner dies: its lock goes with it
        owner.wait()
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    run_arena(tmp_path, *args, timeout=900)  # a stale lock file does not block the resume
    js = JournalState.load(path)
    measured_once(js, 5)
    starts = Counter(e["trial"]["trial_id"] for e in Journal.read(path) if e["event"] == "submitted")
    assert max(starts.values()) <= 2  # at most: the first run, then a re-run of what was in flight
    _, children = parents_and_children(uri)
    assert sorted(c.data.tags["arena.trial_id"] for c in children) == sorted(js.results)


def test_a_copy_that_loses_the_race_for_a_new_folder_leaves_the_owners_lock_alone(tmp_path, monkeypatch):
    """Two copies started at once both see no folder; the loser must not clean up "its" new folder,
    which is the owner's: deleting owner.lock let a third copy in beside the live owner."""
    import study.runner as runner
    from study.lock import StudyLock, StudyLocked
    from study.runner import ConfigError, _owned

    study_dir = tmp_path / "studies" / "s"
    hold = (f"import pathlib, time\nfrom study.lock import StudyLock\n"
            f"pathlib.Path({str(study_dir)!r}).mkdir(parents=True)\n"
            f"lock = StudyLock({str(study_dir)!r}).acquire()\nprint('owned', flush=True)\ntime.sleep(120)")
    owner, loser = None, StudyLock(study_dir)
    own = runner._own

    def owner_first(*args):  # the loser saw no folder and no database; the owner makes and locks it now
        nonlocal owner
        owner = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert owner.stdout.readline().strip() == "owned"
        own(*args)

    monkeypatch.setattr(runner, "_own", owner_first)
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            with _owned(study_dir, sqlite_uri(tmp_path), loser):
                pass
        assert (study_dir / "owner.lock").exists(), "the loser removed the owner's folder"
        with pytest.raises(StudyLocked, match=f"pid {owner.pid}"):
            StudyLock(study_dir).acquire()
    finally:
        if owner:
            owner.kill()
            owner.wait()


def test_a_copy_started_as_the_owner_takes_the_lock_still_names_it(tmp_path):
    """The owner writes its name just after it locks; a refusal in between waits for the name."""
    from study.lock import StudyLock, StudyLocked

    hold = ("import fcntl, json, os, socket, sys, time\n"
            f"fd = os.open({str(tmp_path / 'owner.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(0.5)\n"
            "os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': 'now'}).encode(), 0)\n"
            "time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(StudyLocked, match=f"host {socket.gethostname()}, pid {owner.pid}"):
            StudyLock(tmp_path).acquire()
    finally:
        owner.kill()
        owner.wait()


# -- 3. Ctrl-C: a cancelled trial is run again and is not a measurement -------------------------------
@pytest.mark.slow
def test_a_trial_cancelled_by_ctrl_c_runs_again_on_resume(tmp_path):
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "searcher=grid", "objective.budget=30", "objective.hard_limit_s=900", "launcher.slots=1", "study.max_trials=3",
            f"mlflow.tracking_uri={uri}"]
    path = journal_of(tmp_path, "grid-local-tiny-s0")
    orchestrator = start(tmp_path, *args)
    wait_for(lambda: len(safe_state(path).results) >= 1 and safe_state(path).in_flight(), 600,
             "a result and a trial in flight")
    cancelled = safe_state(path).in_flight()[0]
    orchestrator.send_signal(signal.SIGINT)
    orchestrator.communicate(timeout=120)
    js = JournalState.load(path)
    assert [t.trial_id for t in js.to_rerun()] == [cancelled.trial_id]
    assert cancelled.trial_id not in js.results, "a cancelled trial is not a measurement"

    run_arena(tmp_path, *args, timeout=900)
    js = JournalState.load(path)
    measured_once(js, 3)
    rerun = js.trials[cancelled.trial_id]
    assert rerun.attempt == 2 and Path(rerun.directory).name == f"{cancelled.trial_id}-a2"
    assert rerun.candidate.knobs == cancelled.candidate.knobs, "the grid cell itself is measured"
    assert len({json.dumps(t.candidate.knobs, sort_keys=True) for t, _ in js.finished()}) == 3
    _, children = parents_and_children(uri)
    assert sorted(c.data.tags["arena.trial_id"] for c in children) == sorted(js.results)


# -- 1. a resumed sampler continues its stream ------------------------------------------------------
@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_a_resumed_sampler_proposes_what_the_uninterrupted_one_would(tmp_path, sampler):
    from searchers.optuna_search import OptunaSearcher
    from study.core import SearchContext
    from study.records import Result, Trial
    from train.knobs import read_knobs

    baseline = (ROOT / "train" / "train.py").read_text()
    knobs = read_knobs(baseline)
    space = {"MATRIX_LR": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
             "WARMDOWN_RATIO": {"type": "float", "low": 0.1, "high": 0.9}}

    def proposals(study_dir: Path, stops: list[int]) -> list[dict]:
        """Ask one at a time, telling each result, with a fresh searcher (a restart) at each stop."""
        out, told = [], []
        for n in stops:
            searcher = OptunaSearcher(name=sampler, sampler=sampler, options={"n_startup_trials": 2}
                                      if sampler != "random" else {})
            ctx = SearchContext(baseline_source=baseline, baseline_knobs=knobs, space=space, seed=0,
                                study_dir=str(study_dir), objective={})
            searcher.setup(ctx)
            for trial, result in told:  # the loop's journal replay
                searcher.tell(trial, result)
            while len(out) < n:
                [cand] = searcher.ask(1, ctx)
                trial = Trial(trial_id=f"t{len(out):04d}", index=len(out), candidate=cand, objective={})
                trial = Trial.from_dict(json.loads(json.dumps(trial.to_dict())))
                result = Result(status="ok", val_bpb=1.0 + abs(cand.knobs["MATRIX_LR"] - 0.04))
                searcher.tell(trial, result)
                told.append((trial, result))
                out.append(cand.knobs)
            searcher.close()
        return out

    uninterrupted = proposals(tmp_path / "a", [8])
    resumed = proposals(tmp_path / "b", [3, 5, 8])
    if sampler != "gp":  # GP also warm-starts its kernel fit from the last one: not part of the saved state
        assert resumed == uninterrupted
    keys = [json.dumps(k, sort_keys=True) for k in resumed[1:]]
    assert len(set(keys)) == len(keys), "a resumed study proposed a finished candidate again"


@pytest.mark.slow
def test_a_random_study_extended_later_continues_instead_of_replaying(tmp_path):
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "searcher=random", "launcher.slots=1", f"mlflow.tracking_uri={uri}"]
    run_arena(tmp_path, *args, "study.max_trials=3", timeout=900)
    run_arena(tmp_path, *args, "study.max_trials=6", timeout=900)
    js = JournalState.load(journal_of(tmp_path, "random-local-tiny-s0"))
    measured_once(js, 6)
    sources = [t.candidate.source for t, _ in js.finished()]
    assert len(set(sources)) == 6, "trials after the restart repeat the ones before it"


# -- 4. the study's own storage fails: stop loudly, blame no candidate -------------------------------
def _tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    _tmpfs(mnt, "96m")
    yield mnt
    while subprocess.run(["umount", "-l", str(mnt)], capture_output=True).returncode == 0:
        pass  # a test's bind mount over it too (a failed test leaves it): every layer, or pytest cannot remove it


def test_a_read_only_study_folder_is_refused_before_any_compute(tmp_path, small_fs):
    """The same fault, line and exit code (3) at startup as mid-study."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    proc = run_arena(tmp_path, *TINY, f"study.dir={small_fs}/study", f"mlflow.tracking_uri={sqlite_uri(tmp_path)}",
                     check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 3 and len(errors) == 1 and "study folder not writable" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_storage_fault_mid_study_stops_it_loudly_and_the_trial_runs_again(tmp_path, small_fs, fault):
    uri = sqlite_uri(tmp_path)
    study = small_fs / "study"
    args = [*TINY, "objective.budget=30", "objective.hard_limit_s=900", "launcher.slots=1", "study.max_trials=3", f"study.dir={study}",
            f"mlflow.tracking_uri={uri}"]
    path = study / "journal.jsonl"
    orchestrator = start(tmp_path, *args)
    wait_for(lambda: len(safe_state(path).results) >= 1 and safe_state(path).in_flight(), 600,
             "a result and a trial in flight")
    if fault == "read-only":
        # A read-only bind mount over the folder: files already open stay writable (a remount of the
        # filesystem itself is refused while they are open), everything opened from now on is not.
        subprocess.run(["mount", "--bind", str(small_fs), str(small_fs)], check=True)
        # The trial opens steps.log per step through the new bind mount: the remount is refused
        # ("busy") while one is open for writing, so it is tried until it lands between two.
        wait_for(lambda: subprocess.run(["mount", "-o", "remount,ro,bind", str(small_fs)],
                                        capture_output=True).returncode == 0, 60, "a read-only remount")
        expected = "study folder not writable"
    else:
        with open(small_fs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass
        expected = "no space left on the study folder's filesystem"
    _, err = orchestrator.communicate(timeout=600)
    assert orchestrator.returncode == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err[-3000:]
    js = JournalState.load(path)
    victims = [t.trial_id for t in js.in_flight()]  # none if the fault hit between two trials
    assert all(r.ok for r in js.results.values()), [r.error for r in js.results.values()]
    parents, _ = parents_and_children(uri)
    assert [p.info.status for p in parents] == ["FAILED"]

    if fault == "read-only":
        subprocess.run(["umount", str(small_fs)], check=True)  # the bind mount goes, the folder is writable
    else:
        (small_fs / "filler").unlink()
    run_arena(tmp_path, *args, timeout=900)  # fixed: the same command resumes and measures the trial
    js = JournalState.load(path)
    measured_once(js, 3)
    assert all(js.results[v].ok for v in victims)


# -- 5. a kill -9 between the warm harness's fork and the pid file ----------------------------------
KILL_IN_FORK_WINDOW = """
import os, signal, sys
sys.path.insert(0, {root!r})
import launchers.local as local
original = local._WarmHarness.run
def run_then_die(self, trial_dir):
    pid = original(self, trial_dir)  # the trial is forked; the launcher has not written its pid
    if trial_dir.name == "t0001":
        os.kill(os.getpid(), signal.SIGKILL)
    return pid
local._WarmHarness.run = run_then_die
ready = local._WarmHarness.poll_ready
local._WarmHarness.poll_ready = lambda self, wait: ready(self, wait=True)  # every trial forked, never cold
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_in_the_fork_window_adopts_the_trial_instead_of_running_it_twice(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_IN_FORK_WINDOW.format(root=str(ROOT), run=str(ROOT / "run.py")))
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "objective.budget=30", "objective.hard_limit_s=900", "launcher.slots=1", "study.max_trials=2", f"mlflow.tracking_uri={uri}"]
    killed = start(tmp_path, *args, driver=str(driver))
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    trial_dir = tmp_path / "studies" / "tpe-local-tiny-s0" / "trials" / "t0001"
    assert not (trial_dir / "pid").exists(), "the kill must land before the pid file"

    run_arena(tmp_path, *args, timeout=900)
    path = journal_of(tmp_path, "tpe-local-tiny-s0")
    js = JournalState.load(path)
    measured_once(js, 2)
    events = Journal.read(path)
    assert "t0001" in {e["trial_id"] for e in events if e["event"] == "adopted"}
    assert not [e for e in events if e["event"] == "resubmitted"], "the running trial was started again"
    assert js.trials["t0001"].directory == str(trial_dir)
    log = (trial_dir / "run.log").read_text()
    assert log.count("harness: status=") == 1, "two harnesses wrote one trial's log"
    # adopted: its finish time is its own, not when the new orchestrator noticed it
    assert js.results["t0001"].finished_at == pytest.approx((trial_dir / "result.json").stat().st_mtime, abs=0.01)
