"""The acceptance test of the claims table: a real multirun (`python run.py -m`, two searchers on
three paired seeds, tiny objective, simulated launcher), its report, and the same numbers
recomputed by a reviewer from the raw journals (studies/<name>/journal.jsonl and config.yaml) with
scipy.stats and statsmodels, without analysis/."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analysis import report
from tests.conftest import TINY, run_arena, sqlite_uri

SEARCHERS = ("random", "grid")
SEEDS = 3
TRIALS = 2


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    work = tmp_path_factory.mktemp("multirun")
    run_arena(work, "-m", f"searcher={','.join(SEARCHERS)}", f"seed=range({SEEDS})", *TINY, "launcher=simulated",
              "launcher.slots=1", "launcher.seconds_per_budget_unit=1.0", f"study.max_trials={TRIALS}",
              "objective.hard_limit_s=300", f"mlflow.tracking_uri={sqlite_uri(work)}", timeout=3000)
    return work


def reports(work: Path, name: str, *extra: str) -> pd.DataFrame:
    out = work / name
    assert report.main(["--tracking-uri", sqlite_uri(work), "--experiment", "autoresearch-arena", "--out", str(out),
                        "--no-log", "--noise-floor", "none", *extra]) == 0
    return pd.read_csv(out / "claims.csv")


def from_journals(work: Path, budget: int | None = None) -> dict[tuple[str, int], float]:
    """(searcher, seed) -> best val_bpb among the first `budget` trials to finish (default: the
    study's own study.max_trials), read line by line from each study's journal."""
    best = {}
    for folder in sorted((work / "studies").iterdir()):
        records = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines() if line.strip()]
        header = next(r for r in records if r["event"] == "study")
        limit = budget or yaml.safe_load((folder / "config.yaml").read_text())["study"]["max_trials"]
        finished = [r["result"] for r in records if r["event"] == "finished"][:limit]
        scores = [r["val_bpb"] for r in finished if r["status"] == "ok"]
        best[(header["searcher"], int(header["seed"]))] = min(scores) if scores else float("nan")
    return best


def recompute(row: pd.Series, best: dict) -> dict:
    """Δ, its t interval, both one-sided exact Wilcoxon p-values and their Holm adjustment for the
    pair of this row, as a reviewer computes them."""
    arm = {label: next(s for s in SEARCHERS if label.startswith(s + " ")) for label in (row["a"], row["b"])}
    a = np.array([best[(arm[row["a"]], s)] for s in range(SEEDS)])
    b = np.array([best[(arm[row["b"]], s)] for s in range(SEEDS)])
    d = np.round(a - b, 12)
    p = sps.wilcoxon(d, alternative="less", zero_method="pratt").pvalue
    p_reverse = sps.wilcoxon(-d, alternative="less", zero_method="pratt").pvalue
    ci = sps.ttest_1samp(d, 0.0).confidence_interval(0.95)
    return {"n": len(d), "delta": d.mean(), "delta_lo": ci.low, "delta_hi": ci.high, "p": p, "p_reverse": p_reverse,
            "p_holm": multipletests([p, p_reverse], method="holm")[1][0]}


NUMBERS = ("n", "delta", "delta_lo", "delta_hi", "p", "p_reverse", "p_holm")


@pytest.mark.slow
def test_the_claims_table_is_what_a_reviewer_recomputes_from_the_journals(multirun):
    table = reports(multirun, "report")
    assert table["budget"].tolist() == [f"equal trials ({TRIALS} per study)"]  # study.max_trials, named up front
    best = from_journals(multirun)
    for _, row in table.iterrows():
        expected = recompute(row, best)
        assert {k: row[k] for k in NUMBERS} == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert row["delta"] <= 0  # oriented as "a < b"

    # the same at a cut that leaves each study's second trial out: the first trial to finish
    early = reports(multirun, "report-1", "--budget", "trials=1")
    assert early["budget"].tolist() == ["equal trials (1 per study)"]
    first = from_journals(multirun, budget=1)
    for _, row in early.iterrows():
        assert {k: row[k] for k in NUMBERS} == pytest.approx(recompute(row, first), rel=1e-9, abs=1e-12)
