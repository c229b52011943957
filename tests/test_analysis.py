"""analysis/ on studies written by hand through the real MLflow client, whose answers are known.

The store (one sqlite file) holds three studies of one searcher:

    seq  (1 slot, seed 0): trials end to end, 100 s each: 2.5, 2.2, 2.0 at t = 100, 200, 300
    par0 (4 slots, seed 0): 2.4 at 60, a crash at 80, 2.3 and 2.0 at 100
    par1 (4 slots, seed 1): 2.6 at 50, 1.99 at 90 (on an H200), an oom at 100, 2.1 at 120

so e.g. par0 reaches 2.0 at 100 s and seq at 300 s: measured speedup 3.0.
"""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis import budget, curves, hardware, phases, report, spend, speedup, tables
from analysis.load import AnalysisError, load

EXPERIMENT = "hand-built"
# arms name searcher, slots, objective preset and the device kinds the launcher offered
X1, X4 = "tpe x1 (cpu preset, H100)", "tpe x4 (cpu preset, H100+H200)"

# (t_submitted, t_started, t_finished, status, val_bpb, knobs, device_kind, source_sha)
SEQ = [
    (0, 0, 100, "ok", 2.5, {"DEPTH": 2, "LR": 0.01}, "H100", "a"),
    (100, 100, 200, "ok", 2.2, {"DEPTH": 3, "LR": 0.01}, "H100", "b"),
    (200, 200, 300, "ok", 2.0, {"DEPTH": 3, "LR": 0.02}, "H100", "c"),
]
PAR0 = [
    (0, 0, 60, "ok", 2.4, {"DEPTH": 2, "LR": 0.03}, "H100", "f"),
    (0, 0, 80, "crash", None, {"DEPTH": 8, "LR": 0.03}, "H100", "g"),
    (0, 0, 100, "ok", 2.3, {"DEPTH": 4, "LR": 0.01}, "H100", "h"),
    (0, 0, 100, "ok", 2.0, {"DEPTH": 4, "LR": 0.02}, "H100", "i"),
]
PAR1 = [
    (0, 0, 50, "ok", 2.6, {"DEPTH": 2, "LR": 0.01}, "H100", "a"),
    (0, 0, 90, "ok", 1.99, {"DEPTH": 3, "LR": 0.02}, "H200", "c"),
    (0, 0, 100, "oom", None, {"DEPTH": 9, "LR": 0.02}, "H100", "d"),
    (50, 50, 120, "ok", 2.1, {"DEPTH": 3, "LR": 0.03}, "H100", "e"),
]


def log_study(client, exp_id, study_id, slots, seed, trials, time_mode, study_metrics=None, trial_usd=None,
              objective="cpu", searcher="tpe", kinds=None, roles=None, params=None):
    """A parent run and its trials as the mirror logs them; `params` are parent-run params (the
    mirror logs the flattened study config, e.g. {"study.max_trials": "4"})."""
    if kinds is None:
        kinds = {"H100": {"count": slots}} if slots == 1 else {"H100": {"count": slots - 1}, "H200": {"count": 1}}
    tags = {
        "arena.kind": "study", "arena.study_id": study_id, "searcher": searcher, "launcher": "simulated",
        "slots": str(slots), "objective": objective, "seed": str(seed), "git_sha": "0" * 40, "time_mode": time_mode,
        "device_kinds": json.dumps(kinds),
    }
    parent = client.create_run(exp_id, tags=tags, run_name=study_id).info.run_id
    if params:
        client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])
    for i, (sub, start, fin, status, val, knobs, kind, sha) in enumerate(trials):
        child = client.create_run(exp_id, run_name=f"{study_id}-{i}").info.run_id
        trial_tags = {
            "arena.kind": "trial", "arena.study_id": study_id, "arena.trial_id": f"{study_id}-{i:04d}",
            "mlflow.parentRunId": parent, "status": status, "device_kind": kind, "device": "cpu", "host": "h",
            "slot": f"s{i % slots}", "source_sha": sha,
        }
        if roles:
            trial_tags["role"] = roles[i]
        numbers = {"t_submitted": sub, "t_started": start, "t_finished": fin, "training_seconds": fin - start - 1}
        if val is not None:
            numbers["val_bpb"] = val
        if trial_usd is not None:
            numbers["agent_usd"] = trial_usd
        params = {f"knob.{k}": str(v) for k, v in knobs.items()}
        params.update(trial_index=str(i), hypothesis=f"try {knobs}", parent_trial="", seed=str(seed))
        client.log_batch(
            child,
            metrics=[Metric(k, float(v), 0, 0) for k, v in numbers.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in trial_tags.items()],
        )
    for k, v in (study_metrics or {}).items():
        client.log_metric(parent, k, v)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    log_study(client, exp_id, "seq", 1, 0, SEQ, "simulated")
    log_study(client, exp_id, "par0", 4, 0, PAR0, "simulated", trial_usd=0.1)
    log_study(client, exp_id, "par1", 4, 1, PAR1, "simulated", study_metrics={"agent_usd_total": 1.2},
              roles=["baseline", "agent", "agent", "confirm"])
    return uri


