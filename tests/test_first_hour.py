"""A researcher's first hour: what `python run.py` says in a log, on a resume, on bad input, and
what MLflow shows afterwards. Real run.py processes, real tiny training, a real MLflow store."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from study.changes import knob_changes
from study.clock import StudyClock
from study.journal import Journal, JournalState
from study.loop import Running, StopRules, StudyState
from study.progress import parse_step_line, study_eta
from study.records import Candidate, Result, Trial, exception_line
from tests.conftest import ROOT, TINY, free_port, run_arena, sqlite_uri

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


def test_a_study_shorter_than_the_sampler_start_up_is_warned_in_one_line_with_the_fix(study):
    """3 trials of TPE with 8 random start-up trials is random search under another name."""
    _, _, proc = study
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert "study.max_trials=3 leaves tpe no modelled trial" in line and "random search" in line
    assert "study.max_trials > 8" in line and "searcher.options.n_startup_trials < 3" in line
    assert "next: all 3 trials were drawn at random" in proc.stdout


def test_the_readme_ablation_gives_tpe_trials_to_model():
    """The README's `-m searcher=tpe,...` example must give TPE at least as many modelled trials as
    random ones (with 12 trials and a start-up of 8 it had 4)."""
    from hydra import compose, initialize_config_dir

    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if "run.py -m searcher=tpe" in line)
    overrides = [a for a in line.split("#")[0].split()[2:] if "=" in a and not a.startswith(("-", "searcher=", "seed="))]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["searcher=tpe", *overrides])
    assert cfg.study.max_trials >= 2 * cfg.searcher.options.n_startup_trials, line


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
        assert child.info.run_name == child.data.tags["mlflow.runName"] == f"{NAME}/{trial_id}"
        assert child.info.start_time == int(result.started_at * 1000)
        assert child.info.end_time == int(result.finished_at * 1000)
        assert trial.candidate.hypothesis in child.data.tags["mlflow.note.content"]
        steps = [parse_step_line(line) for line in (Path(trial.directory) / "run.log").read_text().splitlines()]
        logged = [(int(s["step"]), s["loss"]) for s in steps if s]
        curve = client.get_metric_history(child.info.run_id, "train/loss")
        assert logged and sorted((m.step, m.value) for m in curve) == logged


def test_a_trial_run_leads_with_its_loss_curve_and_keeps_single_values_off_the_charts(study):
    """The run page draws one chart per metric, alphabetically, prefixed sections (`train/`) above
    the unprefixed "Model metrics": only the loss curve and what analysis/ reads stay metrics; every
    other number is a tag of the same name and in result.json."""
    workdir, uri, _ = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    for child in client.search_runs([client.get_experiment_by_name("autoresearch-arena").experiment_id],
                                    "tags.`arena.kind` = 'trial'"):
        result = js.results[child.data.tags["arena.trial_id"]]
        trial = js.trials[child.data.tags["arena.trial_id"]]
        assert set(child.data.metrics) == {"train/loss", "val_bpb", "t_submitted_s", "t_started_s", "t_finished_s"}
        for name in ("training_seconds", "total_seconds", "num_steps", "tokens", "num_params", "queue_seconds"):
            assert float(child.data.tags[name]) == pytest.approx(getattr(result, name)), name
        matrix_lr = trial.candidate.knobs["MATRIX_LR"]
        if matrix_lr != 0.04:
            assert f"MATRIX_LR 0.04→{matrix_lr:.4g}" in child.data.tags["changes"]
        else:
            assert child.data.tags["changes"] == trial.candidate.hypothesis == "TPE #0: baseline values"
        folder = Path(client.download_artifacts(child.info.run_id, "result.json", str(workdir / "dl" / child.info.run_id)))
        assert json.loads(folder.read_text())["val_bpb"] == result.val_bpb


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
    text = re.sub(r"<[^>]+>", "", html)
    assert "<table" in html and f"MATRIX_LR = {value}" in text, "the side-by-side diff shows the new line"
    assert "nowrap" not in html and "&nbsp;" not in html, "lines wrap at the width the preview gives"
    assert value == float(f"{value:.4g}"), "sampled values are rounded to 4 significant digits"


def test_the_parent_run_draws_the_running_best_as_steps_and_holds_the_best_code(study):
    """MLflow joins a metric's points in (step, timestamp) order: where a trial improves the best,
    the old and the new best share its step, so the line drops straight down."""
    workdir, uri, _ = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    [parent] = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    history = sorted(client.get_metric_history(parent.info.run_id, "best_val_bpb"), key=lambda m: (m.step, m.timestamp))
    expected, best = [], None
    for i, (_, result) in enumerate(js.finished()):
        new = result.val_bpb if result.ok and (best is None or result.val_bpb < best) else best
        if best is not None and new != best:
            expected.append((i, best))
        if new is not None:
            expected.append((i, new))
        best = new
    assert [m.step for m in history] == [step for step, _ in expected]
    assert [m.value for m in history] == pytest.approx([value for _, value in expected])
    assert parent.data.metrics["best_val_bpb"] == pytest.approx(best), "the latest value is the best"
    for a, b in zip(history, history[1:]):
        assert a.value == b.value or a.step == b.step, "every segment is flat or vertical: a staircase"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_train.py", "leaderboard.txt", "running_best.png"} <= names


def test_the_printed_link_opens_a_saved_view_of_the_trials_ranked_by_val_bpb(study):
    """What MLflow 3.17's runs page reads: the experiment tag `mlflow.sharedViewState.<id>` (a
    saved view: name, createdAt, state) named by the link's `viewStateShareKey`, and
    `workflowType=machine_learning` for the training sidebar instead of the GenAI one."""
    workdir, uri, proc = study
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    [link] = re.findall(r"open (http://\S+)", proc.stdout)
    assert link == (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                    f"?viewStateShareKey=arena-{NAME}&workflowType=machine_learning")
    view = json.loads(exp.tags[f"mlflow.sharedViewState.arena-{NAME}"])
    assert view["name"] == f"{NAME}: trials by val_bpb" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`val_bpb`" and state["orderByAsc"] is True
    assert state["selectedColumns"][:4] == ["metrics.`val_bpb`", "tags.`status`", "tags.`changes`", "params.`hypothesis`"]
    assert state["columnOrder"] == state["selectedColumns"]
    shown = client.search_runs([exp.experiment_id], state["searchFilter"], order_by=["metrics.val_bpb ASC"])
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    assert [r.data.tags["arena.trial_id"] for r in shown] == [
        t for t, _ in sorted(js.results.items(), key=lambda kv: kv[1].score())], "this study's trials, best first"


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


# -- 6. what the study learned ------------------------------------------------------------------

def test_the_end_of_a_study_says_what_search_found_which_knobs_mattered_and_what_next(study):
    workdir, _, proc = study
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    base = js.results["t0000"].val_bpb  # TPE's trial 0 is the baseline
    best_id, best = min(((t, r) for t, r in js.results.items() if r.ok), key=lambda kv: kv[1].val_bpb)
    [verdict] = [line for line in proc.stdout.splitlines() if line.startswith("search: ")]
    if best_id == "t0000":
        assert f"no candidate beat the baseline ({base:.4f}); the best, t0000 ({base:.4f}), is the baseline itself" \
            in verdict
    else:
        assert f"{best_id} ({best.val_bpb:.4f}) beats the baseline ({base:.4f}) by {base - best.val_bpb:.4f}" in verdict
        assert "noise floor not measured for the tiny preset" in verdict and "python -m analysis.noise objective=tiny" in verdict
    assert "knobs that mattered: too few scored trials (3; Optuna's importance needs 10) to say" in proc.stdout
    board = (workdir / "studies" / NAME / "leaderboard.txt").read_text()
    assert verdict in board, "the parent run's description and artifact say it too"
    figure = workdir / "studies" / NAME / "running_best.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_an_optuna_study_the_knobs_that_mattered_are_an_effect_table(study):
    """The real trials of the study, as a non-Optuna searcher would have run them."""
    from study.findings import knobs_that_mattered
    from study.baseline import baseline_score
    from train.knobs import read_knobs

    workdir, _, _ = study
    js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
    source = (workdir / "studies" / NAME / "baseline_train.py").read_text()
    history = js.finished()
    base = baseline_score(history, source)
    lines = knobs_that_mattered([(t, r) for t, r in history if r.ok], base, source, read_knobs(source))
    assert lines[0].startswith("knobs that mattered (gain in val_bpb over the baseline")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    gains = [base[0] - r.val_bpb for t, r in history if r.ok and t.trial_id != "t0000"]
    for knob, (trials, best_gain, mean_gain) in rows.items():
        assert int(trials) == len(gains), "every TPE candidate sets every knob of the space"
        assert float(best_gain) == pytest.approx(max(gains), abs=1e-4)
        assert float(mean_gain) == pytest.approx(sum(gains) / len(gains), abs=1e-4)


def test_the_knobs_that_mattered_come_from_optunas_importance_evaluator():
    """A real Optuna study where only one knob moves the score: the evaluator ranks it first."""
    import optuna

    from study.findings import knobs_that_mattered

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("MATRIX_LR", 0, 1) - 0.3) ** 2 + 0 * t.suggest_float("WEIGHT_DECAY", 0, 1),
                   n_trials=40)
    [line] = knobs_that_mattered([], None, "", {}, optuna_study=study)
    assert line.startswith("knobs that mattered (Optuna's PED-ANOVA importance over 40 scored trials): MATRIX_LR ")
    few = optuna.create_study()
    few.optimize(lambda t: t.suggest_float("MATRIX_LR", 0, 1), n_trials=3)
    assert knobs_that_mattered([], None, "", {}, optuna_study=few) == [
        "knobs that mattered: too few scored trials (3; Optuna's importance needs 10) to say"]


def test_a_gain_is_judged_against_the_measured_noise_floor():
    """2σ√2: the spread of the difference of two single runs, as the agent's keep rule uses."""
    from study.findings import Floor, learn

    def trial(i, source, knobs):
        return Trial(trial_id=f"t{i:04d}", index=i, candidate=Candidate(source=source, knobs=knobs), objective={})

    history = [(trial(0, "base", {"LR": 1}), Result(status="ok", val_bpb=1.80, finished_at=10.0)),
               (trial(1, "cand", {"LR": 2}), Result(status="ok", val_bpb=1.78, finished_at=20.0))]
    common = dict(baseline_source="base", baseline_knobs={"LR": 1}, preset="cpu")
    within = learn(history, history[1], floor=Floor(0.01, "measured on cpu/cpu"), **common)
    beyond = learn(history, history[1], floor=Floor(0.005), **common)
    assert "within noise (margin 2σ√2 = 0.0283, σ = 0.0100; measured on cpu/cpu)" in within.lines[0]
    assert "beyond noise (margin 2σ√2 = 0.0141" in beyond.lines[0]
    assert within.tags["verdict"] == "within noise" and beyond.tags["verdict"] == "beyond noise"
    assert any(line.startswith("next: confirm it on more seeds") for line in beyond.lines) is False  # no study_dir


