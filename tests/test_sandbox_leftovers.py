"""No mount, scratch folder or cgroup outlives its trial, however the trial's harness ends: the
orchestrator sweeps its host when a study starts and when it ends, and a cgroup is named after its
trial's scratch, never after a pid alone (a stale one would lend a later trial its OOM count). Every
fault is real: a harness or an orchestrator killed with SIGKILL while its trial trains, a cgroup
left behind with a real OOM kill in it. Each study runs with its own TMPDIR, so the counts are not
disturbed by other studies on the host."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.journal import JournalState
from tests.conftest import ROOT, TINY, run_arena, sqlite_uri
from tests.test_reliability import journal_of, measured_once, safe_state, wait_for
from tests.test_sandbox import World, fork_running, wait
from train import sandbox
from train.sandbox import ProcessTree, confine, procfs

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="tmpfs scratch and per-trial cgroups need root")


def child_cgroup_parents() -> dict[str, Path]:
    """Where this process's children's cgroups go (the v1 memory/pids/cpuacct folders, else v2),
    read from /proc/self/cgroup as the sandbox reads it."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    v1 = {c: Path("/sys/fs/cgroup") / c / own[c].lstrip("/") for c in ("memory", "pids", "cpuacct") if c in own}
    if len(v1) == 3:
        return v1
    base = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists() \
        else Path("/sys/fs/cgroup")
    return {"": base / own.get("", "/").lstrip("/")}


def cgroups_usable() -> bool:
    try:
        return os.geteuid() == 0 and all(os.access(p, os.W_OK) for p in child_cgroup_parents().values())
    except OSError:
        return False


def mounts_under(folder: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(folder) + "/")]


def cgroups_of_tree(pid: int) -> set[Path]:
    """The cgroup folders the processes of `pid`'s tree sit in, as /sys/fs/cgroup paths, for those
    the sandbox made (named arena-*)."""
    found, frontier, seen = set(), [pid], set()
    while frontier:
        p = frontier.pop()
        if p in seen:
            continue
        seen.add(p)
        frontier += procfs.children(p)
        try:
            lines = Path(f"/proc/{p}/cgroup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if Path(path).name.startswith("arena-"):
                for c in controllers.split(",") if controllers else ["unified"]:
                    found.add(Path("/sys/fs/cgroup") / c / path.lstrip("/"))
    return found


def leftovers(tmp: Path, groups: set[Path]) -> dict:
    return {"mounts": mounts_under(tmp), "scratch": sorted(p.name for p in tmp.iterdir()),
            "cgroups": sorted(str(g) for g in groups if g.exists())}


NOTHING = {"mounts": [], "scratch": [], "cgroups": []}


# -- a stale cgroup lends nothing to a later trial ------------------------------------------------
@pytest.mark.skipif(not cgroups_usable(), reason="per-trial cgroups need root and a writable cgroupfs")
def test_a_cgroup_a_dead_trial_left_with_an_oom_kill_is_never_joined_by_a_later_trial_of_the_same_pid(tmp_path):
    """Cgroups used to be named arena-sandbox-<pid>: a harness that died left its trial's cgroup, and
    a later child given the same pid joined it and was called `oom` for the dead trial's kill."""
    world = World(tmp_path)
    level = sandbox.available_level()
    go_read, go_write = os.pipe()

    def child():
        os.read(go_read, 1)  # until the stale cgroup of its pid is in place
        confine(world.policy(), level)

    pid = fork_running(child, failed_code=70)
    stale = {c: parent / f"arena-sandbox-{pid}" for c, parent in child_cgroup_parents().items()}
    hog = tree = None
    try:
        for directory in stale.values():
            directory.mkdir()
        memory = stale.get("memory", stale.get(""))
        v1 = "memory" in stale
        (memory / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(120 * 2**20))
        try:  # no swap to hide in
            (memory / ("memory.memsw.limit_in_bytes" if v1 else "memory.swap.max")).write_text(
                str(120 * 2**20) if v1 else "0")
        except OSError:
            pass
        hog = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(1); "
                                "x = [bytearray(b'1' * 2**20) for _ in range(400)]"], stdin=subprocess.PIPE)
        for directory in stale.values():
            (directory / "cgroup.procs").write_text(str(hog.pid))
        hog.stdin.close()
        assert hog.wait(120) == -signal.SIGKILL, "the control: the hog must die of its cgroup's memory limit"
        events = (memory / ("memory.oom_control" if "memory" in stale else "memory.events")).read_text()
        assert "oom_kill 1" in events

        tree = ProcessTree(pid, world.policy(), level)
        os.write(go_write, b"g")
        assert wait(pid, 120) == 0
        assert not tree.oom_killed(), "a later trial inherited a dead trial's OOM kill"
        peak = tree.peak_memory_mb()
        assert peak is None or peak < 100, f"a later trial inherited a dead trial's peak memory ({peak} MB)"
    finally:
        if tree is not None:
            tree.close()
        if hog and hog.poll() is None:
            hog.kill()
        for directory in stale.values():
            if directory.exists():
                directory.rmdir()