@pytest.fixture(scope="module")
def loaded(store):
    return load(store, EXPERIMENT)


def by_study(trials, study_id):
    return trials[trials["study_id"] == study_id]


def test_load_gives_one_row_per_trial_with_study_tags_and_slot_seconds(loaded):
    studies, trials = loaded
    assert sorted(studies["study_id"]) == ["par0", "par1", "seq"]
    assert set(studies["arm"]) == {X1, X4}
    assert len(trials) == len(SEQ) + len(PAR0) + len(PAR1)
    par1 = by_study(trials, "par1").set_index("trial_index")
    assert par1.loc[3, "slot_seconds"] == 70
    assert par1.loc[2, "status"] == "oom" and math.isnan(par1.loc[2, "val_bpb"])
    assert par1.loc[1, "knob.LR"] == pytest.approx(0.02)
    assert (trials["time_mode"] == "simulated").all() and set(trials["slots"]) == {1, 4}


def test_load_rejects_unknown_experiment_and_study(store):
    with pytest.raises(AnalysisError, match="no MLflow experiment"):
        load(store, "nope")
    with pytest.raises(AnalysisError, match="not found"):
        load(store, EXPERIMENT, ["par0", "ghost"])
    studies, trials = load(store, EXPERIMENT, ["par0"])
    assert list(studies["study_id"]) == ["par0"] and set(trials["study_id"]) == {"par0"}


def test_spend_splits_each_arms_slot_hours_by_why_its_trials_ran(loaded):
    _, trials = loaded
    got = spend.by_purpose(trials)
    assert list(got.columns) == ["slot_hours", "search_share", "baseline_share", "confirm_share", "no_score_share"]
    assert got.loc[X1, "slot_hours"] == pytest.approx(300 / 3600)  # seq: 3 x 100 s of search, all scored
    assert got.loc[X1, "search_share"] == 1.0 and got.loc[X1, "no_score_share"] == 0.0
    # par0: 340 s of search (80 of them crashed); par1: 50 baseline, 90 + 100 (oom) agent, 70 confirm
    four = got.loc[X4]
    assert four["slot_hours"] == pytest.approx(650 / 3600)
    assert (four["search_share"], four["baseline_share"], four["confirm_share"]) == pytest.approx(
        (530 / 650, 50 / 650, 70 / 650))
    assert four["no_score_share"] == pytest.approx(180 / 650)


def test_spend_counts_a_shortened_rung_as_screening():
    trials = pd.DataFrame({"arm": ["a", "a", "a"], "slot_seconds": [100.0, 50.0, None], "status": ["ok", "ok", "cancelled"],
                           "budget_fraction": [1.0, 0.25, float("nan")]})
    got = spend.by_purpose(trials).loc["a"]
    assert got["slot_hours"] == pytest.approx(150 / 3600)
    assert (got["search_share"], got["screen_share"], got["no_score_share"]) == pytest.approx((2 / 3, 1 / 3, 0.0))


def test_staircase_against_wall_trials_and_gpu_hours(loaded):
    _, trials = loaded
    par0 = by_study(trials, "par0")
    wall = curves.staircase(par0, "wall")
    assert list(wall["x"]) == [60, 80, 100, 100]
    assert list(wall["best"]) == [2.4, 2.4, 2.3, 2.0]
    assert list(curves.staircase(par0, "trials")["x"]) == [1, 2, 3, 4]
    # the slot-time of the trials finished so far: 60, +80 (the crash), +100, +100
    gpu = curves.staircase(par0, "gpu_hours")
    assert list(gpu["x"] * 3600) == pytest.approx([60, 140, 240, 340])


