"""A researcher's first hour: what `python run.py` says in a log, on a resume, on bad input, and
what MLflow shows afterwards. Real run.py processes, real tiny training, a real MLflow store."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from study.changes import knob_changes
from study.journal import JournalState
from study.loop import Running, StopRules, StudyState
from study.progress import parse_step_line, study_eta
from study.records import Candidate, Result, Trial
from tests.conftest import ROOT, run_arena, sqlite_uri

NAME = "tpe-local-tiny-s0"
# progress stays on (the default): the output is a pipe, so it must come as plain lines.
ARGS = ["objective=tiny", "launcher.slots=2"]
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One 3-trial study whose stdout is a pipe, as under nohup or a Slurm batch job."""
    workdir = tmp_path_factory.mktemp("first_hour")
    uri = sqlite_uri(workdir)
    proc = run_arena(workdir, *ARGS, "study.max_trials=3", f"mlflow.tracking_uri={uri}")
    return workdir, uri, proc


def test_piped_output_is_one_plain_line_per_event_then_a_plain_summary(study):
    workdir, _, proc = study
    out = proc.stdout
    assert not ANSI.search(out), "no terminal control codes in a log"
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    for trial_id in js.results:
        assert len(re.findall(rf"^\S+ \[ *\S+\] {trial_id} started on cpu\d", out, re.M)) == 1, out
        assert len(re.findall(rf"^\S+ \[ *\S+\] {trial_id} val_bpb \d\.\d{{4}}", out, re.M)) == 1, out
    assert "NEW BEST" in out and "done 3 of 3" in out
    summary = out[out.index(f"study {NAME}: top"):]
    assert re.search(r"^rank +trial +val_bpb", summary, re.M)
    best = min((r for r in js.results.values() if r.ok), key=lambda r: r.val_bpb)
    assert re.search(rf"^1 +t\d{{4}} +{best.val_bpb:.4f} ", summary, re.M), summary
    assert "diff -u" in summary and "best_train.py" in summary


def test_the_header_says_what_starts_and_how_many_trials_the_sampler_draws_at_random(study):
    _, _, proc = study
    assert f"starting {NAME}" in proc.stdout
    assert "the first 8 trials are drawn at random" in proc.stdout  # conf/searcher/tpe.yaml


def test_rerunning_a_finished_study_says_it_is_already_complete(study):
    workdir, uri, _ = study
    proc = run_arena(workdir, *ARGS, "study.max_trials=3", f"mlflow.tracking_uri={uri}")
    assert f"already complete: {NAME} has 3 of 3 trials done" in proc.stdout
    assert " started on " not in proc.stdout
    assert len(JournalState.load(workdir / "studies" / NAME / "journal.jsonl").results) == 3


