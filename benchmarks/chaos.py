"""Chaos: real faults against real tiny studies, each compared with an uninterrupted study of the same seed.

    python benchmarks/chaos.py [--cases all] [--searchers tpe,cmaes,random,grid,greedy] [--trials 4]
                               [--steps 20] [--kills 3] [--seed 0] [--keep DIR]

Every study runs `python run.py` (tiny preset, one slot: the searcher asks right after each result)
in a folder of its own with its own TMPDIR, so what it leaves behind is its own. The cases (`fault`):

  kill -9 random       the orchestrator killed at random moments (--kills times: during start-up,
                       while a trial trains), then the same command to the end          (every searcher)
  kill -9 in ask       killed inside the searcher's ask (Optuna: after the new trial's first parameter
                       is written; others: as the ask returns), then resumed            (every searcher)
  kill -9 + harness    the orchestrator and its trial's harness killed while the trial trains (the
                       worker's tmpfs mounted, its cgroups made), then resumed
  line deleted         a `submitted` line of a finished study deleted: the resume must refuse it (exit 2)
                       and change nothing; the journal restored from its backup, resumed
  disk full at start   the study folder's filesystem (a real tmpfs) full before the start: exit 3 and no
                       study folder; freed, the same command
  disk full mid-study  the tmpfs filled while a trial trains: exit 3; freed, resumed
  paused copy          a 2-slot copy paused (SIGSTOP) before its lock while the study runs: resumed after,
                       it must refuse (exit 2) and change nothing
  Ctrl-C, MLflow busy  SIGINT while the finished study waits for MLflow (its database locked by another
                       process): exit 130 and the parent run ended; the same command mirrors the rest

Columns:
  tries         faults delivered
  lost          trial ids submitted but never measured
  duplicated    trial ids measured more than once, plus candidates measured under two ids
  orphaned      what outlived the study: processes working in it, mounts and entries under its TMPDIR,
                cgroups of its trials' scratch folders (seen while it ran)
  wrong status  trials whose status or val_bpb differs from the uninterrupted study's, or missing
  exact         the candidates, in order, equal the uninterrupted study's
  exit code     of the run the fault hit (the refusal or stop it must get), then of the last run
  MLflow equal  child runs are exactly the measured trials, one parent run, and it has ended
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.journal import Journal, JournalState  # noqa: E402 - after the path that makes it importable
from train.sandbox.cgroup import Cgroup  # noqa: E402

OPTUNA = {"tpe", "random", "cmaes", "gp"}
EXTRA = {"tpe": ["searcher.options.n_startup_trials=2"]}  # TPE models from the third trial on
CASES = ("kill -9 random", "kill -9 in ask", "kill -9 + harness", "line deleted", "disk full at start",
         "disk full mid-study", "paused copy", "Ctrl-C, MLflow busy")

PRELUDE = """
import os, signal, sys
sys.path.insert(0, {root!r})
"""
RUN = """
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""
KILL_IN_OPTUNA_ASK = """
import optuna.storages._rdb.storage as rdb
original = rdb.RDBStorage._set_trial_param
def set_param_then_die(self, trial_id, *args, **kwargs):
    original(self, trial_id, *args, **kwargs)
    if self.get_trial_number_from_id(trial_id) == {k}:
        os.kill(os.getpid(), signal.SIGKILL)
rdb.RDBStorage._set_trial_param = set_param_then_die
"""
KILL_AS_ASK_RETURNS = """
import importlib
module, name = {target!r}.rsplit(".", 1)
cls = getattr(importlib.import_module(module), name)
original, calls = cls.ask, []
def ask_then_die(self, n, ctx):
    out = original(self, n, ctx)
    calls.append(n)
    if len(calls) == {k} + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
cls.ask = ask_then_die
"""
PAUSE_BEFORE_LOCK = """
import study.lock as lock
original = lock.StudyLock.acquire
def paused_then_acquire(self):
    os.kill(os.getpid(), signal.SIGSTOP)
    return original(self)
lock.StudyLock.acquire = paused_then_acquire
"""
TARGETS = {"grid": "searchers.grid.GridSearcher", "greedy": "searchers.greedy.GreedySearcher"}