def test_seed_band_is_mean_and_min_max_where_every_seed_has_a_result(loaded):
    _, trials = loaded
    band = curves.seed_band(trials, "wall")
    four = band[band["arm"] == X4].set_index("x")
    assert 50 not in four.index  # par0 has no ok result before 60
    assert four.loc[60, ["mean", "lo", "hi"]].tolist() == pytest.approx([2.5, 2.4, 2.6])
    assert four.loc[90, "mean"] == pytest.approx((2.4 + 1.99) / 2)
    assert four.loc[100, "mean"] == pytest.approx((2.0 + 1.99) / 2)


def test_time_to_target_and_the_three_speedups(loaded):
    _, trials = loaded
    seq, par0 = by_study(trials, "seq"), by_study(trials, "par0")
    assert speedup.time_to_target(seq, 2.0) == 300
    assert speedup.time_to_target(par0, 2.0) == 100
    assert speedup.time_to_target(par0, 1.5) == math.inf
    curve = speedup.speedup_curve(par0, seq)
    assert list(curve["target"]) == [2.5, 2.2, 2.0]
    assert list(curve["speedup"]) == pytest.approx([100 / 60, 2.0, 3.0])

    replay = speedup.replay_sequential(par0).set_index("trial_index")
    assert list(replay["t_finished"]) == [60, 140, 240, 340]

    s = speedup.speedup_summary(par0, seq)
    assert s["target"] == 2.0
    assert s["speedup_measured"] == pytest.approx(3.0)
    assert s["speedup_replayed"] == pytest.approx(340 / 100)
    assert s["trials_per_h_parallel"] == pytest.approx(144)
    assert s["throughput_ratio_measured"] == pytest.approx(144 / 36)
    assert s["throughput_ratio_replayed"] == pytest.approx(340 / 100)


def test_parallel_studies_pair_with_the_sequential_study_of_the_same_seed(loaded):
    studies, _ = loaded
    pairs = {par["study_id"]: (seq["study_id"] if seq is not None else None) for par, seq in speedup.pair_with_sequential(studies)}
    assert pairs == {"par0": "seq", "par1": None}


def test_searcher_table_cuts_every_study_at_equal_budgets(loaded):
    studies, trials = loaded
    budgets, _ = budget.resolve(studies, trials, ["compute", "wall"])  # no budget named: the least any study used
    assert [b.at * 3600 for b in budgets] == pytest.approx([300, 100])  # seq's 300 slot-s (par0 340, par1 310); par0's 100 s
    assert "the least any study used" in budgets[0].origin
    per = tables.per_study(trials, studies, budgets).set_index("study_id")
    assert per["best_at_compute"].to_dict() == pytest.approx({"seq": 2.0, "par0": 2.3, "par1": 1.99})
    assert per["kept_compute"].to_dict() == {"seq": 3, "par0": 3, "par1": 3}
    assert per["best_at_wall"].to_dict() == pytest.approx({"seq": 2.5, "par0": 2.0, "par1": 1.99})
    assert per["failure_rate"].to_dict() == pytest.approx({"seq": 0.0, "par0": 0.25, "par1": 0.25})
    assert per.loc["par0", "rate_crash"] == 0.25 and per.loc["par1", "rate_oom"] == 0.25
    assert per["agent_usd"].to_dict() == pytest.approx({"seq": math.nan, "par0": 0.4, "par1": 1.2}, nan_ok=True)

    numbers, display = tables.searcher_table(per.reset_index())
    assert numbers.loc[X4, "best_at_compute_mean"] == pytest.approx((2.3 + 1.99) / 2)
    std = pd.Series([2.3, 1.99]).std()
    assert display.loc[X4, "best at equal GPU-h (0.0833 per study)"] == f"{(2.3 + 1.99) / 2:.4f} ± {std:.4f}"
    assert display.loc[X4, "agent USD"] == "0.80 ± 0.57"
    assert display.loc[X1, "agent USD"] == "-"
    assert display.loc[X4, "device kinds"] == "H100,H200"