def test_after_ctrl_c_the_summary_says_the_same_command_resumes(tmp_path):
    args = [*TINY, "objective.budget=40", "launcher.slots=1", "study.max_trials=4",
            f"mlflow.tracking_uri={sqlite_uri(tmp_path)}"]
    journal = tmp_path / "studies" / NAME / "journal.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (journal.exists() and JournalState.load(journal).trials):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "an interrupted study exits as a Ctrl-C does: `run.py && next` stops"
    [line] = [line for line in out.splitlines() if line.startswith("interrupted: ")]
    typed = os.path.relpath(sys.executable, tmp_path) if Path(sys.executable).is_relative_to(tmp_path) else sys.executable
    assert line.endswith("the same command resumes the study: " + " ".join([typed, str(ROOT / "run.py"), *args])), line


# -- 2. a failing baseline stops the study at once ------------------------------------------------

def test_a_failing_baseline_stops_the_study_at_once_with_its_exception_line(tmp_path):
    """`objective.knobs.DEPTH=-2` ran every trial, each crashed, and the study exited 0 with
    "Traceback (most recent call last): ..." as every reason. No Hydra run-dir override here: the
    study leaves nothing outside its own folder either (point 9)."""
    uri = sqlite_uri(tmp_path)
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, "objective.knobs.DEPTH=-2", "launcher.slots=2",
           "study.max_trials=6", f"mlflow.tracking_uri={uri}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    expected = ("error: the baseline (t0000) ended crash: RuntimeError: Trying to create tensor with negative "
                "dimension -64: [512, -64]; the study stopped, since every candidate starts from that code. "
                f"Fix it, then start over (another study.name, or remove {tmp_path / 'studies' / NAME})")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    js = JournalState.load(tmp_path / "studies" / NAME / "journal.jsonl")
    events = [r["event"] if r["event"] != "finished" else ("finished", r["trial_id"]) for r in
              Journal.read(tmp_path / "studies" / NAME / "journal.jsonl")]
    after = events[events.index(("finished", "t0000")):]
    assert "submitted" not in after, "nothing was submitted after the baseline failed"
    assert js.results["t0000"].status == "crash"
    assert all(t == "t0000" or r.status != "ok" for t, r in js.results.items())
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    [parent] = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")
    assert parent.info.status == "FAILED" and parent.data.tags["stop_kind"] == "baseline_failed"
    [child] = client.search_runs([exp.experiment_id], "tags.`arena.trial_id` = 't0000'")
    assert child.data.tags["reason"] == "RuntimeError: Trying to create tensor with negative dimension -64: [512, -64]"
    board = (tmp_path / "studies" / NAME / "leaderboard.txt").read_text()
    assert "t0000 crash: RuntimeError: Trying to create tensor with negative dimension" in board
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlruns", "studies"], "no outputs/ folder"

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [expected], "a resume is refused at once"
    assert len(JournalState.load(tmp_path / "studies" / NAME / "journal.jsonl").trials) == len(js.trials)


