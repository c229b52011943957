"""The loop's scheduling rules, with in-memory trials so each rule is checked exactly."""
from __future__ import annotations

import math
import threading

import pytest

from study.core import SearchContext
from study.journal import Journal, JournalState
from study.loop import StopRules, StudyLoop
from tests.fakes import InstantLauncher, ListSearcher


def make_loop(tmp_path, searcher, launcher, **rules):
    ctx = SearchContext(baseline_source="X = 0\n", baseline_knobs={"X": 0}, space={}, seed=0,
                        study_dir=str(tmp_path), objective={"hard_limit_s": 10})
    return StudyLoop(searcher=searcher, launcher=launcher, ctx=ctx, objective={"hard_limit_s": 10},
                     study_dir=tmp_path, seed=0, rules=StopRules(**rules))


def test_results_are_collected_while_the_searcher_thinks(tmp_path):
    gate = threading.Event()
    searcher = ListSearcher(limit=6)
    launcher = InstantLauncher(2, duration=0.05)
    loop = make_loop(tmp_path, searcher, launcher, max_trials=6)
    original_ask = searcher.ask

    def slow_second_ask(n, ctx):
        if len(searcher.asks) == 1:  # the second wave blocks until trials of the first have landed
            searcher.ask_gate = gate
            threading.Timer(1.0, gate.set).start()
        else:
            searcher.ask_gate = None
        return original_ask(n, ctx)

    searcher.ask = slow_second_ask
    loop.run({"study_id": "s"})
    events = Journal.read(tmp_path / "journal.jsonl")
    kinds = [e["event"] for e in events]
    first_ask, second_ask = [i for i, k in enumerate(kinds) if k == "asked"][:2]
    assert "finished" in kinds[first_ask:second_ask], "results must be recorded while ask runs"
    assert len(JournalState.load(tmp_path / "journal.jsonl").results) == 6


def test_failures_are_told_as_failures_and_the_study_goes_on(tmp_path):
    searcher = ListSearcher(limit=5)
    launcher = InstantLauncher(2, score=lambda c: None if c.knobs["x"] % 2 else 2.0 - c.knobs["x"] / 10)
    loop = make_loop(tmp_path, searcher, launcher, max_trials=5)
    state = loop.run({"study_id": "s"})
    assert len(state.history) == 5
    scores = dict(searcher.told)
    assert sum(math.isinf(s) for s in scores.values()) == 2
    assert state.best[1].val_bpb == pytest.approx(1.6)


def test_target_stops_and_cancels_trials_in_flight(tmp_path):
    searcher = ListSearcher(limit=100)
    launcher = InstantLauncher(3, duration=0.0, score=lambda c: 0.5 if c.knobs["x"] == 4 else 1.0)
    launcher.duration = 0.0
    loop = make_loop(tmp_path, searcher, launcher, target_val_bpb=0.6, max_trials=100)
    state = loop.run({"study_id": "s"})
    assert "target" in state.stop_reason
    assert len(state.history) < 100


def test_max_trials_counts_submissions_exactly(tmp_path):
    searcher = ListSearcher(limit=100)
    loop = make_loop(tmp_path, searcher, InstantLauncher(4), max_trials=7)
    state = loop.run({"study_id": "s"})
    assert len(state.history) == 7 and "max_trials" in state.stop_reason


def test_a_searcher_that_runs_dry_ends_the_study(tmp_path):
    loop = make_loop(tmp_path, ListSearcher(limit=3), InstantLauncher(2), max_trials=50)
    state = loop.run({"study_id": "s"})
    assert len(state.history) == 3 and "nothing more" in state.stop_reason


def test_resume_tells_finished_trials_back_without_rerunning(tmp_path):
    loop = make_loop(tmp_path, ListSearcher(limit=4), InstantLauncher(2), max_trials=4)
    loop.run({"study_id": "s"})
    again = ListSearcher(limit=8)
    launcher = InstantLauncher(2)
    loop2 = make_loop(tmp_path, again, launcher, max_trials=8)
    loop2.run({"study_id": "s"})
    assert [tid for tid, _ in again.told[:4]] == ["t0000", "t0001", "t0002", "t0003"]
    assert len(launcher.submits) == 4  # only the 4 new trials ran
    js = JournalState.load(tmp_path / "journal.jsonl")
    assert sorted(js.results) == [f"t{i:04d}" for i in range(8)]


@pytest.mark.parametrize("rules", [{"on_stop": "later"}, {"max_trials": 0}, {"max_hours": -1}])
def test_bad_stop_rules_are_refused(rules):
    with pytest.raises(ValueError):
        StopRules(**rules)