class Study:
    """One study folder (its own TMPDIR, MLflow database and Hydra outputs) and how to run it."""

    def __init__(self, workdir: Path, searcher: str, trials: int, steps: int, study_dir: Path | None = None):
        self.workdir, self.searcher = workdir, searcher
        self.tmp = workdir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.dir = study_dir or workdir / "study"
        self.journal = self.dir / "journal.jsonl"
        self.uri = f"sqlite:///{workdir}/mlflow.db"
        self.args = [f"searcher={searcher}", "objective=tiny", f"objective.budget={steps}", "objective.hard_limit_s=900",
                     "progress=false", "launcher.slots=1", f"study.max_trials={trials}", f"study.dir={self.dir}",
                     f"mlflow.tracking_uri={self.uri}", f"hydra.run.dir={workdir}/outputs/run", *EXTRA.get(searcher, [])]
        self.scratch_seen: set[str] = set()
        self.codes: list[int] = []

    def start(self, *extra: str, driver: str = "", **popen) -> subprocess.Popen:
        if driver:
            script = self.workdir / f"driver-{len(self.codes)}-{time.monotonic_ns()}.py"
            script.write_text(PRELUDE.format(root=str(ROOT)) + driver + RUN.format(run=str(ROOT / "run.py")))
            command = [sys.executable, str(script)]
        else:
            command = [sys.executable, str(ROOT / "run.py")]
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([*command, *self.args, *extra], cwd=self.workdir, text=True,
                                env={**os.environ, "TMPDIR": str(self.tmp)}, **popen)

    def run(self, *extra: str, driver: str = "", timeout: float = 1800) -> int:
        proc = self.start(*extra, driver=driver)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        self.codes.append(proc.returncode)
        self.last_error = (err or "").strip().splitlines()[-1:] or [""]
        return proc.returncode

    def state(self) -> JournalState:
        try:
            return JournalState.load(self.journal)
        except ValueError:
            return JournalState()

    def watch(self) -> "Watcher":
        return Watcher(self)


class Watcher:
    """Notes the scratch folders a study's trials make (their cgroups are named after them)."""

    def __init__(self, study: Study):
        self.study, self.stop = study, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self):
        while not self.stop.wait(0.1):
            try:
                self.study.scratch_seen.update(p.name for p in self.study.tmp.iterdir()
                                               if p.name.startswith("arena-") and not p.name.endswith(".owner"))
            except OSError:
                pass


def wait_for(predicate, timeout: float = 900) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def trial_training(study: Study) -> int | None:
    """The harness pid of a trial whose worker is training in its sandbox (its tmpfs mounted)."""
    running = study.state().in_flight()
    if not running or not mounts_under(study.tmp):
        return None
    try:
        return int((Path(running[0].directory) / "pid").read_text())
    except (OSError, ValueError):
        return None