def test_a_harness_killed_outright_on_the_baseline_is_not_the_baseline_failing(tmp_path):
    """A harness that wrote no result (killed by an operator, the OOM killer or the launcher's
    backstop) never judged the code: the study goes on; the harness's own verdict stops it."""
    from launchers.base import read_result
    from study.baseline import failed_baseline

    source = "KNOB = 1\n"
    baseline = Trial(trial_id="t0000", index=0, candidate=Candidate(source=source), objective={},
                     directory=str(tmp_path))
    killed = read_result(tmp_path, reason="the harness ended (killed by SIGKILL) without a result.json")
    assert killed.status == "crash" and "no_harness_verdict" not in killed.numbers()
    assert failed_baseline([(baseline, killed)], source) is None
    again = Result.from_dict(json.loads(json.dumps(killed.to_dict())))  # as the journal hands it back on resume
    assert failed_baseline([(baseline, again)], source) is None
    judged = Result(status="crash", error="RuntimeError: negative dimension")
    assert failed_baseline([(baseline, killed), (baseline, judged)], source) == (baseline, judged)
    other = Trial(trial_id="t0001", index=1, candidate=Candidate(source="KNOB = 2\n"), objective={},
                  directory=str(tmp_path))
    assert failed_baseline([(other, judged)], source) is None, "only the baseline's own code stops a study"