def test_tables_are_written_as_markdown_booktabs_and_csv(loaded, tmp_path):
    studies, trials = loaded
    numbers, display = tables.searcher_table(tables.per_study(trials, studies, budget.resolve(studies, trials)[0]))
    md, tex, csv = tables.write_table(display, numbers, tmp_path / "searchers")
    assert f"| {X4}" in md.read_text()
    latex = tex.read_text()
    assert "\\toprule" in latex and "\\bottomrule" in latex and "$\\pm$" in latex and "±" not in latex
    assert pd.read_csv(csv, index_col=0).loc[X1, "best_val_bpb_mean"] == pytest.approx(2.0)


def test_hardware_difference_of_the_same_source_on_two_kinds(loaded):
    _, trials = loaded
    diffs = hardware.kind_differences(trials)
    assert set(diffs["source_sha"]) == {"c"}  # "a" ran twice, but only on H100
    h200 = diffs[diffs["device_kind"] == "H200"].iloc[0]
    assert h200["reference_kind"] == "H100"
    assert h200["diff_vs_reference"] == pytest.approx(1.99 - 2.0)
    warnings = hardware.mixed_kind_warnings(trials)
    assert any("study par1 mixes device kinds: H100 (3 trials), H200 (1 trials)" in w for w in warnings)
    assert any("compared arms ran on different device kinds" in w for w in warnings)
    assert not hardware.mixed_kind_warnings(by_study(trials, "seq"))
    assert hardware.kind_differences(by_study(trials, "par1")).empty  # "c" ran on H100 only in seq


def test_phases_list_the_trials_that_moved_the_best_with_their_knob_changes(loaded):
    _, trials = loaded
    moves = phases.improvements(by_study(trials, "seq"))
    assert list(moves["val_bpb"]) == [2.5, 2.2, 2.0]
    assert list(moves["changes"]) == ["(first result)", "DEPTH 2->3", "LR 0.01->0.02"]
    assert moves["gain"].iloc[1:].tolist() == pytest.approx([0.3, 0.2])
    par0 = phases.improvements(by_study(trials, "par0"))
    assert list(par0["trial_index"]) == [0, 2, 3]  # the crash moved nothing


def test_report_writes_plots_tables_summary_and_logs_them_to_every_parent_run(store, tmp_path, capsys):
    out = tmp_path / "report"
    # seq has seed 0 only, the 4-slot arm seeds 0 and 1: paired on seed 0 only when asked
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(out), "--unmatched-seeds"]) == 0
    for stem in ("progress_wall", "progress_trials", "progress_gpu_hours", "speedup"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
    for stem in ("searchers", "speedups", "spend"):
        assert all((out / f"{stem}.{ext}").exists() for ext in ("md", "tex", "csv"))
    summary = (out / "summary.md").read_text()
    assert "Time is SIMULATED" in summary
    assert "## Where the compute went" in summary
    # 650 slot-s over par0 and par1: search, baseline, confirm, no score
    assert f"| {X4} | 0.181 | 81.5 | 7.7 | 10.8 | 27.7 |" in re.sub(" +", " ", summary)
    assert r"confirm \%" in (out / "spend.tex").read_text()
    assert "study par1 mixes device kinds" in summary
    pairs = pd.read_csv(out / "speedups_per_pair.csv").set_index("parallel")
    assert pairs.loc["par0", "speedup_measured"] == pytest.approx(3.0)
    assert math.isnan(pairs.loc["par1", "speedup_measured"])
    assert pairs.loc["par1", "speedup_replayed"] == pytest.approx(140 / 90)  # 1.99 is its 2nd trial
    client = MlflowClient(tracking_uri=store)
    studies, _ = load(store, EXPERIMENT)
    for run_id in studies["run_id"]:
        logged = {a.path for a in client.list_artifacts(run_id, "report")}
        assert "report/summary.md" in logged and "report/speedup.png" in logged


def test_report_exits_with_one_line_for_an_unknown_experiment(store, tmp_path, capsys):
    assert report.main(["--tracking-uri", store, "--experiment", "missing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no MLflow experiment named 'missing'") and "\n" not in err
