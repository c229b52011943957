"""A resumed study proposes exactly what the uninterrupted one would, wherever the kill lands,
inside an ask included. Each kill is a real SIGKILL of a real process: a searcher process in the
middle of Optuna's ask (some parameters of the new trial written, or all of them but not yet
counted), or between the ask and the journal; and a real orchestrator killed inside an ask."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from study.journal import JournalState
from tests.conftest import ROOT, TINY, run_arena, sqlite_uri
from tests.test_reliability import journal_of, measured_once

SPACE = {"MATRIX_LR": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
         "WARMDOWN_RATIO": {"type": "float", "low": 0.1, "high": 0.9},
         "WEIGHT_DECAY": {"type": "float", "low": 0.0, "high": 0.4}}

# A study in miniature, as the loop runs it with one slot: ask one candidate, journal it, measure it
# (a fixed function of its knobs), journal the result, tell it. A restart replays the journal into a
# fresh searcher first, with the candidates journalled but not measured as in flight.
DRIVER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from searchers.optuna_search import OptunaSearcher
from study.core import SearchContext
from study.records import Result, Trial
from train.knobs import read_knobs

study_dir, sampler, total, kill_at, where = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
baseline = Path({train!r}).read_text()
journal = study_dir / "journal.jsonl"

if where == "mid-params":  # inside Optuna's ask: the new trial holds some of its parameters
    import optuna.storages._rdb.storage as rdb
    original = rdb.RDBStorage._set_trial_param  # what Optuna's cached storage calls per parameter
    def set_param_then_die(self, trial_id, name, *args, **kwargs):
        original(self, trial_id, name, *args, **kwargs)
        if self.get_trial_number_from_id(trial_id) == kill_at and name == "WARMDOWN_RATIO":
            os.kill(os.getpid(), signal.SIGKILL)
    rdb.RDBStorage._set_trial_param = set_param_then_die
elif where == "before-count":  # the trial is whole, but the checkpoint after the ask is not written
    import searchers.optuna_search as os_
    original = os_.SamplerCheckpoint.save
    calls = []
    def save_or_die(self, sampler_, trials):
        if len(trials) == kill_at + 1 and calls:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(len(trials))
        original(self, sampler_, trials)
    os_.SamplerCheckpoint.save = save_or_die

searcher = OptunaSearcher(name=sampler, sampler=sampler, options={{"n_startup_trials": 3}} if sampler != "random" else {{}})
ctx = SearchContext(baseline_source=baseline, baseline_knobs=read_knobs(baseline), space={space!r}, seed=0,
                    study_dir=str(study_dir), objective={{}})
searcher.setup(ctx)
records = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
submitted = [Trial.from_dict(r["trial"]) for r in records if r["event"] == "submitted"]
results = {{r["trial_id"]: Result.from_dict(r["result"]) for r in records if r["event"] == "finished"}}
for trial in submitted:
    if trial.trial_id in results:
        searcher.tell(trial, results[trial.trial_id])
ctx.in_flight = [t for t in submitted if t.trial_id not in results]

def log(record):
    with open(journal, "a") as f:
        f.write(json.dumps(record) + "\\n")

pending = list(ctx.in_flight)
while len(submitted) < total or pending:
    if not pending:
        [candidate] = searcher.ask(1, ctx)
        if where == "before-journal" and len(submitted) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        trial = Trial(trial_id=f"t{{len(submitted):04d}}", index=len(submitted), candidate=candidate, objective={{}})
        log({{"event": "submitted", "trial": trial.to_dict()}})
        submitted.append(trial)
        pending = [trial]
    trial = pending.pop()
    k = trial.candidate.knobs
    result = Result(status="ok", val_bpb=1.0 + abs(k["MATRIX_LR"] - 0.04) + (k["WARMDOWN_RATIO"] - 0.3) ** 2)
    log({{"event": "finished", "trial_id": trial.trial_id, "result": result.to_dict()}})
    searcher.tell(trial, result)
print(json.dumps([t.candidate.knobs for t in submitted]))
"""


