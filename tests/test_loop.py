"""The loop's scheduling rules, with in-memory trials so each rule is checked exactly."""
from __future__ import annotations

import json
import math
import signal
import threading

import pytest

from study.core import SearchContext
from study.journal import Event, Journal, JournalState
from study.loop import StopRules, StudyLoop
from study.observers import StopKind, StudyObserver
from tests.fakes import InstantLauncher, ListSearcher


def make_loop(tmp_path, searcher, launcher, observers=None, **rules):
    ctx = SearchContext(baseline_source="X = 0\n", baseline_knobs={"X": 0}, space={}, seed=0,
                        study_dir=str(tmp_path), objective={"hard_limit_s": 10})
    return StudyLoop(searcher=searcher, launcher=launcher, ctx=ctx, objective={"hard_limit_s": 10},
                     study_dir=tmp_path, seed=0, rules=StopRules(**rules), observers=observers)


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
    assert state.stop is StopKind.TARGET and "target" in state.stop_reason
    assert len(state.history) < 100


def test_a_ctrl_c_while_the_launcher_is_starting_a_trial_still_cancels_that_trial(tmp_path):
    """The signal lands inside submit(), before the launcher knows the trial (a local launcher's
    fork window): the cancel must still reach it, not let it run to the end and count."""
    class CtrlCInSubmit(InstantLauncher):
        def submit(self, trial, slot):
            if trial.trial_id == "t0001":
                signal.raise_signal(signal.SIGINT)  # the handler runs here, before the trial is registered
            super().submit(trial, slot)

    launcher = CtrlCInSubmit(2, duration=30.0)
    state = make_loop(tmp_path, ListSearcher(limit=10), launcher, max_trials=10).run({"study_id": "s"})
    assert state.stop is StopKind.INTERRUPTED
    assert sorted(launcher.cancelled) == ["t0000", "t0001"], launcher.cancelled


def test_max_trials_counts_submissions_exactly(tmp_path):
    searcher = ListSearcher(limit=100)
    loop = make_loop(tmp_path, searcher, InstantLauncher(4), max_trials=7)
    state = loop.run({"study_id": "s"})
    assert len(state.history) == 7 and state.stop is StopKind.MAX_TRIALS and "max_trials" in state.stop_reason


def test_a_trial_folder_a_kill_left_unsubmitted_skips_its_id_but_not_a_trial(tmp_path):
    """An orchestrator killed while writing t0002's folder (before it journalled the submission)
    leaves the folder: the resume never reuses the id, and still runs max_trials trials."""
    make_loop(tmp_path, ListSearcher(limit=2), InstantLauncher(2), max_trials=2).run({"study_id": "s"})
    orphan = tmp_path / "trials" / "t0002"
    orphan.mkdir()
    (orphan / "trial.json.tmp").write_text("")
    launcher = InstantLauncher(2)
    state = make_loop(tmp_path, ListSearcher(limit=10), launcher, max_trials=5).run({"study_id": "s"})
    js = JournalState.load(tmp_path / "journal.jsonl")
    assert sorted(js.results) == ["t0000", "t0001", "t0003", "t0004", "t0005"]
    assert len(launcher.submits) == 3 and state.stop is StopKind.MAX_TRIALS