def test_an_arm_with_more_trials_than_asked_is_refused_with_the_fix(study):
    workdir, uri, _ = study
    proc = run_arena(workdir, *ARGS, "study.max_trials=2", f"mlflow.tracking_uri={uri}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert "already holds 3 finished trials, more than study.max_trials=2" in line and "study.max_trials=3" in line


def test_a_resume_says_how_much_is_done(study):
    workdir, uri, _ = study
    proc = run_arena(workdir, *ARGS, "study.max_trials=4", f"mlflow.tracking_uri={uri}")
    assert f"resuming {NAME}: 3 of 4 done" in proc.stdout
    assert len(re.findall(r" started on cpu", proc.stdout)) == 1, "only the one new trial runs"


def test_child_runs_span_the_trial_and_carry_its_loss_curve_and_description(study):
    workdir, uri, _ = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    children = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'trial'")
    assert {c.data.tags["arena.trial_id"] for c in children} == set(js.results)
    for child in children:
        trial_id = child.data.tags["arena.trial_id"]
        trial, result = js.trials[trial_id], js.results[trial_id]
        assert child.info.start_time == int(result.started_at * 1000)
        assert child.info.end_time == int(result.finished_at * 1000)
        assert trial.candidate.hypothesis in child.data.tags["mlflow.note.content"]
        steps = [parse_step_line(line) for line in (Path(trial.directory) / "run.log").read_text().splitlines()]
        logged = [(int(s["step"]), s["loss"]) for s in steps if s]
        curve = client.get_metric_history(child.info.run_id, "train_loss")
        assert logged and sorted((m.step, m.value) for m in curve) == logged
        assert {"t_submitted_s", "t_started_s", "t_finished_s"} <= set(child.data.metrics)


def test_the_diff_against_the_baseline_is_an_artifact_the_ui_previews(study):
    workdir, uri, _ = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    changed = next(t for t in js.trials.values() if t.candidate.knobs.get("MATRIX_LR") not in (None, 0.04))
    [child] = client.search_runs([exp.experiment_id], f"tags.`arena.trial_id` = '{changed.trial_id}'")
    folder = Path(client.download_artifacts(child.info.run_id, "", str(workdir / "artifacts")))
    value = changed.candidate.knobs["MATRIX_LR"]
    assert f"+MATRIX_LR = {value}" in (folder / "train_diff.txt").read_text()
    html = (folder / "train_diff.html").read_text()
    text = re.sub(r"<[^>]+>", "", html).replace("&nbsp;", " ")
    assert "<table" in html and f"MATRIX_LR = {value}" in text, "the side-by-side diff shows the new line"
    assert value == float(f"{value:.4g}"), "sampled values are rounded to 4 significant digits"


def test_the_parent_run_holds_the_running_best_at_every_trial_and_the_best_code(study):
    workdir, uri, _ = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    [parent] = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    history = client.get_metric_history(parent.info.run_id, "best_val_bpb")
    by_step = {m.step: m.value for m in history}
    expected, best = {}, None
    for i, (_, result) in enumerate(js.finished()):
        if result.ok:
            best = result.val_bpb if best is None else min(best, result.val_bpb)
        if best is not None:
            expected[i] = best
    assert by_step == pytest.approx(expected)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_train.py", "leaderboard.txt"} <= names


def test_max_trials_zero_is_one_line_not_a_traceback(tmp_path):
    proc = run_arena(tmp_path, *ARGS, "study.max_trials=0", f"mlflow.tracking_uri={sqlite_uri(tmp_path)}",
                     check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: study.max_trials must be >= 1, not 0"


def test_a_bad_corpus_leaves_no_study_folder_and_no_mlflow_database(tmp_path):
    proc = run_arena(tmp_path, *ARGS, f"objective.corpus={tmp_path / 'no-such-corpus'}",
                     f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no-such-corpus" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_missing_slurm_leaves_no_study_folder_and_no_mlflow_database(tmp_path):
    proc = run_arena(tmp_path, *ARGS, "launcher=slurm", f"mlflow.tracking_uri={sqlite_uri(tmp_path)}",
                     check=False, timeout=120, env={"SLURM_CONF": str(tmp_path / "no-slurm.conf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "launcher slurm" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_failed_setup_keeps_a_database_another_study_made_and_wrote_meanwhile(tmp_path):
    """Two studies started at once on one local store: the one whose setup fails saw no database
    when it began, but by then the other had made it and started its runs; those are kept."""
    from study.lock import StudyLock
    from study.runner import ConfigError, _owned

    uri = sqlite_uri(tmp_path)
    with StudyLock(tmp_path / "studies" / "failing") as lock, pytest.raises(ConfigError):
        with _owned((tmp_path / "studies" / "failing").resolve(), uri, lock):  # makes and locks the folder
            other = mlflow.MlflowClient(uri)  # the other study, meanwhile
            run_id = other.create_run(other.create_experiment("other")).info.run_id
            raise ConfigError("launcher slurm: no cluster")
    assert (tmp_path / "mlflow.db").exists(), "the other study's runs were deleted"
    assert mlflow.MlflowClient(uri).get_run(run_id).info.run_id == run_id
    assert not (tmp_path / "studies").exists()


# -- the pieces, without a study ---------------------------------------------------------------

def test_knob_changes_show_old_and_new_values_shortest_first():
    assert knob_changes({"MATRIX_LR": 0.07363929961016057, "DEPTH": 3, "WARMDOWN_RATIO": 0.5},
                        {"MATRIX_LR": 0.025, "DEPTH": 2, "WARMDOWN_RATIO": 0.5}) == [
        "DEPTH 2→3", "MATRIX_LR 0.025→0.07364"]


def test_the_study_eta_spreads_the_remaining_trials_over_the_slots():
    def trial(i, submitted):
        return Trial(trial_id=f"t{i:04d}", index=i, candidate=Candidate(source=""), objective={},
                     submitted_at=submitted)

    state = StudyState(slots=[object(), object()], elapsed=100.0)
    state.history = [(trial(i, 0.0), Result(status="ok", val_bpb=1.0, started_at=0.0, finished_at=40.0))
                     for i in range(2)]
    state.running = {"t0002": Running(trial(2, 90.0), slot=None)}
    # slots free at 0 s and 30 s (the running trial's 40 s pace less its 10 s so far); 8 trials of
    # 40 s each go to whichever frees first: 4 after the free slot (160 s), 4 after the other (190 s)
    assert study_eta(state, StopRules(max_trials=11)) == pytest.approx(30 + 4 * 40)
    assert study_eta(state, StopRules(max_trials=11, max_hours=100 / 3600 + 60 / 3600)) == pytest.approx(60)
    assert study_eta(StudyState(elapsed=5.0), StopRules(max_trials=3)) is None


def test_the_harness_step_line_is_parsed_and_other_lines_are_not():
    assert parse_step_line("step=288 loss=4.1 progress=0.48 training_seconds=12.3") == {
        "step": 288.0, "loss": 4.1, "progress": 0.48, "training_seconds": 12.3}
    assert parse_step_line("stepping=3 progress=1") == {}
    assert parse_step_line(json.dumps({"step": 3})) == {}


def test_artifacts_of_a_local_store_land_beside_its_database_whatever_the_current_folder(tmp_path, monkeypatch):
    """MLflow's default for a sqlite store is ./mlruns of the folder the first study started from."""
    from study.mirror import Mirror

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}/mlflow.db"
    mirror = Mirror(uri, "artifacts-here", "sid", "study", "tpe", {}, {}, (ROOT / "train" / "train.py").read_text())
    mirror.check()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment(mirror.experiment_id).artifact_location == (store / "mlruns" / "artifacts-here").as_uri()
    run = client.create_run(mirror.experiment_id)
    (elsewhere / "note.txt").write_text("x")
    client.log_artifact(run.info.run_id, str(elsewhere / "note.txt"))
    assert (store / "mlruns" / "artifacts-here" / run.info.run_id / "artifacts" / "note.txt").exists()
    assert not (elsewhere / "mlruns").exists()