def run_driver(tmp_path: Path, study_dir: Path, sampler: str, total: int, kill_at: int = -1,
               where: str = "none") -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), train=str(ROOT / "train" / "train.py"), space=SPACE))
    study_dir.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(driver), str(study_dir), sampler, str(total), str(kill_at), where],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
@pytest.mark.parametrize("where, kill_at", [
    ("mid-params", 4), ("before-count", 4), ("before-journal", 4),  # trial 4: past the start-up, in the model
    ("mid-params", 0), ("before-count", 0),  # trial 0: the enqueued baseline, popped from Optuna's queue
])
def test_a_kill_inside_an_ask_costs_nothing_the_resumed_study_proposes_what_the_uninterrupted_one_does(
        tmp_path, sampler, where, kill_at):
    total = 7
    uninterrupted = run_driver(tmp_path, tmp_path / "whole", sampler, total)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed = run_driver(tmp_path, tmp_path / "killed", sampler, total, kill_at, where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_driver(tmp_path, tmp_path / "killed", sampler, total)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout) == json.loads(uninterrupted.stdout)
    assert "reseeded" not in resumed.stderr and "fresh streams" not in resumed.stderr


def test_a_resumed_gp_study_says_in_one_line_that_it_cannot_be_exact(tmp_path):
    study_dir = tmp_path / "gp"
    first = run_driver(tmp_path, study_dir, "gp", 3)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_driver(tmp_path, study_dir, "gp", 4)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in again.stderr.splitlines() if "optuna gp" in line]
    assert len(lines) == 1 and "may differ from an uninterrupted study" in lines[0], again.stderr[-2000:]


# -- a real orchestrator killed inside an ask -----------------------------------------------------
KILL_IN_ASK = """
import os, signal, sys
sys.path.insert(0, {root!r})
import optuna.storages._rdb.storage as rdb
original = rdb.RDBStorage._set_trial_param  # what Optuna's cached storage calls per parameter
def set_param_then_die(self, trial_id, name, *args, **kwargs):
    original(self, trial_id, name, *args, **kwargs)
    if self.get_trial_number_from_id(trial_id) == 3:  # the fourth ask, after its first parameter
        os.kill(os.getpid(), signal.SIGKILL)
rdb.RDBStorage._set_trial_param = set_param_then_die
sys.argv[0] = {run!r}
import runpy
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_an_orchestrator_killed_inside_an_ask_resumes_into_the_uninterrupted_studys_candidates(tmp_path):
    """One slot: the searcher asks right after every result, the natural moment for a kill. Before,
    the half-made trial was failed and the sampler reseeded, and every later candidate differed."""
    args = [*TINY, "launcher.slots=1", "study.max_trials=5", "searcher.options.n_startup_trials=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for folder in (whole, killed):
        folder.mkdir()
    run_arena(whole, *args, f"mlflow.tracking_uri={sqlite_uri(whole)}", timeout=900)

    driver = killed / "driver.py"
    driver.write_text(KILL_IN_ASK.format(root=str(ROOT), run=str(ROOT / "run.py")))
    proc = subprocess.run([sys.executable, str(driver), *args, f"mlflow.tracking_uri={sqlite_uri(killed)}",
                           f"hydra.run.dir={killed}/outputs/run"], cwd=killed, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(JournalState.load(journal_of(killed, "tpe-local-tiny-s0")).results) == 3, "the kill must land in the 4th ask"
    run_arena(killed, *args, f"mlflow.tracking_uri={sqlite_uri(killed)}", timeout=900)

    def proposals(workdir):
        js = JournalState.load(journal_of(workdir, "tpe-local-tiny-s0"))
        measured_once(js, 5)
        return [(t.candidate.knobs, r.val_bpb) for t, r in js.finished()]

    assert proposals(killed) == proposals(whole)
