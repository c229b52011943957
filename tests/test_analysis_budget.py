"""The point every study of a comparison is cut at (analysis.budget): one point for all studies,
each study credited with its own best up to it, named by the experiment rather than by the
fastest study's luck; checked against cumulative sums in exact arithmetic and hand-counted cases."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis import budget, report, tables
from analysis.budget import Budget
from tests.test_analysis import log_study


def trial_rows(study_id: str, durations, values, start: float = 0.0, arm: str | None = None) -> list[dict]:
    rows, t = [], start
    for i, (d, v) in enumerate(zip(durations, values)):
        rows.append({"study_id": study_id, "trial_id": f"{study_id}-{i}", "trial_index": i, "t_submitted": t,
                     "t_started": t, "t_finished": t + d, "status": "ok", "val_bpb": v, "device_kind": "cpu",
                     "agent_usd": math.nan, "arm": arm or study_id})
        t += d
    return rows


def frames(rows: list[dict], seeds: dict[str, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.DataFrame(rows)
    trials["slot_seconds"] = trials["t_finished"] - trials["t_started"]
    ids = list(dict.fromkeys(trials["study_id"]))
    studies = pd.DataFrame({"study_id": ids, "arm": [trials.loc[trials["study_id"] == i, "arm"].iloc[0] for i in ids],
                            "seed": [(seeds or {}).get(i, 0) for i in ids], "time_mode": "real",
                            "agent_usd_total": math.nan})
    return studies, trials


def test_at_the_cheaper_studys_compute_each_study_keeps_its_own_trials_up_to_that_point():
    """Two studies reach 1.0; one pays twice the slot-seconds per trial. At the cheaper one's
    compute, the cheaper one is credited with its last trial (the old cut lost it to a sum that
    rounded differently from the staircase's in 27 of these 200 cases) and the dearer one with the
    trials whose cumulative compute fits, counted in exact rational arithmetic."""
    rng = np.random.default_rng(0)
    values = [1.4, 1.3, 1.2, 1.1, 1.0]
    for _ in range(200):
        durations = rng.uniform(10, 100, 5)
        rows = trial_rows("cheap", durations, values, start=rng.uniform(0, 5)) + \
            trial_rows("dear", 2 * durations, values, start=rng.uniform(0, 5))
        studies, trials = frames(rows)
        [compute], _ = budget.resolve(studies, trials, ["compute"])
        per = tables.per_study(trials, studies, [compute]).set_index("study_id")
        assert per.loc["cheap", "best_at_compute"] == 1.0 and per.loc["cheap", "kept_compute"] == 5
        cheap_total = sum(Fraction(d) for d in trials.loc[trials["study_id"] == "cheap", "slot_seconds"])
        dear = trials.loc[trials["study_id"] == "dear", "slot_seconds"].map(Fraction).cumsum()
        fits = int((dear <= cheap_total).sum())  # exactly 2: 2d1 + 2d2 <= sum(d) < 2d1 + 2d2 + 2d3 is not certain
        assert per.loc["dear", "kept_compute"] == fits and per.loc["dear", "best_at_compute"] == values[fits - 1]


def test_a_trial_that_finished_exactly_at_the_cut_counts():
    studies, trials = frames(trial_rows("a", [30, 30, 30], [2.0, 1.9, 1.8]) + trial_rows("b", [45, 45], [2.1, 1.7]))
    cut = Budget("wall", 90 / 3600, "test")  # a's third trial ends at 90 s, b's second at 90 s
    per = tables.per_study(trials, studies, [cut]).set_index("study_id")
    assert per["best_at_wall"].to_dict() == {"a": 1.8, "b": 1.7}
    assert per["kept_wall"].to_dict() == {"a": 3, "b": 2}


def test_on_the_trials_measure_a_screening_rung_counts_at_its_budget_fraction():
    rows = trial_rows("rungs", [10, 10, 10, 40, 40], [None, None, None, 1.5, 1.4])
    for row, fraction in zip(rows, [0.25, 0.25, 0.25, 1.0, 1.0]):
        row["budget_fraction"] = fraction
    studies, trials = frames(rows)
    # 0.25 + 0.25 + 0.25 + 1 = 1.75 trials of compute by the fourth; the fifth ends at 2.75
    at_two = budget.cut(trials, Budget("trials", 2, "test"))
    assert (at_two["kept"], at_two["best"], at_two["reached"]) == (4, 1.5, True)
    assert budget.cut(trials, Budget("trials", 3, "test"))["reached"] is False


def test_the_budget_string_is_checked_in_one_line():
    assert budget.parse("trials=24") == ("trials", 24.0) and budget.parse("gpu-h") == ("compute", None)
    for bad, words in (("speed=3", "the measure must be one of trials, compute, wall"),
                       ("trials=many", "'many' is not a number"), ("wall=-1", "must be a positive number")):
        with pytest.raises(budget.BudgetError, match=words) as refused:
            budget.parse(bad)
        assert "\n" not in str(refused.value)


# -- a loaded CPU: the same work, several-fold different slot-seconds ----------------------------
EXPERIMENT = "loaded"
SEEDS = 4
TRIALS = 4
STEPS = {"objective.budget_kind": "steps", "study.max_trials": TRIALS, "study.max_hours": None}


@pytest.fixture(scope="module")
def loaded_store(tmp_path_factory):
    """Two arms, 4 seeds, 4 ok trials each on a steps budget. The machine's load made some studies'
    trials take 10 s and others' 60 s of wall time for the same steps; `good` is better than
    `plain` at every study's end, but its seeds 1 and 3 ran slowly and find their best last."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    for seed in range(SEEDS):
        for searcher, values, seconds in (
                ("plain", [1.80, 1.79, 1.78, 1.77], 10.0),
                ("good", [1.82, 1.81, 1.80, 1.70], 60.0 if seed % 2 else 12.0)):
            values = [v + 0.001 * seed for v in values]
            trials = [(i * seconds, i * seconds, (i + 1) * seconds, "ok", v, {"MATRIX_LR": 0.01 * (i + 1)}, "cpu", f"{searcher}{i}")
                      for i, v in enumerate(values)]
            log_study(client, exp_id, f"{searcher}-s{seed}", 1, seed, trials, "real", searcher=searcher,
                      kinds={"cpu": {"count": 1}}, params=STEPS)
    return uri


def test_a_steps_budget_compares_every_study_at_the_trials_the_experiment_named(loaded_store, tmp_path):
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", loaded_store, "--experiment", EXPERIMENT, "--out", str(out), "--no-log",
                        "--noise-floor", "none"]) == 0
    summary = (out / "summary.md").read_text()
    assert "Headline: equal trials (4 per study)" in summary and "study.max_trials named by the experiment" in summary
    assert pd.read_csv(out / "budgets.csv")[["measure", "at"]].values.tolist() == [["trials", TRIALS]]
    kept = pd.read_csv(out / "kept_trials.csv", index_col=0)
    assert kept["trials kept"].tolist() == [SEEDS * TRIALS] * 2 and kept["short of the budget"].tolist() == ["-", "-"]
    per = pd.read_csv(out / "searchers_per_study.csv").set_index("study_id")
    assert (per["best_at_trials"] == per["best_val_bpb"]).all()  # every study at its own end
    claim = pd.read_csv(out / "claims.csv").iloc[0]
    assert claim["a"].startswith("good") and claim["delta"] == pytest.approx(-0.07)


