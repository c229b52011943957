"""A storage fault at any moment of a study (before it starts, while it sets up, at its first trial,
while it finalises) is one line and exit code 3 with the same resume promise, and leaves no empty
study folder; the study lock is taken before anything reads the folder; a Ctrl-C while a finished
study waits for MLflow still ends the parent run. Every fault is real: a real tmpfs filled up, a
real copy paused with SIGSTOP, a real SIGINT while MLflow's database is locked by another process."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from study.journal import Journal, JournalState
from tests.conftest import ROOT, TINY, run_arena, sqlite_uri
from tests.test_reliability import parents_and_children, safe_state, start, wait_for


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def fill(folder: Path) -> None:
    """Write until the filesystem refuses: a real full disk."""
    with open(folder / "filler", "ab", buffering=0) as f:
        for size in (2**20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# -- 2. full before the start ---------------------------------------------------------------------
def test_a_disk_full_before_the_start_is_one_line_exit_3_and_leaves_nothing_on_it(tmp_path, tmpfs):
    """Everything on one full disk (the folder the study is started from, so Hydra's output folder,
    the study folder and the MLflow database): Hydra used to fail first, with its traceback and exit 1."""
    disk = tmpfs("disk", "8m")
    fill(disk)
    before = sorted(p.name for p in disk.iterdir())
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, "study.max_trials=1"], cwd=disk,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no space left" in one_error(proc.stderr) and "re-run the same command" in proc.stderr
    assert sorted(p.name for p in disk.iterdir()) == before


def test_a_full_study_disk_at_the_start_leaves_no_empty_study_folder(tmp_path, tmpfs):
    disk = tmpfs("disk", "8m")
    fill(disk)
    proc = run_arena(tmp_path, *TINY, "study.max_trials=1", f"study.dir={disk}/studies/s",
                     f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no space left on the study folder's filesystem" in one_error(proc.stderr)
    assert not (disk / "studies").exists(), "an empty study folder was left behind"


# -- 2. the disk fills at a given moment ----------------------------------------------------------
FILL_AT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_startup_faults import fill
from pathlib import Path
import study.runner as runner
import study.loop as loop
disk, moment = Path({disk!r}), {moment!r}
def filled_first(f):
    def wrapper(*args, **kwargs):
        fill(disk)
        return f(*args, **kwargs)
    return wrapper
if moment == "setup":  # the folder is made, locked and probed; then the disk fills
    original_own = runner._own
    def own_then_fill(*args, **kwargs):
        original_own(*args, **kwargs)
        fill(disk)
    runner._own = own_then_fill
elif moment == "first trial":
    loop.StudyLoop._submit = filled_first(loop.StudyLoop._submit)
elif moment == "last journal line":  # the loop has ended; its `stopped` line and the final sync
    loop.StudyLoop._close_journal = filled_first(loop.StudyLoop._close_journal)
elif moment == "finalise":
    runner.finalise = filled_first(runner.finalise)
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["setup", "first trial", "last journal line", "finalise"])
def test_a_disk_that_fills_at_any_moment_is_one_line_exit_3_and_the_same_command_resumes(tmp_path, tmpfs, moment):
    disk = tmpfs("disk", "96m")
    study = disk / "studies" / "s"
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "launcher.slots=1", "study.max_trials=1", f"study.dir={study}", f"mlflow.tracking_uri={uri}"]
    driver = tmp_path / "driver.py"
    driver.write_text(FILL_AT.format(root=str(ROOT), run=str(ROOT / "run.py"), disk=str(disk), moment=moment))
    proc = start(tmp_path, *args, driver=str(driver))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    line = one_error(err)
    assert ("no space left" in line or "not writable" in line) and "re-run the same command" in line, line
    if moment == "setup":
        assert not (disk / "studies").exists(), "a study that never started left its folder"
        assert not parents_and_children(uri)[0], "a study that never started has an MLflow parent"
    else:
        parents, _ = parents_and_children(uri)
        assert [p.info.status for p in parents] == ["FAILED"]
    if moment in ("last journal line", "finalise"):
        assert len(JournalState.load(study / "journal.jsonl").results) == 1, "the finished trial was lost"

    (disk / "filler").unlink()
    run_arena(tmp_path, *args, timeout=600)  # fixed: the same command resumes and ends the study
    js = JournalState.load(study / "journal.jsonl")
    assert len(js.results) == 1 and all(r.ok for r in js.results.values())
    assert (study / "leaderboard.txt").exists()
    parents, children = parents_and_children(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(c.data.tags["arena.trial_id"] for c in children) == sorted(js.results)


# -- 2b. the lock before the first look -----------------------------------------------------------
PAUSE_BEFORE_LOCK = """
import os, signal, sys
sys.path.insert(0, {root!r})
import study.lock as lock
original = lock.StudyLock.acquire
def paused_then_acquire(self):
    os.kill(os.getpid(), signal.SIGSTOP)  # Ctrl-Z at the worst moment
    return original(self)