# -- the cases ----------------------------------------------------------------------------------------
def kill_random(study: Study, rng: random.Random, kills: int) -> int:
    delivered = 0
    for k in range(kills):
        proc = study.start()
        if k % 3 == 0:
            time.sleep(rng.uniform(1, 8))  # during start-up
        else:
            wait_for(lambda: proc.poll() is not None or trial_training(study) is not None, 600)
            time.sleep(rng.uniform(0, 5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            delivered += 1
        proc.communicate()
        study.codes.append(proc.returncode)
    study.run()
    return delivered


def kill_in_ask(study: Study, rng: random.Random, trials: int) -> int:
    k = rng.randint(2, trials - 1)  # past the baseline and the first sample
    driver = (KILL_IN_OPTUNA_ASK if study.searcher in OPTUNA else KILL_AS_ASK_RETURNS).format(
        k=k, target=TARGETS.get(study.searcher, ""))
    code = study.run(driver=driver)
    study.run()
    return int(code == -signal.SIGKILL)


def kill_with_harness(study: Study) -> int:
    proc = study.start()
    harness = None
    if wait_for(lambda: proc.poll() is not None or trial_training(study) is not None, 900):
        harness = trial_training(study)
    proc.kill()
    proc.communicate()
    study.codes.append(proc.returncode)
    if harness:
        try:
            os.killpg(harness, signal.SIGKILL)
        except ProcessLookupError:
            harness = None
        wait_for(lambda: not Path(f"/proc/{harness}").exists(), 60)
    study.run()
    return 1 + (harness is not None)


def line_deleted(study: Study, reference: Study) -> int:
    shutil.copytree(reference.dir, study.dir, symlinks=True)
    shutil.copy(reference.workdir / "mlflow.db", study.workdir / "mlflow.db")
    backup = study.journal.read_bytes()
    lines = backup.split(b"\n")
    kinds = [json.loads(line)["event"] if line else None for line in lines]
    index = len(kinds) - 1 - kinds[::-1].index("submitted")
    study.journal.write_bytes(b"\n".join(lines[:index] + lines[index + 1:]))
    damaged = study.journal.read_bytes()
    study.run()
    if study.journal.read_bytes() != damaged:
        study.codes[-1] = f"{study.codes[-1]}, wrote to the journal"
    study.journal.write_bytes(backup)  # restored from the backup, as the refusal says
    study.run()
    return 1


def disk_full_at_start(study: Study) -> int:
    disk = mount_tmpfs(study.workdir / "disk", "96m")
    fill(disk)
    study.run()
    if study.dir.exists() or (disk / "study").exists():
        study.codes[-1] = f"{study.codes[-1]}, left a folder"
    (disk / "filler").unlink()
    study.run()
    return 1


def disk_full_mid_study(study: Study) -> int:
    disk = mount_tmpfs(study.workdir / "disk", "96m")
    proc = study.start()
    wait_for(lambda: proc.poll() is not None or (study.state().results and trial_training(study) is not None), 900)
    fill(disk)
    proc.communicate(timeout=900)
    study.codes.append(proc.returncode)
    (disk / "filler").unlink()
    study.run()
    return 1


def paused_copy(study: Study) -> int:
    late = study.start("launcher.slots=2", driver=PAUSE_BEFORE_LOCK)
    wait_for(lambda: _proc_state(late.pid) == "T", 300)
    study.run()
    before = study.journal.read_bytes()
    os.kill(late.pid, signal.SIGCONT)
    late.communicate(timeout=600)
    study.codes.insert(0, late.returncode if study.journal.read_bytes() == before
                       else f"{late.returncode}, wrote to the journal")
    return 1


def ctrl_c_mlflow_busy(study: Study) -> int:
    proc = study.start("mlflow.flush_timeout_s=600")
    wait_for(lambda: proc.poll() is not None or study.state().in_flight(), 900)
    wait_for(lambda: proc.poll() is not None or mlflow_parents(study), 300)
    holder = sqlite3.connect(study.workdir / "mlflow.db", timeout=120)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        wait_for(lambda: proc.poll() is not None or _stopped(study), 1800)
        proc.send_signal(signal.SIGINT)
    finally:
        holder.rollback()
        holder.close()
    proc.communicate(timeout=600)
    study.codes.append(proc.returncode)
    status = [p.info.status for p in mlflow_parents(study)]
    if status != ["KILLED"] and status != ["FINISHED"]:
        study.codes[-1] = f"{study.codes[-1]}, parent {status}"
    study.run()
    return 1


# -- the audit ----------------------------------------------------------------------------------------
def audit(study: Study, reference: Study | None) -> dict:
    js = study.state()
    events = Journal.read(study.journal) if study.journal.exists() else []
    measured = Counter(e["trial_id"] for e in events if e["event"] == "finished"
                       and (e["result"]["status"] not in ("cancelled", "lost") or e.get("final")))
    finished = js.finished()
    candidates = Counter((t.candidate.source, t.seed) for t, _ in finished)
    ours = [(t.candidate.knobs, r.status, r.val_bpb) for t, r in finished]
    theirs = [(t.candidate.knobs, r.status, r.val_bpb) for t, r in reference.state().finished()] if reference else ours
    wrong = sum(a[1:] != b[1:] for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))
    time.sleep(1.0)  # a process of the study that is still exiting
    left = leftovers(study)
    return {
        "lost": len(set(js.trials) - set(js.results)) + len(js.to_rerun()),
        "duplicated": sum(n > 1 for n in measured.values()) + sum(n > 1 for n in candidates.values()),
        "orphaned": sum(len(v) for v in left.values()),
        "orphans": {k: v for k, v in left.items() if v},
        "wrong status": wrong,
        "exact": "yes" if [o[0] for o in ours] == [t[0] for t in theirs] else "NO",
        "exit code": ", ".join(str(c) for c in study.codes),
        "MLflow equal": mlflow_equal(study, set(js.results)),
    }


def leftovers(study: Study) -> dict[str, list]:
    processes = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(str(study.workdir)):
                processes.append(int(proc.name))
        except OSError:
            continue
    groups = []
    if os.geteuid() == 0:
        for parent in Cgroup.parents().values():
            groups += [str(d) for name in study.scratch_seen for d in parent.glob(f"{name}-*") if d.is_dir()]
    entries = [p.name for p in study.tmp.iterdir()] if study.tmp.exists() else []
    return {"processes": processes, "mounts": mounts_under(study.tmp), "tmpdir": entries, "cgroups": groups}


def mlflow_parents(study: Study) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=study.uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    runs = client.search_runs([exp.experiment_id], max_results=10000) if exp else []
    study._runs = runs
    return [r for r in runs if r.data.tags.get("arena.kind") == "study"]


def mlflow_equal(study: Study, measured: set[str]) -> str:
    try:
        parents = mlflow_parents(study)
    except Exception as e:  # noqa: BLE001 - a store the study left unreadable is a finding, not a crash
        return f"NO (unreadable: {type(e).__name__})"
    children = Counter(r.data.tags.get("arena.trial_id") for r in study._runs if r.data.tags.get("arena.kind") == "trial")
    ok = (set(children) == measured and all(n == 1 for n in children.values()) and len(parents) == 1
          and parents[0].info.status != "RUNNING")
    status = parents[0].info.status if len(parents) == 1 else f"{len(parents)} parents"
    return f"{'yes' if ok else 'NO'} ({sum(children.values())} children, {status})"


# -- host helpers ---------------------------------------------------------------------------------
def mounts_under(folder: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(folder) + "/")]