def test_the_least_compute_any_study_used_cuts_slow_studies_short_and_the_report_says_so(loaded_store, tmp_path):
    """What the old default did on a loaded CPU: the cut at the fastest study's 40 slot-seconds
    keeps none of the slow seeds' trials (all four ok: now "missing") and turns the comparison
    around against the studies' final bests."""
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", loaded_store, "--experiment", EXPERIMENT, "--out", str(out), "--no-log",
                        "--noise-floor", "none", "--budget", "compute"]) == 0
    kept = pd.read_csv(out / "kept_compute.csv", index_col=0)
    assert kept.loc[kept.index.str.startswith("plain"), "trials kept"].item() == 16
    assert kept.loc[kept.index.str.startswith("good"), "trials kept"].item() == 3 + 0 + 3 + 0  # seeds 1, 3: 60 s trials
    arms = pd.read_csv(out / "arms_best_at_compute.csv", index_col=0)
    assert arms.loc[arms.index.str.startswith("good"), "missing_seeds"].item() == "1 (no result), 3 (no result)"
    claim = pd.read_csv(out / "claims.csv").iloc[0]
    assert claim["a"].startswith("plain") and claim["n"] == 2  # good's own final bests are 0.07 lower
    summary = (out / "summary.md").read_text()
    assert "the least any study used (study plain-s0): no budget named for this measure" in summary


def test_an_experiment_can_name_its_budget_in_its_compare_settings(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("named", artifact_location=(tmp_path / "artifacts").as_uri())
    named = {**STEPS, "compare.measure": "compute", "compare.at": 50 / 3600, "study.max_hours": 0.05}
    for searcher in ("a", "b"):
        trials = [(i * 20.0, i * 20.0, (i + 1) * 20.0, "ok", 1.8 - 0.01 * i, {}, "cpu", f"{searcher}{i}") for i in range(4)]
        log_study(client, exp_id, f"{searcher}-s0", 1, 0, trials, "real", searcher=searcher, params=named)
    from analysis.load import load

    studies, trials = load(uri, "named")
    budgets, notes = budget.resolve(studies, trials)
    assert [(b.measure, b.origin.split(";")[0]) for b in budgets] == [("compute", "compare.at named by the experiment"),
                                                        ("wall", "study.max_hours named by the experiment")]
    assert budgets[0].at == pytest.approx(50 / 3600) and budgets[1].at == pytest.approx(0.05) and not notes
    per = tables.per_study(trials, studies, budgets).set_index("study_id")
    assert per.loc["a-s0", "kept_compute"] == 2 and per.loc["a-s0", "kept_wall"] == 4  # 0.05 h = 180 s


def test_a_report_refuses_an_arm_with_a_seed_twice_naming_both_studies():
    rows = trial_rows("tpe-a", [10, 10], [1.8, 1.7], arm="tpe") + trial_rows("tpe-b", [10, 10], [1.9, 1.6], arm="tpe") + \
        trial_rows("random", [10, 10], [1.8, 1.75])
    studies, trials = frames(rows)  # every study seed 0: tpe has it twice (say, two study names)
    with pytest.raises(ValueError, match=r"^tpe has seed 0 2 times \(tpe-a, tpe-b\): one study per arm and seed") as refused:
        report.plan(studies, trials, ["trials=2"])
    assert "\n" not in str(refused.value)