def test_a_searcher_that_runs_dry_ends_the_study(tmp_path):
    loop = make_loop(tmp_path, ListSearcher(limit=3), InstantLauncher(2), max_trials=50)
    state = loop.run({"study_id": "s"})
    assert len(state.history) == 3 and state.stop is StopKind.SEARCHER_DONE and "nothing more" in state.stop_reason


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


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_a_trial_the_infrastructure_ends_runs_again_up_to_max_attempts_then_counts_as_it_ended(tmp_path, max_attempts):
    from study.records import Result

    searcher = ListSearcher(limit=3)
    lost = Result(status="lost", reason="node went away")
    launcher = InstantLauncher(1, score=lambda c: lost if c.knobs["x"] == 1 else 1.0)
    state = make_loop(tmp_path, searcher, launcher, max_trials=3, max_attempts=max_attempts).run({"study_id": "s"})
    events = Journal.read(tmp_path / "journal.jsonl")
    runs_of_t1 = [e for e in events if e["event"] == "submitted" and e["trial"]["trial_id"] == "t0001"]
    assert len(runs_of_t1) == max_attempts == len(launcher.submits) - 2
    assert [t.trial_id for t, _ in state.history] == ["t0000", "t0001", "t0002"], "a re-run goes before new work"
    assert state.history[1][0].attempt == max_attempts
    assert dict(searcher.told)["t0001"] == math.inf, "once final, the searcher hears of it as a failure"
    js = JournalState.load(tmp_path / "journal.jsonl")
    assert js.results["t0001"].status == "lost" and js.to_rerun() == [], "final: a resume does not run it again"


@pytest.mark.parametrize("rules", [{"on_stop": "later"}, {"max_trials": 0}, {"max_hours": -1}, {"max_attempts": 0}])
def test_bad_stop_rules_are_refused(rules):
    with pytest.raises(ValueError):
        StopRules(**rules)


class Recorder(StudyObserver):
    def __init__(self):
        self.calls = []

    def on_start(self, state, resumed):
        self.calls.append(("start", [t.trial_id for t, _, _ in resumed]))

    def on_trial_finished(self, trial, result, times):
        assert times["t_finished"] >= times["t_submitted"] >= 0
        self.calls.append(("finished", trial.trial_id))

    def on_new_best(self, index, trial, result):
        self.calls.append(("best", trial.trial_id))


class Broken(StudyObserver):
    def on_trial_finished(self, trial, result, times):
        raise RuntimeError("a display bug")


def test_observers_hear_start_every_result_and_each_new_best_and_a_broken_one_costs_nothing(tmp_path):
    scores = {0: 2.0, 1: 1.5, 2: 1.8}
    launcher = InstantLauncher(1, score=lambda c: scores[c.knobs["x"]])
    first = Recorder()
    make_loop(tmp_path, ListSearcher(limit=3), launcher, [Broken(), first], max_trials=3).run({"study_id": "s"})
    assert first.calls == [("start", []), ("finished", "t0000"), ("best", "t0000"), ("finished", "t0001"),
                           ("best", "t0001"), ("finished", "t0002")]

    again = Recorder()  # a resume: what the journal had arrives once, at the start
    make_loop(tmp_path, ListSearcher(limit=4), InstantLauncher(1, score=lambda c: scores[c.knobs["x"]]),
              [again], max_trials=4).run({"study_id": "s"})
    assert again.calls == [("start", ["t0000", "t0001", "t0002"]), ("finished", "t0003")]  # x=0 again: 2.0


def test_the_journal_keeps_readable_event_words_and_the_stop_kind(tmp_path):
    make_loop(tmp_path, ListSearcher(limit=2), InstantLauncher(1), max_trials=2).run({"study_id": "s"})
    lines = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert {e["event"] for e in lines} <= {str(event) for event in Event}
    assert lines[0]["event"] == "study" and lines[-1] == {**lines[-1], "event": "stopped", "kind": "max_trials"}


def test_a_searcher_reads_history_but_cannot_rewrite_it(tmp_path):
    seen = []

    class Peeking(ListSearcher):
        def ask(self, n, ctx):
            seen.append((len(ctx.history), hasattr(ctx.history, "append"), hasattr(ctx.history, "__setitem__")))
            return super().ask(n, ctx)

    loop = make_loop(tmp_path, Peeking(limit=3), InstantLauncher(1), max_trials=3)
    loop.run({"study_id": "s"})
    assert [n for n, _, _ in seen] == [0, 1, 2]  # it grows as trials finish
    assert not any(writable for _, *flags in seen for writable in flags)
    assert loop.ctx.history[-1] == loop.state.history[-1]