def test_a_crash_reason_is_the_exception_line_not_the_traceback_header():
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise ValueError("the model is too deep\nsecond line of the message") from e
    except ValueError:
        import traceback

        text = traceback.format_exc()
    assert text.startswith("Traceback (most recent call last):")
    assert exception_line(text) == "ValueError: the model is too deep"
    cut = text[text.index("  File") + 9:]  # the worker keeps a traceback's last 4000 characters
    assert exception_line(cut) == "ValueError: the model is too deep", "a tail cut from a long traceback"
    assert exception_line("train.py does not define train()") == "train.py does not define train()"
    assert Result(status="crash", error=text).why() == "ValueError: the model is too deep"
    assert Result(status="timeout", reason="killed  past\nthe limit", error=text).why() == "killed past the limit"


# -- 3. every config mistake in one line, before any compute ----------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("searcher=tpee", "error: unknown searcher 'tpee' (did you mean tpe?); choose one of: {searcher}"),
    ("launcher=slrum", "error: unknown launcher 'slrum' (did you mean slurm?); choose one of: {launcher}"),
    ("objective=cpuu", "error: unknown objective 'cpuu' (did you mean cpu?); choose one of: {objective}"),
    ("+experiment=searcherz", "error: unknown experiment 'searcherz' (did you mean searchers?); choose one of: {experiment}"),
    ("study.max_trail=3", "error: unknown setting study.max_trail (did you mean study.max_trials?); "
                          "to add a setting of your own write +study.max_trail=..."),
])
def test_a_config_mistake_is_one_line_naming_the_valid_choices(tmp_path, override, expected):
    choices = {group: ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
               for group in ("searcher", "launcher", "objective", "experiment")}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), override], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [expected.format(**choices)], proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing made, nothing run"