def mount_tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    _MOUNTED.append(path)
    return path


_MOUNTED: list[Path] = []


def fill(folder: Path) -> None:
    with open(folder / "filler", "ab", buffering=0) as f:
        for size in (2**20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _stopped(study: Study) -> bool:
    try:
        return any(e["event"] == "stopped" for e in Journal.read(study.journal))
    except (OSError, ValueError):
        return False


# -- main -----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="all", help=f"comma-separated, or all: {', '.join(CASES)}")
    parser.add_argument("--searchers", default="tpe,cmaes,random,grid,greedy",
                        help="for the kill cases; the other cases run the first one")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="tiny preset's budget: long enough to be killed mid-trial")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="folder to keep the studies in (default: a temporary one)")
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [c.strip() for c in args.cases.split(",")]
    searchers = args.searchers.split(",")
    rng = random.Random(args.seed)
    base = Path(args.keep or tempfile.mkdtemp(prefix="arena-chaos-"))
    references: dict[str, Study] = {}

    def reference(searcher: str) -> Study:
        if searcher not in references:
            ref = Study(base / f"uninterrupted-{searcher}", searcher, args.trials, args.steps)
            with ref.watch():
                ref.run()
            references[searcher] = ref
        return references[searcher]

    plan = []
    for case in cases:
        for searcher in (searchers if case in ("kill -9 random", "kill -9 in ask") else searchers[:1]):
            if case.startswith("disk") and os.geteuid() != 0:
                continue  # a real tmpfs needs root
            plan.append((case, searcher))
    rows = []
    try:
        for case, searcher in plan:
            ref = reference(searcher)
            slug = case.replace(" ", "_").replace(",", "").replace("-", "")
            study = Study(base / f"{slug}-{searcher}", searcher, args.trials, args.steps,
                          study_dir=(base / f"{slug}-{searcher}" / "disk" / "study") if case.startswith("disk") else None)
            started = time.time()
            with study.watch():
                tries = {"kill -9 random": lambda: kill_random(study, rng, args.kills),
                         "kill -9 in ask": lambda: kill_in_ask(study, rng, args.trials),
                         "kill -9 + harness": lambda: kill_with_harness(study),
                         "line deleted": lambda: line_deleted(study, ref),
                         "disk full at start": lambda: disk_full_at_start(study),
                         "disk full mid-study": lambda: disk_full_mid_study(study),
                         "paused copy": lambda: paused_copy(study),
                         "Ctrl-C, MLflow busy": lambda: ctrl_c_mlflow_busy(study)}[case]()
            row = {"fault": case, "searcher": searcher, "tries": tries, **audit(study, ref),
                   "minutes": round((time.time() - started) / 60, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for searcher, ref in references.items():  # the control: the uninterrupted studies themselves
            rows.append({"fault": "none (uninterrupted)", "searcher": searcher, "tries": 0, **audit(ref, None),
                         "minutes": ""})
    finally:
        for path in _MOUNTED:
            subprocess.run(["umount", "-l", str(path)], check=False)
    columns = ("fault", "searcher", "tries", "lost", "duplicated", "orphaned", "wrong status", "exact", "exit code",
               "MLflow equal")
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|-" + "-|-".join("-" * widths[c] for c in columns) + "-|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c)).ljust(widths[c]) for c in columns) + " |")
    for r in rows:
        if r["orphans"]:
            print(f"  {r['fault']} / {r['searcher']} left: {r['orphans']}")
    print(f"studies in {base}")


if __name__ == "__main__":
    main()
