"""The simulated launcher's clock against a discrete-event schedule computed by hand.

A small driver plays the study loop (fill free slots in slot order, then wait); the expected
schedule is list scheduling: each trial, in submission order, takes the slot that frees first
(ties by slot order) and holds it for its duration. Durations come from the fake runner's known
overheads and steps, or, with the real harness, from each trial's recorded result.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from launchers.simulated import SimulatedLauncher
from study.core import LauncherError
from study.loop import stamp
from study.records import Candidate, Result, Trial
from study.trialdir import write_trial_dir

STEPS = 10
SPEC = [{"kind": "A", "count": 2, "speed": 1.0}, {"kind": "B", "count": 1, "speed": 2.0}]
# (overhead seconds, steps after which the trial crashes or None): the trial's fixed cost and fate
PLAN = [(1.0, None), (3.0, None), (2.0, None), (0.5, None), (4.0, 2), (1.5, None), (2.5, None), (1.0, 7)]


class FakeRunner:
    """Stands in for the harness: 'trains' for the budget its trial.json says (so a faster slot's
    larger budget shows), then reports the overhead and fate its knobs say."""

    def __init__(self, sleep=lambda trial: 0.0):
        self.sleep = sleep
        self.budgets: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, trial_dir: Path, trial: Trial, slot) -> Result:
        budget = json.loads((trial_dir / "trial.json").read_text())["objective"]["budget"]
        with self.lock:
            self.budgets[trial.trial_id] = budget
        time.sleep(self.sleep(trial))
        crash_at = trial.candidate.knobs["crash_at"]
        steps = budget if crash_at is None else crash_at
        training = 0.001 * steps  # the real (CPU) seconds; the virtual clock uses steps instead
        return Result(status="ok" if crash_at is None else "crash", val_bpb=None if crash_at else 2.0,
                      num_steps=steps, training_seconds=training,
                      total_seconds=training + trial.candidate.knobs["overhead"], device="cpu")


def make_trial(tmp_path: Path, index: int, knobs: dict, budget=STEPS) -> Trial:
    trial = Trial(trial_id=f"t{index:03d}", index=index, candidate=Candidate(source=f"X = {index}\n", knobs=knobs),
                  objective={"budget_kind": "steps", "budget": budget, "hard_limit_s": 60})
    trial.directory = str(write_trial_dir(tmp_path / trial.trial_id, trial))
    return trial


def drive(launcher, trials: list[Trial]) -> list[tuple[str, Result]]:
    """What the study loop does: fill free slots in slot order, wait, stamp, repeat."""
    slots, queue, busy, released = launcher.slots(), list(trials), {}, []
    while queue or busy:
        for slot in slots:
            if queue and slot not in busy.values():
                trial = queue.pop(0)
                trial.submitted_at = launcher.now()
                launcher.submit(trial, slot)
                busy[trial.trial_id] = slot
        for trial_id, result in launcher.wait(timeout=30):
            trial = next(t for t in trials if t.trial_id == trial_id)
            released.append((trial_id, stamp(result, trial, busy.pop(trial_id), now=launcher.now(), clock_origin=0.0)))
    return released


def list_schedule(slots, trial_ids, duration) -> dict[str, tuple[str, float, float]]:
    """trial -> (slot, start, finish): each trial takes the earliest-free slot, ties by slot order."""
    free = {s.name: 0.0 for s in slots}
    order = [s.name for s in slots]
    out = {}
    for tid in trial_ids:
        name = min(order, key=lambda n: (free[n], order.index(n)))
        slot = next(s for s in slots if s.name == name)
        start = free[name]
        free[name] = start + duration(tid, slot)
        out[tid] = (name, start, free[name])
    return out


def fake_duration(trial_id: str, slot) -> float:
    overhead, crash_at = PLAN[int(trial_id[1:])]
    steps = round(STEPS * slot.speed) if crash_at is None else crash_at
    return overhead + steps / slot.speed * 1.0  # seconds_per_budget_unit = 1.0


def check_against_schedule(launcher, released, expected):
    got = {tid: (r.slot, r.started_at, r.finished_at) for tid, r in released}
    assert got.keys() == expected.keys()
    for tid, (slot, start, finish) in expected.items():
        assert got[tid][0] == slot, tid
        assert got[tid][1:] == pytest.approx((start, finish)), tid
    finishes = [r.finished_at for _, r in released]
    assert finishes == sorted(finishes), "results must come back in virtual-time order"
    assert launcher.now() == pytest.approx(max(f for _, _, f in expected.values()))
    for slot in launcher.slots():  # occupancy: each slot's trials back to back, never overlapping
        spans = sorted((s, f) for name, s, f in got.values() if name == slot.name)
        assert all(prev_f == pytest.approx(s) for (_, prev_f), (s, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("real_workers", [1, 3])
def test_virtual_schedule_is_the_discrete_event_schedule(tmp_path, real_workers):
    # With 3 workers, trials that are short on the virtual clock are the slowest for real, so any
    # release in real-time order would show up as a wrong schedule.
    runner = FakeRunner(sleep=lambda t: 0.15 if t.candidate.knobs["overhead"] < 2 else 0.0)
    launcher = SimulatedLauncher(slots=SPEC, real_workers=real_workers, seconds_per_budget_unit=1.0, runner=runner)
    launcher.start()
    trials = [make_trial(tmp_path, i, {"overhead": o, "crash_at": c}) for i, (o, c) in enumerate(PLAN)]
    released = drive(launcher, trials)
    expected = list_schedule(launcher.slots(), [t.trial_id for t in trials], fake_duration)
    check_against_schedule(launcher, released, expected)
    for tid, result in released:
        slot_kind = expected[tid][0][0].upper()
        assert result.device_kind == slot_kind and result.queue_seconds == 0.0
        assert result.extra["time_mode"] == "simulated"
        assert runner.budgets[tid] == (2 * STEPS if slot_kind == "B" else STEPS)  # speed 2.0 doubles it
        assert result.status == ("crash" if PLAN[int(tid[1:])][1] else "ok")


@pytest.mark.parametrize("assume_full_budget", [False, True])
def test_assuming_full_budgets_lets_the_clock_run_ahead_of_a_slow_real_trial(tmp_path, assume_full_budget):
    gate = threading.Event()
    runner = FakeRunner(sleep=lambda t: 0.0 if t.trial_id != "t002" or gate.wait(30) else 0.0)
    launcher = SimulatedLauncher(slots=2, seconds_per_budget_unit=1.0, assume_full_budget=assume_full_budget,
                                 runner=runner)
    a, b = launcher.slots()
    first, second, third = (make_trial(tmp_path, i, {"overhead": o, "crash_at": None}) for i, o in enumerate((1, 3, 1)))
    launcher.submit(first, a)
    launcher.submit(second, b)
    assert [tid for tid, _ in launcher.wait(timeout=30)] == ["t000"]  # at 11
    launcher.submit(third, a)  # at 11, runs for real behind a gate; cannot end before 11 + 10
    ahead = launcher.wait(timeout=0.5)
    gate.set()
    if assume_full_budget:
        assert [(tid, r.finished_at) for tid, r in ahead] == [("t001", 13.0)]
    else:
        assert ahead == []  # t002 could have crashed at once: t001 must wait for it
        assert [(tid, r.finished_at) for tid, r in launcher.wait(timeout=30)] == [("t001", 13.0)]
    assert [(tid, r.finished_at) for tid, r in launcher.wait(timeout=30)] == [("t002", 22.0)]
    launcher.close()


def test_an_early_failure_under_full_budget_assumption_is_charged_until_it_could_be_placed(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(sleep=lambda t: 0.0 if t.trial_id != "t001" or gate.wait(30) else 0.0)
    launcher = SimulatedLauncher(slots=2, real_workers=2, seconds_per_budget_unit=1.0, assume_full_budget=True,
                                 runner=runner)
    a, b = launcher.slots()
    launcher.submit(make_trial(tmp_path, 0, {"overhead": 0.0, "crash_at": None}), a)  # ends at 10
    launcher.submit(make_trial(tmp_path, 1, {"overhead": 1.0, "crash_at": 1}), b)  # really ends at 2
    assert [(tid, r.finished_at) for tid, r in launcher.wait(timeout=30)] == [("t000", 10.0)]
    gate.set()
    [(tid, crashed)] = launcher.wait(timeout=30)
    assert (tid, crashed.status, crashed.finished_at) == ("t001", "crash", 10.0)
    assert crashed.extra["clamped_seconds"] == pytest.approx(8.0)
    launcher.close()


def test_thinking_time_moves_the_clock_and_later_submissions_start_then(tmp_path):
    launcher = SimulatedLauncher(slots=2, seconds_per_budget_unit=1.0, runner=FakeRunner())
    first, second = (make_trial(tmp_path, i, {"overhead": 1.0, "crash_at": None}) for i in range(2))
    a, b = launcher.slots()
    launcher.submit(first, a)
    launcher.advance(4.0)  # the searcher thought for 4 s
    assert launcher.now() == 4.0
    launcher.submit(second, b)
    got = {}
    while len(got) < 2:
        got.update(dict(launcher.wait(timeout=30)))
    assert (got["t000"].started_at, got["t000"].finished_at) == (0.0, 11.0)
    assert (got["t001"].started_at, got["t001"].finished_at) == (4.0, 15.0)


def test_without_seconds_per_unit_the_measured_training_time_is_the_clock(tmp_path):
    launcher = SimulatedLauncher(slots=[{"kind": "H200", "count": 1, "speed": 1.25}], runner=FakeRunner())
    trial = make_trial(tmp_path, 0, {"overhead": 2.0, "crash_at": None}, budget=8)
    launcher.submit(trial, launcher.slots()[0])
    [(_, result)] = launcher.wait(timeout=30)
    # 10 real steps at 1 ms each, spent at speed 1.25, plus the overhead
    assert result.finished_at == pytest.approx(2.0 + 0.010 / 1.25)
    assert result.extra["nominal_budget"] == 8 and result.num_steps == 10


def test_cancel_ends_queued_and_running_trials_at_the_current_virtual_time(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(sleep=lambda t: 0.0 if gate.wait(30) else 0.0)
    launcher = SimulatedLauncher(slots=2, real_workers=1, seconds_per_budget_unit=1.0, runner=runner)
    running, queued = (make_trial(tmp_path, i, {"overhead": 1.0, "crash_at": None}) for i in range(2))
    a, b = launcher.slots()
    launcher.submit(running, a)
    launcher.submit(queued, b)
    launcher.advance(3.0)
    time.sleep(0.1)  # the one real worker has picked up `running`; `queued` waits behind it
    launcher.cancel("t001")
    launcher.cancel("t000")
    gate.set()
    got = {}
    while len(got) < 2:
        got.update(dict(launcher.wait(timeout=30)))
    assert {r.status for r in got.values()} == {"cancelled"}
    assert [r.finished_at for r in got.values()] == [3.0, 3.0]
    assert list(runner.budgets) == ["t000"], "a cancelled trial that never started must never run"
    launcher.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slots": 0}, "launcher.slots must be >= 1"),
        ({"slots": [{"kind": "H100", "count": 2, "speed": 0}]}, "speed must be a number > 0"),
        ({"slots": [{"kind": "H100", "count": 2, "sped": 1.0}]}, "entry must be {kind, count, speed}"),
        ({"slots": "many"}, "must be a number or a list"),
        ({"real_workers": 0}, "real_workers must be an integer >= 1"),
        ({"seconds_per_budget_unit": -1}, "seconds_per_budget_unit must be > 0"),
    ],
)
def test_bad_config_is_one_clear_line_before_anything_runs(kwargs, message):
    with pytest.raises(LauncherError, match=message.replace("{", r"\{").replace("}", r"\}")):
        SimulatedLauncher(**kwargs).start()


@pytest.mark.slow
def test_a_simulated_study_with_real_trials_follows_the_discrete_event_schedule(tmp_path):
    """`python run.py launcher=simulated` end to end: real tiny training, the real loop and MLflow
    mirror, 3 x H100 + 1 x H200 (speed 1.5) virtual slots, 5 trials."""
    from omegaconf import OmegaConf

    from analysis.load import load
    from tests.conftest import ROOT, TINY, run_arena, sqlite_uri

    uri, spu = sqlite_uri(tmp_path), 10.0
    run_arena(tmp_path, *TINY, "launcher=simulated", "launcher.slots=[{kind:H100,count:3,speed:1.0},{kind:H200,count:1,speed:1.5}]",
              f"launcher.seconds_per_budget_unit={spu}", "searcher=grid", "~searcher.levels",
              "+searcher.levels={MATRIX_LR:[0.01,0.02,0.04,0.08,0.16]}", "study.max_trials=5",
              f"mlflow.tracking_uri={uri}", timeout=900)
    studies, trials = load(uri, "autoresearch-arena")
    assert studies["time_mode"].tolist() == ["simulated"] and studies["slots"].tolist() == [4]
    budget = OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml")["budget"]
    trials = trials.sort_values("trial_index").set_index("trial_id")
    assert (trials["status"] == "ok").all(), trials[["status", "reason"]]
    assert (trials["queue_seconds"] == 0).all() and (trials["t_started"] == trials["t_submitted"]).all()
    h200 = trials["device_kind"] == "H200"
    assert h200.sum() >= 1 and (trials.loc[h200, "num_steps"] == budget * 1.5).all()
    assert (trials.loc[~h200, "num_steps"] == budget).all()
    # every trial holds its slot for its real overhead plus the nominal budget's virtual time
    overhead = trials["total_seconds"] - trials["training_seconds"]
    assert (trials["slot_seconds"] - overhead).tolist() == pytest.approx([budget * spu] * len(trials), abs=1e-3)

    launcher = SimulatedLauncher(slots=[{"kind": "H100", "count": 3, "speed": 1.0}, {"kind": "H200", "count": 1, "speed": 1.5}])
    expected = list_schedule(launcher.slots(), list(trials.index), lambda tid, slot: trials.loc[tid, "slot_seconds"])
    for tid, (slot, start, finish) in expected.items():
        assert trials.loc[tid, "slot"] == slot, tid
        # the loop submits after the searcher's ask, which the clock charges (milliseconds here)
        assert (trials.loc[tid, "t_started"], trials.loc[tid, "t_finished"]) == pytest.approx((start, finish), abs=0.5)
    journal = (tmp_path / "studies").glob("*/journal.jsonl")
    released = [json.loads(line)["result"]["finished_at"] for line in next(journal).read_text().splitlines()
                if json.loads(line)["event"] == "finished"]
    assert released == sorted(released) and len(released) == 5
