"""The report on comparisons a paper makes: three searchers on 8 paired seeds on CPU slots, a
second objective preset in the same experiment (issue 16), and the HTML page in a real browser.
The studies log what the mirror logs on a parent run: a steps budget and study.max_trials, so the
comparison is at equal trials (analysis.budget)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from mlflow import MlflowClient

from analysis import report
from analysis.load import load
from tests.test_analysis import log_study

EXPERIMENT = "searchers"
SEEDS = 8
CPU = {"cpu": {"count": 1}}
CPU_PARAMS = {"objective.budget_kind": "steps", "study.max_trials": 4, "study.max_hours": None}
TINY_PARAMS = {"objective.budget_kind": "steps", "study.max_trials": 3, "study.max_hours": None}


def cpu_trials(values, start=0.0, duration=30.0):
    """One slot, trials end to end on a CPU slot; a None value is a crash."""
    return [(start + i * duration, start + i * duration, start + (i + 1) * duration,
             "ok" if v is not None else "crash", v, {"MATRIX_LR": 0.01 * (i + 1)}, "cpu", f"s{i}")
            for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """cpu preset: random and tpe identical (TPE in its start-up trials), grid clearly better;
    tiny preset: the same searchers with val_bpb around 3.6. Seed 7 of grid never has an ok trial."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    for seed in range(SEEDS):
        base = list(1.75 + rng.normal(0, 0.006, 4))
        for searcher, values in (("random", base), ("tpe", base), ("grid", [v - 0.03 for v in base])):
            if searcher == "grid" and seed == 7:
                values = [None] * 4
            log_study(client, exp_id, f"{searcher}-cpu-s{seed}", 1, seed, cpu_trials(values), "real",
                      objective="cpu", searcher=searcher, kinds=CPU, params=CPU_PARAMS)
        for searcher in ("random", "tpe"):
            log_study(client, exp_id, f"{searcher}-tiny-s{seed}", 1, seed, cpu_trials(list(3.6 + rng.normal(0, 0.1, 3)), duration=2),
                      "real", objective="tiny", searcher=searcher, kinds=CPU, params=TINY_PARAMS)
    # a ninth random seed killed during its first trial: a parent run and nothing else
    log_study(client, exp_id, "random-cpu-s8", 1, 8, [], "real", objective="cpu", searcher="random", kinds=CPU,
              params=CPU_PARAMS)
    return uri


@pytest.fixture(scope="module")
def written(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(out),
                        "--noise-floor", "0.006", "--unmatched-seeds"]) == 0
    return out


def test_arms_run_on_different_seeds_are_refused_in_one_line_before_anything_is_written(store, tmp_path, capsys):
    # random has a ninth seed (8) that grid and tpe were never run on
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(tmp_path / "r"),
                        "--preset", "cpu", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: the arms were not run on the same seeds")
    assert "grid x1 (cpu preset, cpu) has no study for seed 8" in err and "--unmatched-seeds" in err
    assert not (tmp_path / "r").exists()


def test_the_report_says_which_budget_it_compared_at_and_what_each_arm_kept(written):
    summary = (written / "cpu" / "summary.md").read_text()
    assert "Headline: equal trials (4 per study), measured in trials finished" in summary
    assert "value from study.max_trials named by the experiment" in summary
    assert "No comparison at equal active study time" in summary  # a steps budget on a real clock
    kept = pd.read_csv(written / "cpu" / "kept_trials.csv", index_col=0)
    assert kept.loc["grid x1 (cpu preset, cpu)", "trials kept"] == 32 and kept.loc["tpe x1 (cpu preset, cpu)", "studies"] == 8
    # the killed ninth random study stopped short of the budget and is named
    assert kept.loc["random x1 (cpu preset, cpu)", "short of the budget"] == "seed 8"


def test_studies_of_two_presets_get_one_report_each_and_an_index_that_says_why(written):
    index = (written / "summary.md").read_text()
    assert "2 objective presets (cpu, tiny)" in index and (written / "report.html").is_file()
    cpu, tiny = pd.read_csv(written / "cpu" / "trials.csv"), pd.read_csv(written / "tiny" / "trials.csv")
    assert set(cpu["objective"]) == {"cpu"} and set(tiny["objective"]) == {"tiny"}
    assert cpu["study_id"].nunique() == 3 * SEEDS and tiny["study_id"].nunique() == 2 * SEEDS


def test_arms_name_preset_and_device_and_cpu_compute_is_slot_hours(written):
    summary = (written / "cpu" / "summary.md").read_text()
    assert "grid x1 (cpu preset, cpu)" in summary and "tpe x1 (cpu preset, cpu)" in summary
    assert "CPU slot-h" in summary and "GPU-h" not in summary.replace("not GPU-hours", "")
    assert "CPU slot-h" in (written / "cpu" / "searchers.md").read_text()