# -- a harness killed outright at the study's last trial --------------------------------------------
@ROOT_ONLY
@pytest.mark.slow
def test_a_harness_killed_outright_at_the_last_trial_leaves_nothing_once_the_study_ends(tmp_path):
    """The launcher's backstop, an operator's kill -9 or the OOM killer ends a harness without its
    clean-up; before, only a later harness on the host swept its tmpfs and folders (none came after
    the last trial), and nothing ever removed its cgroups."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = [*TINY, "objective.budget=400", "objective.hard_limit_s=900", "launcher.slots=1", "study.max_trials=1",
            f"mlflow.tracking_uri={sqlite_uri(tmp_path)}"]
    path = journal_of(tmp_path, "tpe-local-tiny-s0")
    orchestrator = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args,
                                     f"hydra.run.dir={tmp_path}/outputs/run"], cwd=tmp_path,
                                    env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    try:
        harness, groups = _trial_running(path, tmp)
        os.killpg(harness, signal.SIGKILL)
        _, err = orchestrator.communicate(timeout=600)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 0, err[-3000:]
    assert leftovers(tmp, groups) == NOTHING


# -- an orchestrator killed while its trial trains, then resumed ----------------------------------
@ROOT_ONLY
@pytest.mark.slow
def test_an_orchestrator_killed_while_a_trial_trains_then_resumed_leaves_no_mount_folder_or_cgroup(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = [*TINY, "objective.budget=40", "objective.hard_limit_s=900", "launcher.slots=1", "study.max_trials=1",
            f"mlflow.tracking_uri={sqlite_uri(tmp_path)}"]
    path = journal_of(tmp_path, "tpe-local-tiny-s0")
    env = {**os.environ, "TMPDIR": str(tmp)}
    orchestrator = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args,
                                     f"hydra.run.dir={tmp_path}/outputs/run"], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        harness, groups = _trial_running(path, tmp)
        orchestrator.kill()  # kill -9: no finalise, no sweep
        orchestrator.wait()
        os.killpg(harness, signal.SIGKILL)  # and its trial with it (a node's OOM killer, an operator)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    wait_for(lambda: not Path(f"/proc/{harness}").exists(), 60, "the killed harness to be gone")

    run_arena(tmp_path, *args, timeout=900, env={"TMPDIR": str(tmp)})
    measured_once(JournalState.load(path), 1)
    assert leftovers(tmp, groups) == NOTHING


def _trial_running(journal: Path, tmp: Path) -> tuple[int, set[Path]]:
    """Wait until the study's trial trains in its sandbox (its worker's tmpfs mounted, its cgroups
    made); the harness's pid and the cgroups of its tree."""
    def ready():
        trials = safe_state(journal).in_flight()
        if not trials or not mounts_under(tmp):
            return None
        try:
            harness = int((Path(trials[0].directory) / "pid").read_text())
        except (OSError, ValueError):
            return None
        groups = cgroups_of_tree(harness)
        return (harness, groups) if groups else None

    deadline = time.time() + 600
    while time.time() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("the trial never started training in its sandbox")
