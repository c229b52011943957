"""End-to-end studies on real parts: `python run.py`, real tiny training, real MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from study.journal import Journal, JournalState
from tests.conftest import ROOT, TINY, MlflowServer, run_arena, sqlite_uri

RESULT_METRICS = {"val_bpb", "t_submitted_s", "t_started_s", "t_finished_s", "train/loss"}
RESULT_TAGS = {"training_seconds", "total_seconds", "num_steps", "tokens", "num_params", "queue_seconds"}


def study_runs(uri: str, experiment: str = "autoresearch-arena"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("arena.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("arena.kind") == "trial"]
    return client, parents, children


def check_study(workdir: Path, name: str, uri: str, n_trials: int, searcher: str):
    study_dir = workdir / "studies" / name
    js = JournalState.load(study_dir / "journal.jsonl")
    assert len(js.results) == n_trials and not js.in_flight()
    for trial, result in js.finished():
        d = Path(trial.directory)
        assert (d / "train.py").read_text() == trial.candidate.source
        for f in ("trial.json", "result.json", "run.log"):
            assert (d / f).exists(), f"{trial.trial_id} lacks {f}"
    ok = [r for r in js.results.values() if r.ok]
    assert ok, "no trial succeeded"
    best = min(ok, key=lambda r: r.val_bpb)
    assert (study_dir / "best_train.py").exists()
    assert json.loads((study_dir / "best" / "result.json").read_text())["val_bpb"] == best.val_bpb

    client, parents, children = study_runs(uri)
    [parent] = [p for p in parents if p.info.run_name == name]
    for tag in ("searcher", "launcher", "slots", "objective", "seed", "git_sha", "time_mode"):
        assert tag in parent.data.tags
    assert parent.data.tags["searcher"] == searcher
    mine = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["arena.trial_id"] for c in mine) == sorted(js.results)
    for child in mine:
        tid = child.data.tags["arena.trial_id"]
        result = js.results[tid]
        assert child.data.tags["status"] == result.status
        for tag in ("device", "host", "searcher", "device_kind", "slot"):
            assert tag in child.data.tags
        assert "hypothesis" in child.data.params and "parent_trial" in child.data.params
        assert any(k.startswith("knob.") for k in child.data.params)
        if result.ok:
            assert RESULT_METRICS <= set(child.data.metrics), RESULT_METRICS - set(child.data.metrics)
            assert RESULT_TAGS <= set(child.data.tags), RESULT_TAGS - set(child.data.tags)
            assert child.data.metrics["val_bpb"] == pytest.approx(result.val_bpb)
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"train.py", "train_diff.txt", "train_diff.html", "run_tail.txt"} <= names
    staircase = client.get_metric_history(parent.info.run_id, "best_val_bpb")
    values = [m.value for m in sorted(staircase, key=lambda m: m.step)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(best.val_bpb)
    return js


@pytest.mark.parametrize("searcher", ["tpe", "grid", "greedy"])
def test_each_searcher_end_to_end_on_two_cpu_slots(tmp_path, searcher):
    uri = sqlite_uri(tmp_path)
    proc = run_arena(tmp_path, *TINY, f"searcher={searcher}", "launcher.slots=2", "study.max_trials=4",
                     f"mlflow.tracking_uri={uri}")
    name = f"{searcher}-local-tiny-s0"
    js = check_study(tmp_path, name, uri, 4, searcher)
    slots = Counter(t.slot for t, _ in js.finished())
    assert set(slots) == {"cpu0", "cpu1"}, "both slots should have run trials"
    assert "best:" in proc.stdout and "mlflow ui" in proc.stdout


def test_against_a_real_mlflow_server(tmp_path, mlflow_server):
    run_arena(tmp_path, *TINY, "launcher.slots=2", "study.max_trials=3", f"mlflow.tracking_uri={mlflow_server.uri}")
    check_study(tmp_path, "tpe-local-tiny-s0", mlflow_server.uri, 3, "tpe")


def _start(tmp_path, *overrides):
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={tmp_path}/outputs/run"]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_then_same_command_resumes_without_rerunning(tmp_path):
    uri = sqlite_uri(tmp_path)
    args = [*TINY, "objective.budget=60", "launcher.slots=2", "study.max_trials=6", f"mlflow.tracking_uri={uri}"]
    journal = tmp_path / "studies" / "tpe-local-tiny-s0" / "journal.jsonl"
    orchestrator = _start(tmp_path, *args)

    def mid_study():
        js = JournalState.load(journal)
        return len(js.results) >= 2 and len(js.in_flight()) >= 1

    _wait_for(mid_study, 240, "two finished trials and one in flight")
    before = JournalState.load(journal)
    finished_before = dict(before.results)
    in_flight_before = {t.trial_id for t in before.in_flight()}
    os.kill(orchestrator.pid, signal.SIGKILL)
    orchestrator.wait()

    run_arena(tmp_path, *args)
    after = JournalState.load(journal)
    assert len(after.results) == 6 and not after.in_flight()
    for tid, result in finished_before.items():  # nothing that finished was lost or changed
        assert after.results[tid].to_dict() == result.to_dict()
    events = Journal.read(journal)
    submissions = Counter(e["trial"]["trial_id"] for e in events if e["event"] == "submitted")
    for tid in finished_before:
        assert submissions[tid] == 1, f"{tid} finished before the kill but was submitted again"
    adopted = {e["trial_id"] for e in events if e["event"] == "adopted"}
    rerun = {e["trial"]["trial_id"] for e in events if e["event"] == "resubmitted"}
    assert in_flight_before <= adopted | rerun
    told = [e for e in events if e["event"] == "finished"]
    assert len({e["trial_id"] for e in told}) == len(told) == 6
    _, parents, children = study_runs(uri)
    assert len(parents) == 1
    assert sorted(c.data.tags["arena.trial_id"] for c in children) == sorted(after.results)


def test_tracking_server_down_mid_study_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path).start()
    args = [*TINY, "objective.budget=40", "launcher.slots=2", "study.max_trials=6",
            f"mlflow.tracking_uri={server.uri}", "mlflow.flush_timeout_s=5"]
    journal = tmp_path / "studies" / "tpe-local-tiny-s0" / "journal.jsonl"
    orchestrator = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path}/outputs/run"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(JournalState.load(journal).results) >= 1, 240, "a first result")
        server.stop()
        out, err = orchestrator.communicate(timeout=300)
        assert orchestrator.returncode == 0, err[-3000:]
        js = JournalState.load(journal)
        assert len(js.results) == 6, "the study must go on without its tracking server"
        assert "re-run the same command to catch up" in err
        server.start()
        run_arena(tmp_path, *args)  # same command: nothing left to run, the mirror catches up
        js2 = JournalState.load(journal)
        assert js2.results.keys() == js.results.keys()
        _, parents, children = study_runs(server.uri)
        assert len(parents) == 1
        assert sorted(c.data.tags["arena.trial_id"] for c in children) == sorted(js.results)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        server.stop()


@pytest.mark.parametrize("overrides, message", [
    (["searcher=nope"], "searcher"),
    (["objective.budget=0"], "objective.budget must be a number > 0"),
    (["objective.budget_kind=minutes"], "objective.budget_kind"),
    (["launcher.slots=0"], "slots"),
    (["objective.knobs.DEPTH=deep"], "DEPTH"),
    (["objective.knobs.NOT_A_KNOB=3"], "NOT_A_KNOB"),
    (["+space.NOT_A_KNOB={type:int,low:1,high:3,levels:[1,2]}"], "NOT_A_KNOB"),
    (["mlflow.tracking_uri=http://127.0.0.1:9"], "MLflow tracking URI"),
])
def test_bad_input_fails_in_one_line_before_any_trial(tmp_path, overrides, message):
    proc = run_arena(tmp_path, *TINY, *overrides, f"mlflow.tracking_uri={sqlite_uri(tmp_path)}"
                     if not any(o.startswith("mlflow.") for o in overrides) else "progress=false",
                     check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("studies/*/trials/*")), "no trial may start on bad input"


def test_the_same_name_with_another_slot_count_is_refused_not_resumed(tmp_path):
    """A 1-slot and a 2-slot run of one searcher and seed share the default study name; resuming
    one with the other would silently mix two arms of a scaling experiment."""
    uri = sqlite_uri(tmp_path)
    run_arena(tmp_path, *TINY, "study.max_trials=1", "launcher.slots=1", f"mlflow.tracking_uri={uri}")
    proc = run_arena(tmp_path, *TINY, "study.max_trials=2", "launcher.slots=2", f"mlflow.tracking_uri={uri}",
                     check=False, timeout=120)
    assert proc.returncode != 0 and "slots 1 -> 2" in proc.stderr and "study.name" in proc.stderr, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("studies/*/trials/*"))) == 1


def test_multirun_ablation_gives_each_study_its_own_parent_run(tmp_path):
    uri = sqlite_uri(tmp_path)
    run_arena(tmp_path, "-m", "searcher=tpe,greedy", *TINY, "study.max_trials=1", "launcher.slots=1",
              f"mlflow.tracking_uri={uri}")
    _, parents, children = study_runs(uri)
    assert sorted(p.info.run_name for p in parents) == ["greedy-local-tiny-s0", "tpe-local-tiny-s0"]
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {
        p.info.run_id for p in parents}


def test_cfg_job_shows_the_resolved_config_without_running(tmp_path):
    proc = run_arena(tmp_path, "--cfg", "job", "searcher=grid", "objective=cpu")
    assert "_target_: searchers.grid.GridSearcher" in proc.stdout and "budget_kind: steps" in proc.stdout
    assert not (tmp_path / "studies").exists()
