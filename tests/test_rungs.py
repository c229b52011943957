"""Successive halving (searchers/rungs.py) on a synthetic objective whose every score is known.

A candidate x has a true quality; a run on a fraction f of the budget scores quality + (1 - f), so
a shorter run is worse but ranks candidates as the full run would. Durations vary with x, so
results land out of order and promotions happen asynchronously, as on real slots.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from launchers.simulated import SimulatedLauncher
from searchers.rungs import Rung, RungSearcher, check_rung_kinds, parse_rungs
from study.core import Launcher, SearchContext, Slot
from study.journal import Journal, JournalState
from study.loop import StopRules, StudyLoop
from study.records import INFRA_STATUSES, Candidate, Result, Trial, scaled_objective
from tests.fakes import ListSearcher

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVE = {"budget_kind": "steps", "budget": 100, "hard_limit_s": 600}
RUNGS = [Rung(0.25), Rung(0.5), Rung(1.0)]


def quality(x: int) -> float:
    """A fixed shuffle of the candidates: 7 is a generator of the integers mod 101."""
    return (7 * x) % 101 / 100


class SyntheticLauncher(Launcher):
    """Trials end after a few real milliseconds (varying with x) with the score the synthetic
    objective gives the budget in their objective."""

    name = "synthetic"

    def __init__(self, n_slots: int, kinds: tuple[str, ...] = ("cpu",), tick: float = 0.002):
        self._slots = [Slot(name=f"s{i}", device_kind=kinds[i % len(kinds)]) for i in range(n_slots)]
        self.tick = tick
        self.running: dict[str, tuple[float, Trial]] = {}

    def slots(self):
        return self._slots

    def submit(self, trial, slot):
        x = trial.candidate.knobs["x"]
        fraction = trial.objective["budget"] / OBJECTIVE["budget"]
        self.running[trial.trial_id] = (time.time() + self.tick * (1 + (3 * x) % 5) * fraction * 4, trial)

    def wait(self, timeout):
        deadline = time.time() + timeout
        while True:
            now = time.time()
            done = [tid for tid, (end, _) in self.running.items() if end <= now]
            if done or now >= deadline:
                break
            time.sleep(0.001)
        out = []
        for tid in sorted(done, key=lambda t: self.running[t][0]):
            _, trial = self.running.pop(tid)
            fraction = trial.objective["budget"] / OBJECTIVE["budget"]
            out.append((tid, Result(status="ok", val_bpb=quality(trial.candidate.knobs["x"]) + 1 - fraction,
                                    budget=trial.objective["budget"])))
        return out

    def cancel(self, trial_id):
        if trial_id in self.running:
            self.running[trial_id] = (0.0, self.running[trial_id][1])


def make_loop(study_dir: Path, searcher, launcher, max_trials: int) -> StudyLoop:
    ctx = SearchContext(baseline_source="X = 0\n", baseline_knobs={"X": 0}, space={}, seed=0,
                        study_dir=str(study_dir), objective=OBJECTIVE)
    return StudyLoop(searcher=searcher, launcher=launcher, ctx=ctx, objective=OBJECTIVE, study_dir=study_dir,
                     seed=0, rules=StopRules(max_trials=max_trials))


def run_synthetic(study_dir: str, max_trials: int, tick: float) -> None:
    """One study of ListSearcher under rungs; the kill -9 test runs this in a process of its own."""
    inner = ListSearcher(limit=1000)
    make_loop(Path(study_dir), RungSearcher(inner, RUNGS, eta=3), SyntheticLauncher(4, tick=tick),
              max_trials).run({"study_id": "synthetic"})


def check_every_promotion(journal: Path, eta: int = 3) -> dict[int, list[str]]:
    """Replay the journal: each promotion was, at some moment before it was submitted, a finished
    lower-rung result in the top 1/eta of that rung's finished results (results that land while a
    searcher thinks are told after its ask, so the journal cannot pin the exact moment), and no
    lineage ran twice at one rung. Returns lineages per rung."""
    finished: dict[int, dict[str, float]] = {k: {} for k in range(len(RUNGS))}
    was_top: dict[int, set[str]] = {k: set() for k in range(len(RUNGS))}
    trials: dict[str, Trial] = {}
    ran: dict[int, list[str]] = {k: [] for k in range(len(RUNGS))}
    for event in Journal.read(journal):
        if event["event"] == "submitted":
            trial = Trial.from_dict(event["trial"])
            if trial.trial_id in trials:
                continue  # a re-run after a restart: the same trial
            trials[trial.trial_id] = trial
            rung = trial.candidate.meta["rung"]
            assert trial.objective["budget"] == round(OBJECTIVE["budget"] * RUNGS[rung].fraction)
            if rung:
                lineage = trial.candidate.meta["lineage"]
                assert lineage in was_top[rung - 1], \
                    f"{trial.trial_id} promoted {lineage}, never in the top 1/{eta} of {finished[rung - 1]}"
                assert lineage not in ran[rung], f"{lineage} promoted to rung {rung} twice"
                ran[rung].append(lineage)
        elif event["event"] == "finished":
            trial, result = trials[event["trial_id"]], Result.from_dict(event["result"])
            if result.status in INFRA_STATUSES:
                continue  # it never ran: not a result of its rung
            lineage = trial.candidate.meta.get("lineage") or trial.trial_id
            rung = trial.candidate.meta["rung"]
            finished[rung][lineage] = result.score()
            was_top[rung].update(sorted(finished[rung], key=finished[rung].get)[:len(finished[rung]) // eta])
    return ran


def test_an_ask_promotes_exactly_the_top_1_over_eta_best_first():
    inner = ListSearcher(limit=100)
    searcher = RungSearcher(inner, RUNGS, eta=3)
    ctx = SearchContext(baseline_source="", baseline_knobs={}, space={}, seed=0, study_dir=".", objective=OBJECTIVE)
    searcher.setup(ctx)
    fresh = searcher.ask(10, ctx)
    assert [c.meta["rung"] for c in fresh] == [0] * 10 and {c.budget_fraction for c in fresh} == {0.25}
    scores = {}
    for i, c in enumerate(fresh):
        trial = Trial(trial_id=f"t{i:04d}", index=i, candidate=c, objective=OBJECTIVE)
        scores[trial.trial_id] = quality(c.knobs["x"])
        searcher.tell(trial, Result(status="ok", val_bpb=scores[trial.trial_id]))
    asked = searcher.ask(5, ctx)
    promoted = [c for c in asked if c.meta["rung"] == 1]
    expected = sorted(scores, key=scores.get)[:10 // 3]
    assert [c.meta["lineage"] for c in promoted] == expected
    assert all(c.budget_fraction == 0.5 for c in promoted)
    assert [c.meta["rung"] for c in asked[len(promoted):]] == [0, 0], "the rest are fresh candidates"
    assert [tid for tid, _ in inner.told] == list(scores), "the inner searcher hears each lowest-rung result once"
    assert searcher.ask(3, ctx)[0].meta["rung"] == 0, "nothing is promoted twice"


def test_a_study_promotes_by_the_rule_and_only_whole_budget_runs_count(tmp_path):
    inner = ListSearcher(limit=1000)
    loop = make_loop(tmp_path, RungSearcher(inner, RUNGS, eta=3), SyntheticLauncher(4), max_trials=60)
    state = loop.run({"study_id": "s"})
    ran = check_every_promotion(tmp_path / "journal.jsonl")
    assert len(ran[1]) >= 3 and len(ran[2]) >= 1
    best_trial, best = state.best
    assert best_trial.candidate.budget_fraction == 1.0 and best_trial.objective["budget"] == OBJECTIVE["budget"]
    full = [r.val_bpb for t, r in state.history if t.candidate.full_budget]
    assert best.val_bpb == min(full)
    rung0 = {t.trial_id for t, _ in state.history if t.candidate.meta["rung"] == 0}
    assert {tid for tid, _ in inner.told} == rung0, "promoted runs are not told to the inner searcher"
    summary = loop.searcher.summary()
    assert summary["rank_tau_r0_r1"] == pytest.approx(1.0), "this objective ranks alike at every fraction"
    assert summary["rung1_promotions"] == len(ran[1]) and summary["rank_fidelity"] == "ok"


def test_low_rank_fidelity_is_measured_and_reported():
    searcher = RungSearcher(ListSearcher(), RUNGS, eta=2)
    searcher.setup(SearchContext(baseline_source="", baseline_knobs={}, space={}, seed=0, study_dir=".",
                                 objective=OBJECTIVE))
    for i in range(6):  # rung 1 reverses rung 0's order
        for rung, score in ((0, i), (1, -i)):
            cand = Candidate(source="", knobs={"x": i}, meta={"rung": rung, "lineage": f"t{i}"})
            searcher.tell(Trial(trial_id=f"t{i}" if rung == 0 else f"p{i}", index=i, candidate=cand,
                                objective=OBJECTIVE), Result(status="ok", val_bpb=score))
    tau, pairs = searcher.rank_fidelity(0)
    assert pairs == 6 and tau == pytest.approx(-1.0)
    assert searcher.summary()["rank_fidelity"].startswith("low: rungs 0->1: tau=-1.00")


def test_kill_9_mid_study_loses_no_rung_result_and_resume_keeps_the_rungs(tmp_path):
    code = f"from tests.test_rungs import run_synthetic; run_synthetic({str(tmp_path)!r}, 400, 0.05)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    journal = tmp_path / "journal.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        js = JournalState.load(journal)
        if any(t.candidate.meta.get("rung") == 1 for t in js.trials.values()) and len(js.results) >= 20 \
                and js.in_flight():
            break
        assert proc.poll() is None, "the study ended before it could be killed"
        time.sleep(0.05)
    else:
        raise AssertionError("no promotion within 240 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = JournalState.load(journal)

    searcher = RungSearcher(ListSearcher(limit=1000), RUNGS, eta=3)
    make_loop(tmp_path, searcher, SyntheticLauncher(4), max_trials=len(before.trials) + 30).run({"study_id": "s"})
    after = JournalState.load(journal)
    for tid, result in before.results.items():
        assert after.results[tid].to_dict() == result.to_dict(), f"{tid}'s result changed or was lost"
    submissions = Counter(e["trial"]["trial_id"] for e in Journal.read(journal) if e["event"] == "submitted")
    assert all(submissions[tid] == 1 for tid in before.results), "a finished rung run was run again"
    check_every_promotion(journal)  # no lineage promoted twice across the restart
    for k in range(len(RUNGS)):  # the resumed searcher holds every rung result the journal holds
        in_journal = {(t.candidate.meta.get("lineage") or t.trial_id): r.score()
                      for t, r in after.finished() if t.candidate.meta["rung"] == k and r.status not in INFRA_STATUSES}
        assert searcher.scores[k] == in_journal


def test_a_rung_naming_a_device_kind_runs_on_that_kind(tmp_path):
    def runner(trial_dir, trial, slot):
        steps = trial.objective["budget"]
        return Result(status="ok", val_bpb=quality(trial.candidate.knobs["x"]) + 1 / steps, num_steps=steps,
                      training_seconds=0.0, total_seconds=0.5)

    launcher = SimulatedLauncher(slots=[{"kind": "T4", "count": 3, "speed": 0.5}, {"kind": "H100", "count": 1}],
                                 seconds_per_budget_unit=0.1, runner=runner)
    launcher.start()
    rungs = [Rung(0.5, "T4"), Rung(1.0, "H100")]
    check_rung_kinds(rungs, {"T4": {}, "H100": {}})
    loop = make_loop(tmp_path, RungSearcher(ListSearcher(limit=1000), rungs, eta=3), launcher, max_trials=24)
    state = loop.run({"study_id": "s"})
    by_rung = Counter((t.candidate.meta["rung"], r.device_kind) for t, r in state.history)
    assert by_rung[(1, "H100")] >= 3 and by_rung[(0, "T4")] >= 9
    assert set(by_rung) == {(0, "T4"), (1, "H100")}, by_rung
    assert state.best[1].device_kind == "H100"


def test_shorter_rungs_are_complete_runs_on_a_fraction_of_the_budget():
    steps = scaled_objective({"budget_kind": "steps", "budget": 600, "hard_limit_s": 600}, 0.25)
    assert steps["budget"] == 150 and steps["hard_limit_s"] == 150 and steps["budget_fraction"] == 0.25
    seconds = scaled_objective({"budget_kind": "seconds", "budget": 300, "hard_limit_s": 900}, 0.1)
    assert seconds["budget"] == pytest.approx(30) and seconds["hard_limit_s"] == pytest.approx(90)
    derived = scaled_objective({"budget_kind": "steps", "budget": 600, "hard_limit_s": 360,
                                "hard_limit_per_unit_s": 0.5}, 0.25)
    assert derived["budget"] == 150 and derived["hard_limit_s"] == 60 + 150 * 0.5, "the allowance stays whole"
    tiny = scaled_objective({"budget_kind": "steps", "budget": 8, "hard_limit_s": 60}, 0.25)
    assert tiny["budget"] == 2 and tiny["hard_limit_s"] == 60, "start-up and evaluation still need their minute"


@pytest.mark.parametrize("rungs, eta, error", [
    ([0.5, 0.25, 1.0], 3, "increase strictly"),
    ([0.25, 0.5], 3, "end at 1.0"),
    ([1.0], 3, "at least two"),
    ([0, 1.0], 3, "in (0, 1]"),
    ([{"fraction": 0.5, "gpu": "T4"}, 1.0], 3, "fraction or {fraction, kind}"),
    ([0.5, 1.0], 1, "eta must be an integer >= 2"),
])
def test_bad_rungs_are_one_line_errors(rungs, eta, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_rungs(rungs, eta)


def test_a_rung_on_a_kind_the_launcher_lacks_is_refused():
    with pytest.raises(ValueError, match="names device kind 'A100'; the launcher's slots are H100"):
        check_rung_kinds(parse_rungs([{"fraction": 0.5, "kind": "A100"}, 1.0], 3), {"H100": {}})
    assert parse_rungs([0.25, {"fraction": 1.0, "kind": "H100"}], 2) == [Rung(0.25), Rung(1.0, "H100")]


def test_only_whole_budget_runs_count_in_mlflow_and_analysis(tmp_path, monkeypatch):
    """A real study (run_study, MLflow, analysis) whose trials a synthetic runner scores: the
    shorter runs log rung_val_bpb, never val_bpb, so no best, staircase or analysis counts them."""
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    from analysis.curves import staircase
    from analysis.load import load
    from study.runner import run_study

    def runner(trial_dir, trial, slot):  # shorter runs score *better* here: they must still not count
        steps = trial.objective["budget"]
        return Result(status="ok", val_bpb=quality(trial.index) + steps / 100, num_steps=steps,
                      training_seconds=0.0, total_seconds=0.1)

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "searcher=random", "objective=tiny", "objective.budget=40", "progress=false", "launcher=simulated",
            "launcher.slots=4", "study.max_trials=30", "study.rungs=[0.25,0.5,1.0]", "study.eta=2",
            f"study.dir={tmp_path}/study", f"mlflow.tracking_uri={uri}"])
    launcher = SimulatedLauncher(slots=4, seconds_per_budget_unit=1.0, runner=runner)
    state = run_study(cfg, launcher=launcher)

    full = {t.trial_id: r.val_bpb for t, r in state.history if t.candidate.full_budget}
    assert full and len(full) < len(state.history)
    assert state.best[0].trial_id == min(full, key=full.get)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.study.experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("arena.kind") == "study")
    assert parent.data.tags["searcher"] == "random+rungs"
    assert min(m.value for m in client.get_metric_history(parent.info.run_id, "best_val_bpb")) == \
        pytest.approx(min(full.values()))
    for child in (r for r in runs if r.data.tags.get("arena.kind") == "trial"):
        m = child.data.metrics
        counted = "val_bpb" in m
        assert counted == (m["budget_fraction"] == 1.0) and counted != ("rung_val_bpb" in m), m
    studies, trials = load(uri, cfg.study.experiment)
    assert staircase(trials)["best"].min() == pytest.approx(min(full.values()))
    assert trials["val_bpb"].notna().sum() == len(full)