def test_claims_call_the_clear_gain_and_refuse_the_identical_pair(written):
    table = pd.read_csv(written / "cpu" / "claims.csv")
    assert set(table["budget"]) == {"equal trials (4 per study)"}
    pairs = table.set_index(["a", "b"])
    grid_vs_random = pairs.loc[("grid x1 (cpu preset, cpu)", "random x1 (cpu preset, cpu)")]
    # seed 7 has no ok grid trial, seed 8 no grid study and no random result: 7 pairs, gaps named by number
    assert grid_vs_random["supported"] and grid_vs_random["n"] == 7 and grid_vs_random["n_missing"] == 2
    assert "7 seed pairs (grid x1 (cpu preset, cpu): n = 7, missing seed 7 (no result), 8 (no study); " \
           "random x1 (cpu preset, cpu): n = 8, missing seed 8 (no result))" in grid_vs_random["claim"]
    same = table[(table["a"].str.startswith(("random", "tpe"))) & (table["b"].str.startswith(("random", "tpe")))]
    assert not same["supported"].any()
    assert all(c.startswith("no difference detected") and "identical on every seed" in c for c in same["claim"])
    summary = (written / "cpu" / "summary.md").read_text()
    assert "random x1 (cpu preset, cpu) and tpe x1 (cpu preset, cpu) found exactly the same" in summary
    assert "noise floor σ = 0.0060" in summary


def test_every_table_says_n_and_the_failed_seed_is_counted(written):
    arms = pd.read_csv(written / "cpu" / "arms_best_at_trials.csv", index_col=0).fillna("")
    # grid: seed 7 failed, seed 8 was never run (random's ninth): both missing, by number
    assert arms.loc["grid x1 (cpu preset, cpu)", ["n", "n_missing", "missing_seeds"]].tolist() == [
        7, 2, "7 (no result), 8 (no study)"]
    assert arms.loc["tpe x1 (cpu preset, cpu)", ["n", "n_missing", "missing_seeds"]].tolist() == [SEEDS, 1, "8 (no study)"]
    # the study that never finished a trial is a seed without a result, not a forgotten one
    assert arms.loc["random x1 (cpu preset, cpu)", ["n", "n_missing", "missing_seeds"]].tolist() == [
        SEEDS, 1, "8 (no result)"]
    searchers = (written / "cpu" / "searchers.md").read_text()
    assert "7 (no result), 8 (no study)" in searchers
    ttt = pd.read_csv(written / "cpu" / "time_to_target_wall.csv")
    assert len(ttt) == 3 * SEEDS  # censored seeds included
    assert not ttt.loc[ttt["study_id"] == "grid-cpu-s7", "reached"].item()


def test_three_arms_get_friedman_and_a_critical_difference_diagram(written):
    summary = (written / "cpu" / "summary.md").read_text()
    assert "Friedman χ²" in summary and "n = 7 seeds (seeds 7, 8 lacking an arm left out)" in summary
    for stem in ("critical_difference", "rank_over_time", "progress_wall", "progress_gpu_hours",
                 "time_to_target_wall", "time_to_target_gpu_hours"):
        assert (written / "cpu" / f"{stem}.png").stat().st_size > 0 and (written / "cpu" / f"{stem}.pdf").is_file()
    assert "Friedman and Nemenyi need three or more arms." in (written / "tiny" / "summary.md").read_text()
    assert not (written / "cpu" / "speedup.png").exists()  # no parallel study: no empty panels
    tex = (written / "cpu" / "claims.tex").read_text()
    assert "\\toprule" in tex and "−" not in tex and "$-$" in tex


def test_the_report_is_logged_to_a_comparison_run_and_every_parent_run(store, written):
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(EXPERIMENT)
    comparisons = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'comparison'")
    assert len(comparisons) == 1
    logged = {a.path for a in client.list_artifacts(comparisons[0].info.run_id, "report/cpu")}
    assert "report/cpu/report.html" in logged and "report/cpu/claims.md" in logged
    studies, _ = load(store, EXPERIMENT)
    assert len(studies) == 5 * SEEDS + 1  # the comparison run is not a study
    assert any(a.path == "report/report.html" for a in client.list_artifacts(studies["run_id"].iloc[0], "report"))


def test_one_preset_can_be_asked_for_and_an_unknown_one_is_one_line(store, tmp_path, capsys):
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(tmp_path / "t"),
                        "--preset", "tiny", "--no-log"]) == 0
    assert pd.read_csv(tmp_path / "t" / "trials.csv")["objective"].unique().tolist() == ["tiny"]
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(tmp_path / "g"),
                        "--preset", "gpu", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no study of objective preset 'gpu'") and "\n" not in err


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_the_html_report_opens_in_headless_chromium(written, tmp_path):
    html = written / "cpu" / "report.html"
    assert "data:image/png;base64," in html.read_text()  # self-contained: no file beside it needed
    shot = tmp_path / "page.png"
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "Critical-difference diagram" in dom.stdout and dom.stdout.count("<img") >= 6
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", html.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_the_paired_test_asked_for_is_the_one_in_the_pairwise_tables(store, tmp_path):
    out = tmp_path / "perm"
    assert report.main(["--tracking-uri", store, "--experiment", EXPERIMENT, "--out", str(out), "--preset", "tiny",
                        "--test", "permutation", "--no-log"]) == 0
    pairs = pd.read_csv(out / "pairwise_best_at_trials.csv")
    assert pairs["test"].tolist() == ["permutation"]  # it stayed on wilcoxon whatever --test said
    per = pd.read_csv(out / "searchers_per_study.csv")
    wide = per.pivot(index="seed", columns="arm", values="best_at_trials")
    row = pairs.iloc[0]
    d = np.round((wide[row["a"]] - wide[row["b"]]).to_numpy(), 12)
    p = sps.permutation_test((d,), np.mean, permutation_type="samples", alternative="less",
                             rng=np.random.default_rng(0)).pvalue
    assert row["p"] == pytest.approx(p)
    assert "p (permutation)" in (out / "summary.md").read_text()