@pytest.mark.parametrize("where", ["under /proc", "under a file"])
def test_an_unwritable_mlflow_store_is_named_in_one_line_within_seconds(tmp_path, where):
    """MLflow retried such a store for 128 s, then printed a 187-line SQLAlchemy traceback. The
    subprocess timeout is a guard, far above what the check takes and far below MLflow's retries."""
    (tmp_path / "a-file").write_text("")
    db = "/proc/arena/mlflow.db" if where == "under /proc" else f"{tmp_path}/a-file/mlflow.db"
    proc = run_arena(tmp_path, *TINY, f"mlflow.tracking_uri=sqlite:///{db}", check=False, timeout=90)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith(f"error: MLflow tracking URI 'sqlite:///{db}' is not usable: ")
    assert not (tmp_path / "studies").exists()


def test_an_unreachable_tracking_server_is_named_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_arena(tmp_path, *TINY, f"mlflow.tracking_uri={uri}", check=False, timeout=90)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow tracking URI '{uri}' is not usable: no answer from the server (Connection refused)"]


def test_a_sweep_leaves_no_outputs_or_multirun_folder_where_it_started(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *TINY, "study.max_trials=0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: study.max_trials must be >= 1, not 0"
    assert [p.name for p in tmp_path.iterdir()] == ["studies"]
    [sweep] = (tmp_path / "studies" / ".sweeps").iterdir()
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"], "the sweep keeps only what it ran"


# -- 5. one study time ------------------------------------------------------------------------------

def test_study_time_leaves_the_idle_gap_between_sessions_out_everywhere_and_shows_it_apart(tmp_path):
    """A study of 2 trials, then (after an idle gap of at least GAP seconds) the same command with
    one more trial: the summary, the live lines, the MLflow parent's duration and metrics, the
    trial clock metrics and analysis/ agree on one study time."""
    from analysis.load import load

    gap = 15
    uri = sqlite_uri(tmp_path)
    args = [*TINY[:1], "launcher.slots=1", f"mlflow.tracking_uri={uri}"]
    run_arena(tmp_path, *args, "study.max_trials=2")
    time.sleep(gap)
    second = run_arena(tmp_path, *args, "study.max_trials=3")
    journal = tmp_path / "studies" / NAME / "journal.jsonl"
    records = Journal.read(journal)
    clock = StudyClock.from_journal(records, simulated=False)
    assert clock.idle >= gap and len(clock.gaps) == 1
    resumed_at = next(r["wall_time"] for r in records if r["event"] == "resumed")

    summary = next(line for line in second.stdout.splitlines() if line.startswith("statuses:"))
    amount = r"[\d.]+ ?(s|min)"
    assert re.search(rf"study time: {amount} \(\+{amount} idle between sessions\)", summary), summary
    live = [line for line in second.stdout.splitlines() if " t0002 val_bpb " in line]
    assert live and re.search(rf"elapsed {amount} \(\+{amount} idle\)", live[0]), live

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("autoresearch-arena")
    [parent] = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")
    study_seconds = parent.data.metrics["wall_seconds"]
    assert parent.data.metrics["idle_seconds"] == pytest.approx(clock.idle, abs=1e-3)
    assert parent.info.end_time - parent.info.start_time == pytest.approx(study_seconds * 1000, abs=2)
    assert parent.info.start_time == int(clock.origin * 1000)
    js = JournalState.load(journal)
    [t2] = client.search_runs([exp.experiment_id], "tags.`arena.trial_id` = 't0002'")
    submitted = t2.data.metrics["t_submitted_s"]
    assert submitted == pytest.approx(clock.since_start(js.trials["t0002"].submitted_at), abs=1e-6)
    assert submitted <= js.trials["t0002"].submitted_at - gap, "the idle gap is not study time"
    assert resumed_at - clock.origin - clock.idle <= submitted
    assert t2.data.metrics["t_finished_s"] <= study_seconds
    _, trials = load(uri, "autoresearch-arena")
    assert trials["t_finished"].max() == pytest.approx(t2.data.metrics["t_finished_s"]), "analysis reads the same"


def test_a_trial_that_ran_through_the_gap_between_sessions_makes_that_time_study_time(tmp_path):
    """A kill -9 of the orchestrator leaves its trials running; the next session adopts them. The
    journal says when the first session went quiet and when the next began; the adopted trial's
    result says it ran until it finished: only the time after that, with nothing running, is idle."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("study", clock_origin=1000.0)
    journal.close()
    records = Journal.read(path)
    quiet = records[-1]["wall_time"]
    records.append({"event": "resumed", "wall_time": quiet + 100.0})
    finished = Result(status="ok", val_bpb=1.0, started_at=quiet - 10.0, finished_at=quiet + 40.0)
    records.append({"event": "finished", "trial_id": "t0000", "result": finished.to_dict(), "wall_time": quiet + 101.0})
    clock = StudyClock.from_journal(records, simulated=False)
    assert clock.gaps == [(quiet + 40.0, quiet + 100.0)] and clock.idle == pytest.approx(60.0)
    assert clock.active(quiet + 40.0) == pytest.approx(quiet + 40.0 - 1000.0)
    assert clock.active(quiet + 130.0) == pytest.approx(quiet + 130.0 - 1000.0 - 60.0)
    assert StudyClock.from_journal(records, simulated=True).gaps == [], "a virtual clock has no idle time"


def test_the_running_best_by_time_stays_a_staircase_when_a_trial_is_told_after_a_later_one():
    """Two slots: t0002 finished at 3.5 s but its result was collected after t0001's (3.6 s), which
    improved the best. In MLflow's (step, timestamp) order t0002's point came before the
    improvement's old-best point and the chart sloped (seen in CI: test_mlflow_ui's staircase)."""
    from study.mlflow_content import RunningBest

    best = RunningBest()
    told = [("t0000", 3.80, 3.4), ("t0001", 3.74, 3.6), ("t0002", 3.90, 3.5), ("t0003", 3.70, 7.2)]
    points = [p for i, (trial_id, score, seconds) in enumerate(told) for p in best.add(
        Trial(trial_id=trial_id, index=i, candidate=Candidate(source=""), objective={}),
        Result(status="ok", val_bpb=score), seconds)]
    for key in ("best_val_bpb", "best_val_bpb_by_time"):
        drawn = sorted((p for p in points if p.key == key),
                       key=lambda p: (p.step, (p.study_seconds or 0) * 1000 + p.offset_ms))
        assert all(a.value == b.value or a.step == b.step for a, b in zip(drawn, drawn[1:])), [
            (p.step, p.value) for p in drawn]
        assert [p.value for p in drawn][-1] == 3.70
    by_time = [p for p in points if p.key == "best_val_bpb_by_time"]
    assert [p.study_seconds for p in by_time] == sorted(p.study_seconds for p in by_time), "never back in time"


def test_the_running_best_of_a_long_study_is_logged_as_steps_in_batches_mlflow_accepts(tmp_path):
    """A study resumed with 600 improving trials to catch up logs ~2,400 points; MLflow takes 1,000 a call."""
    from study.mirror import Mirror
    from study.mlflow_content import RunningBest

    mirror = Mirror(sqlite_uri(tmp_path), "long", "sid", "long", "tpe", {}, {}, (ROOT / "train" / "train.py").read_text())
    mirror.check()
    mirror._ensure_parent()
    best = RunningBest()
    points = [p for i in range(600) for p in best.add(
        Trial(trial_id=f"t{i:04d}", index=i, candidate=Candidate(source=""), objective={}),
        Result(status="ok", val_bpb=2.0 - i / 1000), float(i))]
    mirror._log_running_best(points)
    history = mlflow.MlflowClient(sqlite_uri(tmp_path)).get_metric_history(mirror.parent_run_id, "best_val_bpb")
    assert len(history) == 1 + 2 * 599
    by_step = sorted(history, key=lambda m: (m.step, m.timestamp))
    assert [m.value for m in by_step[1:3]] == [2.0, 1.999], "at step 1: the old best, then the new"
