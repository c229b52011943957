"""The measured noise floor: the repeat searcher's schedule, σ and the between-kind offset on
hand-built runs, the store a study reads, and `python -m analysis.noise` end to end on the
simulated launcher with two device kinds."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis import noise
from study.core import SearchContext
from searchers.repeat import RepeatSearcher
from study.records import Result, Trial
from tests.conftest import ROOT


def context(kinds: dict[str, int], seed: int = 10) -> SearchContext:
    return SearchContext(baseline_source="DEPTH = 1\n", baseline_knobs={"DEPTH": 1}, space={}, seed=seed,
                         study_dir="", objective={}, device_kinds={k: {"count": c, "speed": 1.0} for k, c in kinds.items()})


def run(candidate, index: int, kind: str) -> tuple[Trial, Result]:
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=candidate, objective={}, seed=candidate.seed,
                  device_kind=kind)
    return trial, Result(status="ok", val_bpb=1.0, device_kind=kind)


def test_repeat_runs_the_baseline_once_per_seed_and_kind_never_more_than_a_kind_has_free_slots():
    ctx = context({"H100": 2, "H200": 1})
    searcher = RepeatSearcher(seeds=3)
    searcher.setup(ctx)
    first = searcher.ask(8, ctx)
    assert sorted((c.device_kind, c.seed) for c in first) == [("H100", 10), ("H100", 11), ("H200", 10)]
    assert all(c.source == ctx.baseline_source for c in first)
    trials = [run(c, i, c.device_kind)[0] for i, c in enumerate(first)]
    ctx.in_flight = trials
    assert searcher.ask(8, ctx) == []  # every slot is busy
    for t in trials:
        searcher.tell(t, Result(status="ok", val_bpb=1.0, device_kind=t.device_kind))
    ctx.in_flight = []
    second = searcher.ask(8, ctx)
    assert sorted((c.device_kind, c.seed) for c in second) == [("H100", 12), ("H200", 11)]
    assert not searcher.done()
    for i, c in enumerate(second):
        searcher.tell(*run(c, 10 + i, c.device_kind))
    last = searcher.ask(8, ctx)
    assert [(c.device_kind, c.seed) for c in last] == [("H200", 12)]
    searcher.tell(*run(last[0], 20, "H200"))
    assert searcher.done() and searcher.ask(8, ctx) == []
    # resumed: the journal's tells alone rebuild the schedule
    resumed = RepeatSearcher(seeds=3)
    resumed.setup(ctx)
    for i, c in enumerate(first + second + last):
        resumed.tell(*run(c, i, c.device_kind))
    assert resumed.done() and resumed.ask(8, ctx) == []
    with pytest.raises(ValueError, match="seeds must be an integer >= 2"):
        RepeatSearcher(seeds=1)


def noise_trials() -> pd.DataFrame:
    rows = [("A", 0, "ok", 1.0), ("A", 1, "ok", 1.2), ("A", 2, "ok", 1.1), ("A", 2, "ok", 1.1),  # a repeated seed
            ("A", 3, "crash", math.nan), ("B", 0, "ok", 1.3), ("B", 1, "ok", 1.5)]
    return pd.DataFrame([{"source_sha": "abc", "device_kind": k, "seed": str(s), "status": st, "val_bpb": v,
                          "t_finished": 1.0, "trial_index": i} for i, (k, s, st, v) in enumerate(rows)])


def test_sigma_per_kind_and_the_offset_between_kinds():
    table = noise.measure(noise_trials()).set_index("device_kind")
    assert table.loc["A", "n"] == 3 and table.loc["A", "n_failed"] == 1  # the repeat of seed 2 counts once
    assert table.loc["A", "sigma"] == pytest.approx(0.1)
    assert table.loc["B", "sigma"] == pytest.approx(math.sqrt(0.02))
    assert table.loc["B", "reference_kind"] == "A"
    assert table.loc["B", "offset_vs_reference"] == pytest.approx(1.4 - 1.1)
    assert table.loc["A", "sigma_lo"] <= table.loc["A", "sigma"] <= table.loc["A", "sigma_hi"]


def test_the_store_is_keyed_by_preset_kind_and_code_and_a_comparison_takes_its_noisiest_kind(tmp_path):
    table = noise.measure(noise_trials())
    for _, row in table.iterrows():
        noise.save(tmp_path, "cpu", row, "noise-study")
    stored = json.loads((tmp_path / "cpu" / "B" / "abc.json").read_text())
    assert stored["n"] == 2 and stored["study_id"] == "noise-study"
    assert noise.lookup(tmp_path, "cpu", "A", "abc")["sigma"] == pytest.approx(0.1)
    assert noise.lookup(tmp_path, "cpu", "A", "other-code")["source_sha"] == "abc"  # latest of any code
    assert noise.lookup(tmp_path, "gpu", "A") is None
    sigma, note = noise.floor_for(tmp_path, "cpu", ["A", "B", "C"])
    assert sigma == pytest.approx(math.sqrt(0.02)) and "cpu/B" in note and "no floor measured for ['C']" in note
    assert noise.floor_for(tmp_path, "tiny", ["A"]) == (None, "")
    # what the live display appends to the study's name
    assert noise.display_note(tmp_path, "cpu", ["A", "B"]) == " [noise floor σ: A 0.1000, B 0.1414]"
    assert noise.display_note(tmp_path, "tiny", ["A"]) == ""


@pytest.mark.slow
def test_analysis_noise_runs_the_baseline_on_every_kind_stores_and_logs_sigma(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "analysis.noise", "objective=tiny", "progress=false", "launcher=simulated",
           "launcher.slots=[{kind:H100,count:2,speed:1.0},{kind:H200,count:1,speed:1.08}]", "searcher.seeds=2",
           f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp_path}/outputs", "--store", str(tmp_path / "floors")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    floors = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "floors" / "tiny").glob("*/*.json")}
    assert set(floors) == {"H100", "H200"}
    assert all(f["n"] == 2 and f["sigma"] > 0 for f in floors.values())  # two seeds differ
    assert floors["H200"]["reference_kind"] in ("H100", "H200")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(noise.NOISE_EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")[0]
    assert parent.data.metrics["noise_sigma.H100"] == pytest.approx(floors["H100"]["sigma"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "noise_floor")}
    trials = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'trial'")
    assert sorted((t.data.tags["device_kind"], t.data.params["seed"]) for t in trials) == [
        ("H100", "0"), ("H100", "1"), ("H200", "0"), ("H200", "1")]
    assert "noise floor of study" in proc.stdout