lock.StudyLock.acquire = paused_then_acquire
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_copy_paused_before_it_owns_the_folder_reads_it_only_once_it_does(tmp_path):
    """A 1-slot copy paused (Ctrl-Z) before it took the lock, while a 2-slot copy ran the study, used
    to run on what it had read before the pause: it added a trial to the 2-slot study and made a
    second MLflow parent. Now it reads the folder under the lock and refuses a different study."""
    uri = sqlite_uri(tmp_path)
    common = [*TINY, "study.name=shared", f"mlflow.tracking_uri={uri}"]
    driver = tmp_path / "driver.py"
    driver.write_text(PAUSE_BEFORE_LOCK.format(root=str(ROOT), run=str(ROOT / "run.py")))
    late = start(tmp_path, *common, "launcher.slots=1", "study.max_trials=3", driver=str(driver))
    try:
        wait_for(lambda: _state(late.pid) == "T", 300, "the late copy to pause before its lock")
        run_arena(tmp_path, *common, "launcher.slots=2", "study.max_trials=2", timeout=600)
        path = tmp_path / "studies" / "shared" / "journal.jsonl"
        before = path.read_bytes()
        os.kill(late.pid, signal.SIGCONT)
        _, err = late.communicate(timeout=300)
    finally:
        if late.poll() is None:
            late.kill()
    assert late.returncode == 2, err[-3000:]
    assert "different slots 2 -> 1" in one_error(err)
    assert path.read_bytes() == before, "the late copy wrote to the other copy's journal"
    parents, children = parents_and_children(uri)
    assert len(parents) == 1 and len(children) == 2


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


# -- 2c. Ctrl-C while a finished study waits for MLflow -------------------------------------------
@pytest.mark.slow
def test_a_ctrl_c_while_a_finished_study_waits_for_mlflow_still_ends_its_parent_run(tmp_path):
    """MLflow's database is held by another process (a busy store), so the finished study waits for
    its mirror; a Ctrl-C then used to leave the parent run RUNNING and say 'interrupted while starting'."""
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "launcher.slots=1", "study.max_trials=1", f"mlflow.tracking_uri={uri}",
            "mlflow.flush_timeout_s=300"]
    path = tmp_path / "studies" / "tpe-local-tiny-s0" / "journal.jsonl"
    orchestrator = start(tmp_path, *args)
    holder = None
    try:
        wait_for(lambda: safe_state(path).in_flight(), 300, "the trial to start (the parent run exists)")
        wait_for(lambda: parents_and_children(uri)[0], 120, "the parent run in MLflow")
        holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=60)
        holder.execute("BEGIN EXCLUSIVE")  # nothing more reaches MLflow until this ends
        wait_for(lambda: path.exists() and any(e["event"] == "stopped" for e in _events(path)), 600,
                 "the study to finish and wait for MLflow")
        orchestrator.send_signal(signal.SIGINT)
        holder.rollback()
        holder.close()
        holder = None
        _, err = orchestrator.communicate(timeout=300)
    finally:
        if holder is not None:
            holder.close()
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 130, err[-3000:]
    assert "interrupted while starting" not in err and "nothing was lost" in err, err[-3000:]
    parents, _ = parents_and_children(uri)
    assert [p.info.status for p in parents] in (["KILLED"], ["FINISHED"]), [p.info.status for p in parents]


def _events(path: Path) -> list[dict]:
    try:
        return Journal.read(path)
    except ValueError:
        return []


# -- a start killed while MLflow makes its local database -----------------------------------------
KILL_IN_MLFLOW_MIGRATION = """
import os, signal, sys
sys.path.insert(0, {root!r})
import alembic.ddl.impl as impl
original, made = impl.DefaultImpl.create_table, []
def create_then_die(self, table, *args, **kwargs):
    original(self, table, *args, **kwargs)
    made.append(table.name)
    if len(made) == {nth}:  # the first: a step's temporary table; later: a table of a later step
        os.kill(os.getpid(), signal.SIGKILL)
impl.DefaultImpl.create_table = create_then_die
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("nth", [1, 27])
def test_a_start_killed_while_mlflow_makes_its_database_does_not_block_every_later_start(tmp_path, nth):
    """The chaos audit found it: MLflow migrates a new local database step by step, and a kill in
    between left one that every later start failed on, with a traceback."""
    args = [*TINY, "launcher.slots=1", "study.max_trials=1", f"mlflow.tracking_uri={sqlite_uri(tmp_path)}"]
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_IN_MLFLOW_MIGRATION.format(root=str(ROOT), run=str(ROOT / "run.py"), nth=nth))
    killed = start(tmp_path, *args, driver=str(driver))
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "mlflow.db").exists(), "the kill must land while MLflow makes its database"

    proc = run_arena(tmp_path, *args, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moved aside" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    parents, children = parents_and_children(sqlite_uri(tmp_path))
    assert len(parents) == 1 and len(children) == 1
    assert list(tmp_path.glob("mlflow.db.interrupted-*")), "the half-made database is kept, not deleted"
